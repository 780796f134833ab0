"""Chunked prefill on a tiny real model: a prompt longer than an iteration's token budget is fed
in chunks across iterations, beside the jobs already decoding, and every job's greedy output stays
what a plain one-sequence loop gives; a half-prefilled job swapped out or dropped resumes right."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import before_forwards, hold_first_decode, until
from tinymodel import greedy_continuations
from transformers import AutoTokenizer

from flockctl.engine import loop
from flockctl.engine.batcher import Plan
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.loader import load_engine

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
TEXTS = [
    "tokens stream out one by one and the scheduler picks jobs from queues",
    "memory holds keys and values for every sequence until the job is done",
    "a flock of birds",
    "servers answer requests in batches while quiet hills",
]


@pytest.fixture(scope="module")
def prompts(tiny: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    encoded = [tokenizer.encode(t) for t in TEXTS]
    # and one long prompt: every text in turn, three times over
    return [*encoded, [t for _ in range(3) for e in encoded for t in e]]


@pytest.fixture(scope="module")
def reference(tiny: Path, prompts: list[list[int]]) -> list[list[int]]:
    return greedy_continuations(tiny, prompts, GREEDY.max_tokens)


@contextlib.contextmanager
def make_engine(tiny: Path, **kw: object) -> Iterator[Engine]:
    engine = load_engine(EngineConfig(model=str(tiny), device="cpu", **kw), progress=False)
    try:
        yield engine
    finally:
        engine.close()


def record_plans(engine: Engine) -> list[tuple[dict[str, int], list[Job]]]:
    """Every iteration's chunks and batch, as the batcher plans them."""
    seen: list[tuple[dict[str, int], list[Job]]] = []
    plan = engine.batcher.plan

    def recorded(order: list[Job]) -> Plan:
        result = plan(order)
        seen.append((dict(result.chunks), list(result.batch)))
        return result

    engine.batcher.plan = recorded  # type: ignore[method-assign]
    return seen


async def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    handle = engine.submit(prompt, params)
    ids: list[int] = []
    async for delta in handle:
        ids.extend(delta.token_ids)
    return ids


async def test_a_long_prompt_is_fed_in_chunks_beside_running_decodes(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long = prompts[-1]
    assert len(long) > 40
    with make_engine(
        tiny, max_batch_size=4, max_num_batched_tokens=12, prefix_caching=False
    ) as engine:
        plans = record_plans(engine)
        # the model loop waits before the first job's first decode until the long prompt is in
        # its inbox: a fast forward would otherwise finish the first job before it arrives
        decoding, arrived = hold_first_decode(engine, monkeypatch)
        first = asyncio.ensure_future(
            run(engine, prompts[0], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
        )
        await until(decoding.is_set, "the first job to be decoding")
        second = asyncio.ensure_future(run(engine, long))
        await until(lambda: bool(engine.model_loop._inbox), "the long prompt in the inbox")
        arrived.set()
        assert await second == reference[-1]
        decoded = await first
        assert decoded[: GREEDY.max_tokens] == reference[0]
        chunked = [
            batch
            for chunks, batch in plans
            if any(j.id in chunks and j.prompt_ids == long for j in batch)
        ]
        # twelve tokens an iteration, one of them the running decode's: the long prompt's
        # prefill took eleven tokens an iteration, each beside the decoding job (the last
        # iteration feeds what is left whole)
        assert len(chunked) >= len(long) // 11 - 1
        assert all(len(batch) == 2 for batch in chunked)
        assert all(sum(chunks.values()) <= 12 for chunks, _ in plans)
        assert engine.stats()["max_batch_size"] == 4


@pytest.mark.parametrize("host", [None, 0], ids=["swap", "recompute"])
async def test_chunked_and_whole_prefills_agree_under_kv_pressure(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    host: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with make_engine(
        tiny,
        max_batch_size=4,
        max_num_batched_tokens=8,
        kv_budget=192,
        host_kv_budget=host,
    ) as engine:
        halfway: list[int] = []
        evict = engine.batcher._evict

        def evict_and_note(job: Job, plan: Plan) -> None:
            if job.needs_prefill and job.cached_tokens:
                halfway.append(job.cached_tokens)
            evict(job, plan)

        engine.batcher._evict = evict_and_note  # type: ignore[method-assign]
        # the model loop's clock ticks a millisecond a reading, and the short prompts arrive
        # together while the long one is halfway in: the MLFQ's quanta, and with them which
        # jobs the budget holds at each step, are then the same on any machine
        ticks = itertools.count()
        clock = types.SimpleNamespace(
            monotonic=lambda: next(ticks) / 1000, perf_counter=lambda: next(ticks) / 1000
        )
        monkeypatch.setattr(loop, "time", clock)
        long = prompts[-1]
        halfway_in, submitted = threading.Event(), threading.Event()

        def held(jobs: list[Job]) -> None:
            if not submitted.is_set() and any(
                j.prompt_ids == long and j.cached_tokens >= len(long) // 2 for j in jobs
            ):
                halfway_in.set()
                submitted.wait(30)

        before_forwards(engine, held, monkeypatch)
        first = asyncio.ensure_future(run(engine, long))
        await until(halfway_in.is_set, "the long prompt halfway in")
        runs = asyncio.gather(*(run(engine, p) for p in prompts[:-1]))
        await until(lambda: len(engine.model_loop._inbox) == len(prompts) - 1, "every prompt")
        submitted.set()
        results = [*await runs, await first]
        assert results == reference
        assert halfway, "no job was evicted halfway through its prefill"
        assert engine.stats()["kv"]["used_tokens"] == 0


async def test_auto_sizes_are_chosen_and_shown(tiny: Path) -> None:
    with make_engine(tiny, kv_budget=8192, max_model_len=256) as engine:
        stats = engine.stats()
        assert stats["max_batch_size"] == 32  # 8192 KV tokens hold 32 jobs of 256
        assert engine.config.max_num_batched_tokens == 256
        assert engine.batcher.max_batch_size == 32


def test_the_token_budget_must_cover_the_batch() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_batch_size=16, max_num_batched_tokens=8)
