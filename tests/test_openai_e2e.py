"""End to end: the official ``openai`` client through a real balancer (``flockctl up``) in front of
two real engine workers on a tiny model: ids unique over the deployment and ``/jobs/{id}``
answered by the worker that holds each job, ``seed`` giving the same text on either worker and
in any batch, every OpenAI parameter streamed and not, and bad input refused naming the field
while serving goes on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from cli_driver import flockctl, processes_with
from conftest import free_port, until, until_sync
from tinymodel import build_tiny_model

pytestmark = pytest.mark.e2e

PROMPT = "the quick brown fox"


@dataclass
class Deployment:
    url: str
    model: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """``flockctl up`` with two engine workers on a tiny model, for the whole module."""
    root = tmp_path_factory.mktemp("openai-e2e")
    tiny = build_tiny_model(root / "tiny-model-for-openai-e2e")
    home = root / "home"
    port = free_port()
    saved = os.environ.get("FLOCKCTL_HOME")
    os.environ["FLOCKCTL_HOME"] = str(home)

    def run(*args: str) -> Any:
        os.environ["FLOCKCTL_HOME"] = str(home)
        return flockctl(*args)

    try:
        result = run(
            "up",
            "--port",
            str(port),
            "--model",
            str(tiny),
            "--engine-args",
            "--device cpu --max-batch-size 4",
            "--min-workers",
            "2",
            "--max-workers",
            "2",
            "--probe-interval",
            "0.2",
            "--initial-delay",
            "120",
        )
        assert result.code == 0, result.err

        def both_ready() -> bool:
            snap = run("status", "--json").json()
            engines = [w for w in snap["workers"] if w["state"] == "READY" and w.get("engine")]
            return len(engines) == 2 and all(w["engine"].get("instance") for w in engines)

        until_sync(both_ready, "two READY engine workers with their stats", 120)
        yield Deployment(f"http://127.0.0.1:{port}", str(tiny))
    finally:
        run("down", "--timeout", "30")
        if saved is None:
            os.environ.pop("FLOCKCTL_HOME", None)
        else:
            os.environ["FLOCKCTL_HOME"] = saved
    assert until_sync(lambda: not processes_with(tiny), "engine workers to exit", 10)


@pytest.fixture
async def oai(deployment: Deployment) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def http(deployment: Deployment) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=deployment.url, timeout=60) as client:
        yield client


def instance(response_id: str) -> str:
    return response_id.rpartition("-")[2][:6]


async def test_ids_are_unique_and_jobs_answer_through_the_balancer(
    deployment: Deployment, oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with limit:
            if i % 2:
                r = await oai.chat.completions.create(
                    model=deployment.model,
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=2,
                )
            else:
                r = await oai.completions.create(
                    model=deployment.model, prompt=PROMPT, max_tokens=2
                )
            return r.id

    ids = await asyncio.gather(*(one(i) for i in range(200)))
    assert len(set(ids)) == 200
    assert len({instance(i) for i in ids}) == 2  # both workers answered

    async def job(response_id: str) -> dict[str, Any]:
        async with limit:
            r = await http.get(f"/jobs/{response_id}")
        assert r.status_code == 200, (response_id, r.text)
        return r.json()

    jobs = await asyncio.gather(*(job(i) for i in ids))
    assert [j["id"] for j in jobs] == [i.rpartition("-")[2] for i in ids]
    assert all(j["state"] == "finished" for j in jobs)

    missing = await http.get(f"/jobs/cmpl-{instance(ids[0])}0000000000000000")
    assert missing.status_code == 404  # the right worker, which never had that job
    for unknown in ("cmpl-zzzzzz0000000000000000", "nothing"):
        r = await http.get(f"/jobs/{unknown}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "job_not_found"  # the balancer's own answer


async def test_a_seed_gives_the_same_text_on_both_workers_in_any_batch(
    deployment: Deployment, oai: openai.AsyncOpenAI
) -> None:
    seeded = {"model": deployment.model, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0}
    seeded |= {"seed": 99, "extra_body": {"ignore_eos": True}}
    noise = {"model": deployment.model, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
    results = []
    for crowd in (0, 2, 7):
        batch = await asyncio.gather(
            *(oai.completions.create(**seeded) for _ in range(4)),
            *(oai.completions.create(prompt=f"hello {i}", **noise) for i in range(crowd)),
        )
        results += batch[:4]
    assert len({instance(r.id) for r in results}) == 2  # both workers ran the seeded request
    assert len({r.choices[0].text for r in results}) == 1
    unseeded = {k: v for k, v in seeded.items() if k != "seed"}
    texts = await asyncio.gather(*(oai.completions.create(**unseeded) for _ in range(8)))
    assert len({r.choices[0].text for r in texts}) > 1  # no seed: the workers do not agree


PARAMETERS: list[dict[str, Any]] = [
    {"prompt": [PROMPT, "hello world"]},
    {"n": 3, "seed": 1},
    {"logprobs": 2},
    {"echo": True, "logprobs": 1},
    {"presence_penalty": 1.0, "frequency_penalty": 0.5},
    {"logit_bias": {"5": 10}},
    {"user": "alice"},
    {"extra_body": {"repetition_penalty": 1.2, "min_tokens": 3, "stop_token_ids": [2]}},
    {"extra_body": {"max_completion_tokens": 3, "top_k": 5, "ignore_eos": True}},
    {"stop": ["\n"], "top_p": 0.9, "temperature": 0.7},
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_every_completion_parameter_through_the_balancer(
    deployment: Deployment, oai: openai.AsyncOpenAI, stream: bool
) -> None:
    for params in PARAMETERS:
        kw: dict[str, Any] = {"model": deployment.model, "prompt": PROMPT, "max_tokens": 6}
        kw |= params
        if stream:
            chunks = [c async for c in await oai.completions.create(stream=True, **kw)]
            indices = {ch.index for c in chunks for ch in c.choices}
            scored = [ch.logprobs for c in chunks for ch in c.choices if ch.logprobs]
        else:
            r = await oai.completions.create(**kw)
            indices = {ch.index for ch in r.choices}
            scored = [ch.logprobs for ch in r.choices if ch.logprobs]
        expected = len(kw["prompt"]) if isinstance(kw["prompt"], list) else kw.get("n", 1)
        assert indices == set(range(expected)), params
        assert bool(scored) == ("logprobs" in kw), params


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_chat_parameters_through_the_balancer(
    deployment: Deployment, oai: openai.AsyncOpenAI, stream: bool
) -> None:
    kw: dict[str, Any] = {
        "model": deployment.model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_completion_tokens": 5,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "presence_penalty": 0.5,
        "seed": 4,
        "user": "bob",
    }
    if stream:
        got: dict[int, int] = {}
        async for chunk in await oai.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                if ch.logprobs:
                    got[ch.index] = got.get(ch.index, 0) + len(ch.logprobs.content)
        assert set(got) == {0, 1}
    else:
        r = await oai.chat.completions.create(**kw)
        assert [c.index for c in r.choices] == [0, 1]
        assert all(len(c.logprobs.content[0].top_logprobs) == 3 for c in r.choices)


async def test_bad_input_is_a_400_naming_the_field_and_serving_goes_on(
    deployment: Deployment, oai: openai.AsyncOpenAI
) -> None:
    for extra, param in (
        ({"n": 99}, "n"),
        ({"logprobs": 30}, "logprobs"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"logit_bias": {"-4": 1}}, "logit_bias"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.completions.create(model=deployment.model, prompt=PROMPT, **extra)
        assert caught.value.body["param"] == param  # type: ignore[index]

    async def serves() -> bool:
        r = await oai.completions.create(model=deployment.model, prompt=PROMPT, max_tokens=2)
        return r.usage.completion_tokens == 2

    assert await until(serves, "the engines to serve after bad input")
