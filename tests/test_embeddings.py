"""``/v1/embeddings`` on a tiny real causal LM and a tiny real BERT encoder: vectors equal to what
transformers computes, every input form and both encodings, 400s naming the field, embedding
batches interleaved with generation on the model loop, and an encoder served for embeddings only.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import TINY, error_of, free_port, until, until_sync
from tinymodel import build_tiny_bert, greedy_continuations
from transformers import AutoModel, AutoTokenizer

from flockctl.engine.api import create_app
from flockctl.engine.config import EngineConfig
from flockctl.engine.embeddings import MAX_INPUTS
from flockctl.engine.encoder import EncoderEngine
from flockctl.engine.engine import Engine
from flockctl.engine.loader import load_engine

TEXTS = ["the quick brown fox", "hello world how are you today", "servers answer"]
TOLERANCE = 1e-4


def reference(path: Path, ids: list[int], pooling: str) -> torch.Tensor:
    """The pooled, normalized last hidden state of one input, by a plain transformers forward."""
    model = AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    pooled = {"last": hidden[-1], "cls": hidden[0], "mean": hidden.mean(dim=0)}[pooling]
    return torch.nn.functional.normalize(pooled, dim=-1)


def close_to(vector: list[float], expected: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(vector), expected, atol=TOLERANCE, rtol=0)


async def embed(client: httpx.AsyncClient, **body: object) -> list[list[float]]:
    r = await client.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list"
    assert [d["index"] for d in out["data"]] == list(range(len(out["data"])))
    assert all(d["object"] == "embedding" for d in out["data"])
    return [d["embedding"] for d in out["data"]]


# -- a causal LM ---------------------------------------------------------------------------------


async def test_a_causal_lm_embeds_its_last_token_state_in_every_input_form(
    client: httpx.AsyncClient, tiny: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = [tokenizer.encode(t) for t in TEXTS]
    expected = [reference(tiny, i, "last") for i in ids]

    [one] = await embed(client, model=TINY, input=TEXTS[0])
    assert close_to(one, expected[0])
    assert len(one) == 64 and abs(sum(x * x for x in one) - 1) < 1e-5
    several = await embed(client, input=TEXTS)
    assert all(close_to(v, e) for v, e in zip(several, expected, strict=True))
    [from_ids] = await embed(client, input=ids[1])
    assert close_to(from_ids, expected[1])
    batch = await embed(client, input=ids)
    assert all(close_to(v, e) for v, e in zip(batch, expected, strict=True))

    r = await client.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    for item, e in zip(r.json()["data"], expected, strict=True):
        raw = base64.b64decode(item["embedding"])
        assert close_to(list(struct.unpack(f"<{len(raw) // 4}f", raw)), e)
    usage = r.json()["usage"]
    assert usage == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}


async def test_bad_embedding_requests_get_400s_naming_the_field(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    too_long = [5] * (engine.max_model_len + 1)
    cases = [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": [[3, 4], []]}, "input[1]"),
        ({"input": too_long}, "input"),
        ({"input": [[3], too_long]}, "input[1]"),
        ({"input": [3, engine.vocab_size]}, "input"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "input"),
        ({"input": "hi", "dimensions": 16}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": ["a", 1]}, "input"),
        ({}, "input"),
    ]
    for body, field in cases:
        error = error_of(await client.post("/v1/embeddings", json=body), 400)
        assert error["param"] == field, (body, error)
    assert error_of(await client.post("/v1/embeddings", json={"input": "x", "model": "no"}), 404)
    refused = await client.post("/v1/embeddings", json={"input": "hi", "dimensions": 16})
    assert "fixed size (64)" in error_of(refused, 400)["message"]
    [still] = await embed(client, input="the engine keeps serving")
    assert len(still) == 64


async def test_embeddings_interleave_with_generation_on_the_model_loop(
    client: httpx.AsyncClient, engine: Engine, tiny: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    greedy = greedy_continuations(tiny, prompts, 24)
    expected = [reference(tiny, p, "last") for p in prompts]
    before = engine.stats()
    generated = before["tokens_generated"]

    async def complete(prompt: list[int]) -> str:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def embeddings_while_decoding() -> list[list[list[float]]]:
        # wait until decoding is under way, then embed between its iterations
        while engine.model_loop.tokens_generated == generated:
            await asyncio.sleep(0.005)
        return [await embed(client, input=prompts) for _ in range(6)]

    *texts, rounds = await asyncio.gather(*map(complete, prompts), embeddings_while_decoding())
    assert texts == [tokenizer.decode(g, skip_special_tokens=True) for g in greedy]
    for vectors in rounds:
        assert all(close_to(v, e) for v, e in zip(vectors, expected, strict=True))
    stats = engine.stats()["embeddings"]
    assert stats["requests"] - before["embeddings"]["requests"] == 6
    assert stats["inputs"] - before["embeddings"]["inputs"] == 18
    assert stats["waiting"] == 0
    # embedding inputs are no jobs: generation counted only the completions' tokens
    assert engine.stats()["tokens_generated"] - generated == 3 * 24


async def test_mean_pooling_is_the_mean_of_the_inputs_states(tiny: Path) -> None:
    engine = load_engine(
        EngineConfig(model=str(tiny), device="cpu", pooling="mean", max_batch_size=2),
        progress=False,
    )
    try:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            tokenizer = AutoTokenizer.from_pretrained(tiny)
            vectors = await embed(client, input=TEXTS)
        for text, vector in zip(TEXTS, vectors, strict=True):
            assert close_to(vector, reference(tiny, tokenizer.encode(text), "mean"))
    finally:
        engine.close()


# -- an encoder model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tiny, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def encoder(bert: Path) -> Iterator[EncoderEngine]:
    engine = load_engine(
        EngineConfig(model=str(bert), served_model_name="bert", device="cpu"), progress=False
    )
    assert isinstance(engine, EncoderEngine)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
async def bert_client(encoder: EncoderEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(encoder))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
        yield c


async def test_an_encoder_is_served_as_an_embedding_model(
    bert_client: httpx.AsyncClient, bert: Path
) -> None:
    [card] = (await bert_client.get("/v1/models")).json()["data"]
    assert card["id"] == "bert" and card["capabilities"] == ["embed"]
    assert card["max_model_len"] == 128
    tokenizer = AutoTokenizer.from_pretrained(bert)
    vectors = await embed(bert_client, input=TEXTS)
    for text, vector in zip(TEXTS, vectors, strict=True):
        assert close_to(vector, reference(bert, tokenizer.encode(text), "cls"))
    assert (await bert_client.get("/health")).json()["status"] == "ok"
    stats = (await bert_client.get("/stats")).json()
    assert stats["capabilities"] == ["embed"] and stats["embeddings"]["inputs"] >= 3
    metrics = await bert_client.get("/metrics")
    assert metrics.status_code == 200 and "flockctl_num_requests_running" in metrics.text


async def test_an_encoder_cuts_to_the_dimensions_it_was_trained_for(
    bert_client: httpx.AsyncClient,
) -> None:
    [full] = await embed(bert_client, input=TEXTS[0])
    [short] = await embed(bert_client, input=TEXTS[0], dimensions=8)
    head = torch.nn.functional.normalize(torch.tensor(full[:8]), dim=-1)
    assert len(short) == 8 and close_to(short, head)
    body = {"input": "hi", "dimensions": 5}
    error = error_of(await bert_client.post("/v1/embeddings", json=body), 400)
    assert error["param"] == "dimensions" and "8, 16" in error["message"]


async def test_an_embedding_model_refuses_generation_naming_why(
    bert_client: httpx.AsyncClient,
) -> None:
    for route, body in (
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/generate", {"inputs": "hi"}),
        ("/generate_stream", {"inputs": "hi"}),
    ):
        error = error_of(await bert_client.post(route, json=body), 400)
        assert error["param"] == "model" and "embedding model" in error["message"], route
    tokens = (await bert_client.post("/tokenize", json={"prompt": "hello world"})).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert "/v1/embeddings" in (await bert_client.get("/openapi.json")).json()["paths"]


@pytest.mark.e2e
def test_serve_answers_the_openai_clients_embeddings_with_the_pooling_asked(tiny: Path) -> None:
    import openai

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flockctl.engine.cli", "serve", "--model", str(tiny),
         "--served-model-name", TINY, "--device", "cpu", "--port", str(port),
         "--pooling", "mean"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        until_sync(healthy, "the engine to answer /health", 120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = client.embeddings.create(model=TINY, input=TEXTS)  # base64 on the wire
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    for text, item in zip(TEXTS, out.data, strict=True):
        assert close_to(item.embedding, reference(tiny, tokenizer.encode(text), "mean"))
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_an_embedding_waiting_when_the_model_loop_dies_is_failed_not_left_hanging(
    tiny: Path,
) -> None:
    config = EngineConfig(model=str(tiny), served_model_name=TINY, device="cpu")
    engine = load_engine(config, progress=False)
    try:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            held, release = threading.Event(), threading.Event()

            def hold_then_crash() -> None:
                held.set()
                release.wait(timeout=60)
                raise RuntimeError("a planted fault")

            # the loop's thread is busy in the planted call when the embedding arrives, so the
            # embedding's batch is still waiting on that thread when it dies
            engine.model_loop.run_soon(hold_then_crash)
            assert await asyncio.to_thread(held.wait, 60)
            request = asyncio.ensure_future(client.post("/v1/embeddings", json={"input": "hi"}))
            await until(lambda: engine.embedder.stats()["waiting"] == 1, "the input to queue")
            release.set()
            r = await asyncio.wait_for(request, timeout=60)
            assert "a planted fault" in error_of(r, 503)["message"]
    finally:
        engine.close()
