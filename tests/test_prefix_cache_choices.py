"""OpenAI's ``n`` choices share their prompt's KV cache: choice 0 prefills the prompt, and the
other choices, held until then, take references to its full blocks (the prefix cache's counters
show it) and give the same tokens as with prefix caching off. Nothing is held where there is
nothing to share, and a request that ends early ends its held choices too. A tiny real model on
the CPU, its API in-process (ASGITransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import until
from tinymodel import greedy_continuations

from flockctl.engine.api import create_app
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine, QueueFull
from flockctl.engine.handle import Delta, JobHandle
from flockctl.engine.job import FinishReason, Job, SamplingParams
from flockctl.engine.loader import load_engine

BLOCK = 4
N = 4
TEXT = (
    "the scheduler picks jobs from queues that never starve while servers answer requests in"
    " batches and memory holds keys and values for every sequence until the job is done"
)


def make_engine(tiny: Path, **kw: Any) -> Iterator[Engine]:
    config = EngineConfig(model=str(tiny), device="cpu", block_size=BLOCK, max_batch_size=N, **kw)
    engine = load_engine(config, progress=False)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def cached(tiny: Path) -> Iterator[Engine]:
    yield from make_engine(tiny)


@pytest.fixture(scope="module")
def uncached(tiny: Path) -> Iterator[Engine]:
    yield from make_engine(tiny, prefix_caching=False)


async def post(engine: Engine, path: str, body: dict[str, Any]) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        return await client.post(path, json=body, timeout=120)


def jobs_of(engine: Engine, response: dict[str, Any], n: int = N) -> list[Job]:
    """The request's jobs, choice 0 first: the last ``n`` that finished (the tests send one
    request at a time), one of them choice 0's, which names the response."""
    first = response["id"].removeprefix("chatcmpl-").removeprefix("cmpl-")
    mine = list(engine.model_loop.recent.values())[-n:]
    leader = next(j for j in mine if j.id == first)
    return [leader, *(j for j in mine if j is not leader)]


def counters(engine: Engine) -> tuple[int, int]:
    stats = engine.stats()["prefix_cache"]
    return stats["queries"], stats["hits"]


async def test_choices_after_the_first_take_the_prompts_full_blocks_from_it(
    cached: Engine, uncached: Engine, tiny: Path
) -> None:
    prompt = cached.tokenizer.encode(TEXT)
    assert len(prompt) > 6 * BLOCK  # several blocks
    full = (len(prompt) - 1) // BLOCK * BLOCK  # a job computes at least its last token
    greedy = {"prompt": prompt, "n": N, "max_tokens": 8, "temperature": 0, "seed": 7,
              "ignore_eos": True}  # fmt: skip
    queries, hits = counters(cached)
    r = await post(cached, "/v1/completions", greedy)
    assert r.status_code == 200, r.text
    body = r.json()
    after = counters(cached)
    assert after[0] - queries == N * len(prompt)
    # choice 0 met an empty cache; choices 1..3 each found every full block of the prompt
    assert after[1] - hits == (N - 1) * full
    text = cached.metrics.render()[0].decode()
    assert f"flockctl_prefix_cache_hits_total {float(after[1])}" in text
    leader, *others = jobs_of(cached, body)
    assert leader.first_token is not None
    for job in others:  # held until choice 0's prefill was done
        assert job.first_scheduled is not None and job.first_scheduled >= leader.first_token
    [reference] = greedy_continuations(tiny, [prompt], 8)
    expected = cached.tokenizer.decode(reference)
    assert [c["text"] for c in body["choices"]] == [expected] * N
    assert [c["index"] for c in body["choices"]] == list(range(N))

    # sampled, each choice from its own seed: the same tokens as computing the prompt each
    sampled = {**greedy, "temperature": 1.0, "seed": 11, "max_tokens": 12}
    shared = (await post(cached, "/v1/completions", sampled)).json()
    alone = (await post(uncached, "/v1/completions", sampled)).json()
    texts = [c["text"] for c in shared["choices"]]
    assert texts == [c["text"] for c in alone["choices"]]
    assert len(set(texts)) > 1  # the choices are not copies of each other
    assert shared["usage"] == alone["usage"]
    assert uncached.stats()["prefix_cache"] is None


