"""TGI's ``/generate_stream``: one event per token, each with its own id and text, also when a
speculative step accepts several tokens at once (a tiny real model drafting for itself)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from tinymodel import greedy_continuations
from transformers import AutoTokenizer

from flockctl.engine.api import create_app
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.loader import load_engine
from flockctl.engine.tgi_stream import TokenTexts

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def speculating(tiny: Path) -> Iterator[Engine]:
    config = EngineConfig(
        model=str(tiny), device="cpu", draft_models=(str(tiny),), spec="on", spec_tree=(1, 1, 1)
    )
    engine = load_engine(config, progress=False)
    assert isinstance(engine, Engine)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
async def client(speculating: Engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(speculating))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
        yield c


def events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(e.removeprefix("data: ")) for e in response.text.strip().split("\n\n")]


@pytest.mark.parametrize("path", ["/generate_stream", "/generate/stream"])
async def test_every_accepted_token_gets_its_own_event(
    client: httpx.AsyncClient, tiny: Path, path: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    expected = greedy_continuations(tiny, [tokenizer.encode(PROMPT)], 20)[0]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "details": True}}
    stream = events(await client.post(path, json=body))
    *pieces, last = stream
    assert [e["token"]["id"] for e in stream] == expected
    assert [e["index"] for e in stream] == list(range(1, 21))
    assert all(e["generated_text"] is None and e["details"] is None for e in pieces)
    assert "".join(e["token"]["text"] for e in stream) == last["generated_text"]
    assert last["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert last["details"]["generated_tokens"] == 20
    # speculation did accept several tokens per step, so the split was needed
    job = (await client.get(f"/jobs/{last['job_id']}")).json()
    assert job["speculation"]["mean_accepted_length"] > 1


async def test_a_stop_string_cuts_the_stream_at_the_token_that_reaches_it(
    client: httpx.AsyncClient, tiny: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    full = tokenizer.decode(greedy_continuations(tiny, [tokenizer.encode(PROMPT)], 20)[0])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "stop": [stop]}}
    stream = events(await client.post("/generate_stream", json=body))
    text = "".join(e["token"]["text"] for e in stream)
    assert text == stream[-1]["generated_text"] == full[: full.index(stop)]
    assert [e["index"] for e in stream] == list(range(1, len(stream) + 1))


def test_token_texts_give_a_split_character_to_the_token_that_completes_it(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = tokenizer.encode(" héllo")  # byte-level BPE: é is two byte tokens here
    assert [tokenizer.decode([i]) for i in ids] == [" ", "h", "\ufffd", "\ufffd", "llo"]
    texts = TokenTexts(tokenizer)
    pieces = texts.split(" héllo", ids)
    assert pieces == [" ", "h", "", "é", "llo"]  # é's first byte alone is no text yet