async def test_streamed_chat_choices_share_the_prompt_and_merge_by_index(
    cached: Engine, uncached: Engine
) -> None:
    messages = [{"role": "user", "content": f"{TEXT} and then a flock of birds flies"}]
    body = {"messages": messages, "n": N, "max_tokens": 10, "temperature": 1.0, "seed": 3,
            "ignore_eos": True}  # fmt: skip
    prompt = cached.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = prompt["input_ids"] if isinstance(prompt, Mapping) else prompt
    full = (len(ids) - 1) // BLOCK * BLOCK
    _, hits = counters(cached)
    transport = httpx.ASGITransport(app=create_app(cached))
    streamed: dict[int, str] = {}
    reasons: dict[int, str] = {}
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://engine") as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                i = choice["index"]
                streamed[i] = streamed.get(i, "") + (choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    reasons[i] = choice["finish_reason"]
    assert counters(cached)[1] - hits == (N - 1) * full
    assert reasons == dict.fromkeys(range(N), "length")
    alone = (await post(uncached, "/v1/chat/completions", body)).json()
    assert streamed == {c["index"]: c["message"]["content"] for c in alone["choices"]}


async def collect(handle: JobHandle) -> list[Delta]:
    """The job's deltas to its last (a job that never ends fails the test, not hangs it)."""

    async def deltas() -> list[Delta]:
        return [delta async for delta in handle]

    return await asyncio.wait_for(deltas(), 120)


async def test_nothing_to_share_holds_nothing(cached: Engine, uncached: Engine) -> None:
    """A prompt no longer than a block (a job computes its last token itself), a prompt to
    score (echo with logprobs, ``max_tokens`` 0), prefix caching off: every choice starts at
    once."""
    long = cached.tokenizer.encode(TEXT)
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    scored = SamplingParams(max_tokens=0, prompt_logprobs=1)
    cases = [
        (cached, long[:BLOCK], greedy),
        (cached, long, scored),
        (uncached, long, greedy),
    ]
    for engine, prompt, params in cases:
        leader = engine.submit(prompt, params)
        others = [engine.submit(prompt, params, after=leader) for _ in range(N - 1)]
        assert not any(h.held for h in others), (len(prompt), params)
        ends = await asyncio.gather(*(collect(h) for h in [leader, *others]))
        assert all(d[-1].finish_reason is FinishReason.LENGTH for d in ends)
    # one token more than a block, and the choices share that block
    leader = cached.submit(long[: BLOCK + 1], greedy)
    others = [cached.submit(long[: BLOCK + 1], greedy, after=leader) for _ in range(N - 1)]
    assert all(h.held for h in others)
    ends = await asyncio.gather(*(collect(h) for h in [leader, *others]))
    assert all(d[-1].finish_reason is FinishReason.LENGTH for d in ends)


async def test_held_choices_end_with_their_request(cached: Engine) -> None:
    prompt = cached.tokenizer.encode(f"{TEXT} once more")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    # the whole request cancelled before choice 0 has run: every choice ends, aborted
    leader = cached.submit(prompt, params)
    others = [cached.submit(prompt, params, after=leader) for _ in range(N - 1)]
    assert all(h.held for h in others)
    for handle in [leader, *others]:
        handle.cancel()
    ends = await asyncio.gather(*(collect(h) for h in others))
    assert [d[-1].finish_reason for d in ends] == [FinishReason.ABORT] * (N - 1)
    # choice 0 aborted before its first token: the held choices end with it, none hangs
    with cached.model_loop._cv:  # the model loop takes its inbox with choice 0 and its abort
        leader = cached.submit(prompt, params)
        others = [cached.submit(prompt, params, after=leader) for _ in range(N - 1)]
        leader.cancel()
    ends = await asyncio.gather(*(collect(h) for h in others))
    assert all(d[-1].finish_reason is FinishReason.ABORT for d in ends)
    assert all(leader.job.id in (d[-1].error or "") for d in ends)
    await until(lambda: not cached.model_loop.live, "the engine to hold no job")
    assert cached.stats()["kv"]["used_tokens"] == 0


async def test_held_choices_count_as_waiting(tiny: Path) -> None:
    for engine in make_engine(tiny, max_waiting=3):
        prompt = engine.tokenizer.encode(TEXT)
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        others: list[JobHandle] = []
        # the model loop takes none of them yet: however fast it runs a 4-token job, choice 0
        # is still waiting (it could have finished, and the choices would have gone in)
        with engine.model_loop._cv:
            leader = engine.submit(prompt, params)
            with pytest.raises(QueueFull):
                for _ in range(8):
                    others.append(engine.submit(prompt, params, after=leader))
        # choice 0 waits: two held choices fill the waiting room
        assert len(others) == 2 and all(h.held for h in others)
        ends = await asyncio.gather(*(collect(h) for h in [leader, *others]))
        assert all(d[-1].finish_reason is FinishReason.LENGTH for d in ends)


async def test_a_job_the_batch_just_finished_frees_no_waiting_slot(tiny: Path) -> None:
    """Between the model loop's thread ending a job (it leaves the live jobs) and ending the
    iteration (it leaves the batch's list), the job is in the batch's list only: it must not
    count against the jobs waiting, which let one request too many in."""
    for engine in make_engine(tiny, max_waiting=2):
        prompt = engine.tokenizer.encode(TEXT)
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        with engine.model_loop._cv:  # the model loop takes none of these yet
            finished = Job(list(prompt), params)  # as the batch's list holds it for a moment
            engine.batcher.running = [finished]
            taken = [engine.submit(prompt, params) for _ in range(2)]
            with pytest.raises(QueueFull, match="2 jobs are already waiting"):
                engine.submit(prompt, params)
            engine.batcher.running = []
        ends = await asyncio.gather(*(collect(h) for h in taken))
        assert all(d[-1].finish_reason is FinishReason.LENGTH for d in ends)
