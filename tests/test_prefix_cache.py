"""Prefix caching: block keys and matching, reference counts through finish, drop, preemption and
swap, LRU eviction only under pressure (a CPU KV pool and hand-made jobs, blocks of 4 tokens, no
model), then on a tiny real model: greedy output identical with it on and off, under KV pressure
and with speculation, and the counters of /stats and /metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port, until_sync
from tinymodel import build_near_model, greedy_continuations
from transformers import AutoTokenizer

from flockctl.engine import loop as loop_module
from flockctl.engine.batcher import Batcher, Plan
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.handle import JobHandle
from flockctl.engine.job import Job, JobState, Preemption, SamplingParams
from flockctl.engine.kv import KVPool
from flockctl.engine.loader import load_engine
from flockctl.engine.prefix_cache import block_keys
from flockctl.exitcodes import ExitCode

BLOCK = 4


def batcher(budget: int, host: int | None = None, batch: int = 4, cache: bool = True) -> Batcher:
    pool = KVPool(
        1,
        budget,
        torch.device("cpu"),
        torch.float32,
        BLOCK,
        host_budget_tokens=host,
        prefix_caching=cache,
    )
    pool._ensure_layer(0, heads=1, dim=1)
    return Batcher(pool, batch)


def job(tokens: list[int], max_tokens: int = 16) -> Job:
    return Job(list(tokens), SamplingParams(max_tokens=max_tokens))


def write_kv(pool: KVPool, j: Job) -> None:
    """What a forward does to the cache: each uncached token's "keys" at its slot (here the
    token id itself, so a slot shows which token it holds), refusing to write a shared block."""
    seq = j.prompt_ids + j.output_ids
    pool._zero_fresh()  # as KVPool.view does before a forward
    pool.check_private(j.id, j.cached_tokens)
    table = pool.tables[j.id]
    for position in range(j.cached_tokens, len(seq)):
        slot = table[position // BLOCK] * BLOCK + position % BLOCK
        pool.keys[0][slot] = seq[position]  # type: ignore[index]
        pool.values[0][slot] = -seq[position]  # type: ignore[index]


def held(pool: KVPool, j: Job) -> list[int]:
    """The token ids the job's cache holds, read back from its blocks."""
    table = pool.tables[j.id]
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(j.cached_tokens)]
    return [int(pool.keys[0][s]) for s in slots]  # type: ignore[index]


def run(b: Batcher, order: list[Job], finished: tuple[Job, ...] = ()) -> Plan:
    """One iteration: plan, write each batched job's KV and one token out, finish ``finished``."""
    plan = b.plan(order)
    for j in plan.batch:
        write_kv(b.pool, j)
        b.mark_cached(j, j.total_tokens)
        j.output_ids.append(100 + len(j.output_ids))
    for j in finished:
        j.state = JobState.FINISHED
        b.release(j)
    b.end_iteration([j for j in order if j not in finished], plan)
    return plan


SYSTEM = list(range(1, 13))  # three full blocks


# -- keys ----------------------------------------------------------------------------------------


def test_a_block_key_names_the_whole_prefix_up_to_the_block_end() -> None:
    keys = block_keys([*SYSTEM, 50, 51], BLOCK)
    assert len(keys) == 3  # the partial block has no key: it is still being written
    assert block_keys(SYSTEM, BLOCK) == keys
    assert block_keys([*SYSTEM[:8], 99, *SYSTEM[9:]], BLOCK)[:2] == keys[:2]
    # one token changed in the first block changes every key after it, not only the first
    changed = block_keys([0, *SYSTEM[1:]], BLOCK)
    assert all(a != b for a, b in zip(changed, keys, strict=True))
    # the same tokens after a different prefix are a different block
    assert block_keys([*SYSTEM[4:8], *SYSTEM[4:8]], BLOCK)[1] != keys[1]
    # computed a block at a time, chained from the last key, they are the same keys
    assert block_keys(SYSTEM, BLOCK, start=2, parent=keys[1]) == keys[2:]


# -- matching and reference counts -----------------------------------------------------------------


def test_a_new_job_shares_the_cached_prefix_and_computes_only_the_rest() -> None:
    b = batcher(64)
    first = job([*SYSTEM, 20, 21])
    run(b, [first])
    run(b, [first], finished=(first,))
    assert b.pool.used_tokens == 0 and len(b.pool.prefix) == 3  # kept, idle, for later jobs
    second = job([*SYSTEM[:8], 30, 31, 32, 33, 34])
    plan = b.plan([second])
    assert plan.batch == [second]
    assert second.cached_tokens == 8 and second.needs_prefill  # starts after two shared blocks
    prefix = b.pool.prefix
    assert prefix.queries == len(first.prompt_ids) + len(second.prompt_ids)
    assert prefix.hits == 8
    write_kv(b.pool, second)
    b.mark_cached(second, second.total_tokens)
    assert held(b.pool, second) == second.prompt_ids


def test_a_job_that_scores_its_prompt_computes_all_of_it() -> None:
    b = batcher(64)
    run(b, [first := job(SYSTEM)])
    scoring = Job(list(SYSTEM), SamplingParams(max_tokens=4, prompt_logprobs=1))
    b.plan([first, scoring])  # echo needs the logits of every prompt position
    assert scoring.cached_tokens == 0 and b.pool.tables[scoring.id][0] != b.pool.tables[first.id][0]


def test_a_job_always_computes_its_last_token() -> None:
    b = batcher(64)
    run(b, [first := job(SYSTEM)], finished=())
    same = job(SYSTEM)  # every block cached, but the forward must yield its next token's logits
    b.plan([first, same])
    assert same.cached_tokens == 8 and same.needs_prefill
    longer = job([*SYSTEM, 40])  # one token past three cached blocks: a decode step at once
    b.plan([first, same, longer])
    assert longer.cached_tokens == 12 and not longer.needs_prefill


def test_running_jobs_share_blocks_and_references_follow_finish() -> None:
    b = batcher(64)
    a = job([*SYSTEM, 20])
    run(b, [a])  # a's three full blocks are named as soon as its forward wrote them
    c = job([*SYSTEM, 30])
    run(b, [a, c])
    shared = b.pool.tables[a.id][:3]
    assert b.pool.tables[c.id][:3] == shared
    assert [b.pool.refs[x] for x in shared] == [2, 2, 2]
    assert b.pool.tables[a.id][3] != b.pool.tables[c.id][3]  # the partial blocks are their own
    run(b, [a, c], finished=(a,))
    assert [b.pool.refs[x] for x in shared] == [1, 1, 1]
    assert held(b.pool, c)[:12] == SYSTEM
    run(b, [c], finished=(c,))
    assert [b.pool.refs[x] for x in shared] == [0, 0, 0]
    assert not set(shared) & set(b.pool.free)  # idle in the cache, not free
    assert set(shared) <= set(b.pool.prefix.idle)


def test_a_dropped_job_gives_back_only_its_references_and_finds_its_prefix_again() -> None:
    b = batcher(24, host=0, batch=1)  # 6 blocks, no host room: eviction drops
    a = job([*SYSTEM, 20])
    run(b, [a])
    c = job([*SYSTEM, 30])
    run(b, [c, a])  # c shares a's three blocks; a is descheduled, its cache stays
    shared = b.pool.tables[a.id][:3]
    assert a.state == JobState.PREEMPTED and b.pool.refs[shared[0]] == 2
    big = job(list(range(60, 68)))  # a's cache must go; its shared blocks stay with c
    plan = run(b, [big, c, a])
    assert plan.dropped == [a] and a.cached_tokens == 0
    assert [b.pool.refs[x] for x in shared] == [1, 1, 1]  # c still holds them
    assert held(b.pool, c)[:12] == SYSTEM
    run(b, [big], finished=(big,))
    hits = b.pool.prefix.hits
    plan = run(b, [a, c])  # a runs again: its prefix is shared again, not recomputed
    assert a in plan.batch and b.pool.prefix.hits == hits + 12
    assert b.pool.tables[a.id][:3] == shared
    assert held(b.pool, a) == a.prompt_ids + a.output_ids[:-1]


def test_a_swapped_job_keeps_a_whole_copy_and_never_frees_a_shared_block() -> None:
    b = batcher(32, host=64, batch=1)  # 8 blocks
    a = job([*SYSTEM, 20])
    c = job([*SYSTEM, 30])
    run(b, [a])
    run(b, [c, a])
    shared = b.pool.tables[a.id][:3]
    big = job(list(range(60, 73)))  # four blocks, three free: a's cache moves out
    plan = run(b, [big, c, a])
    assert plan.swapped_out == [a] and a.state == JobState.SWAPPED
    assert a.preemptions[Preemption.DESCHEDULED] == 1
    assert b.pool.host[a.id].tokens == a.cached_tokens == 13  # the shared part copied too
    assert [b.pool.refs[x] for x in shared] == [1, 1, 1]  # c's, untouched
    assert not set(shared) & set(b.pool.free)
    run(b, [c, big], finished=(big,))
    swaps_in = b.pool.swap_ins
    plan = run(b, [a, c])
    assert plan.swapped_in == [a] and b.pool.swap_ins == swaps_in + 1
    assert b.pool.tables[a.id][:3] == shared  # still cached: shared again, not copied
    assert held(b.pool, a) == a.prompt_ids + a.output_ids[:-1]
    assert [b.pool.refs[x] for x in shared] == [2, 2, 2]


def test_a_swapped_job_whose_prefix_was_evicted_gets_it_back_from_its_copy() -> None:
    b = batcher(20, host=64, batch=1)  # 5 blocks
    a = job([*SYSTEM, 20])
    run(b, [a])
    big = job(list(range(60, 76)))  # four blocks: a's cache moves out, its prefix is evicted
    run(b, [big, a])
    assert a.state == JobState.SWAPPED
    run(b, [big], finished=(big,))
    assert b.pool.prefix.match(block_keys(SYSTEM, BLOCK)) == []  # big took those blocks
    plan = run(b, [a])
    assert plan.swapped_in == [a]
    assert held(b.pool, a) == a.prompt_ids + a.output_ids[:-1]


def test_a_job_that_does_not_fit_gives_its_shared_blocks_back() -> None:
    b = batcher(20, batch=2)  # 5 blocks
    a = job([*SYSTEM, 20])
    run(b, [a])
    shared = b.pool.tables[a.id][:3]
    wide = job([*SYSTEM, *range(30, 40)])  # shares three blocks, needs three more: one is free
    queries = b.pool.prefix.queries
    plan = b.plan([a, wide])
    assert plan.batch == [a]
    assert wide.state == JobState.WAITING and wide.cached_tokens == 0
    assert not b.pool.resident(wide.id)
    assert [b.pool.refs[x] for x in shared] == [1, 1, 1]
    assert b.pool.prefix.queries == queries  # counted when a lookup admits a job, not per try


def test_a_shared_block_is_never_written() -> None:
    b = batcher(64)
    a = job([*SYSTEM, 20])
    run(b, [a])
    c = job([*SYSTEM, 30])
    b.plan([a, c])
    with pytest.raises(RuntimeError, match="holds a cached prefix"):
        b.pool.check_private(c.id, 11)  # a write into the third shared block
    with pytest.raises(RuntimeError, match="holds a cached prefix"):
        b.pool.move(c.id, [(13, 11)])  # a speculative path kept into a shared block
    b.pool.check_private(c.id, 12)  # its own partial block is its own to write


# -- eviction -----------------------------------------------------------------------------------


def test_cached_blocks_are_evicted_only_for_room_least_recently_used_first() -> None:
    b = batcher(40)  # 10 blocks
    old = job([*SYSTEM, 20])
    run(b, [old], finished=(old,))
    recent = job([*range(40, 52), 21])
    run(b, [recent], finished=(recent,))
    assert len(b.pool.prefix) == 6 and b.pool.available == 10
    small = job([70, 71, 72])  # one block: the free ones are enough, nothing evicted
    run(b, [small])
    assert len(b.pool.prefix) == 6 and b.pool.prefix.evictions == 0
    big = job(list(range(80, 101)))  # six blocks, three free: three come from the cache
    run(b, [small, big])
    assert b.pool.prefix.evictions == 3
    # the older prefix went, tail first; the recent one is whole
    assert len(b.pool.prefix.match(block_keys(range(40, 52), BLOCK))) == 3
    assert b.pool.prefix.match(block_keys(SYSTEM, BLOCK)) == []


def test_a_hit_refreshes_a_prefix_so_it_outlives_newer_ones() -> None:
    b = batcher(32)  # 8 blocks
    system = job([*SYSTEM, 20])
    run(b, [system], finished=(system,))
    other = job([*range(40, 52), 21])
    run(b, [other], finished=(other,))
    again = job([*SYSTEM, 22])  # uses the older prefix again
    run(b, [again], finished=(again,))
    big = job(list(range(80, 93)))  # four blocks, two free: two evicted
    run(b, [big])
    assert len(b.pool.prefix.match(block_keys(SYSTEM, BLOCK))) == 3
    assert len(b.pool.prefix.match(block_keys(range(40, 52), BLOCK))) == 1


def test_with_prefix_caching_off_nothing_is_kept() -> None:
    b = batcher(64, cache=False)
    first = job([*SYSTEM, 20])
    run(b, [first], finished=(first,))
    second = job([*SYSTEM, 21])
    b.plan([second])
    assert b.pool.prefix is None and second.cached_tokens == 0
    assert len(b.pool.free) == b.pool.num_blocks - 1 - 4


# -- on a tiny real model ----------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SYSTEM_TEXT = (
    "the scheduler picks jobs from queues that never starve while servers answer requests in"
    " batches and memory holds keys and values for every sequence until the job is done"
)
QUESTIONS = ["hello", "the quick brown fox", "a flock of birds", "tokens stream out one by one"]


@pytest.fixture(scope="module")
def prompts(tiny: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return [tokenizer.encode(f"{SYSTEM_TEXT} {q}") for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(tiny: Path, prompts: list[list[int]]) -> list[list[int]]:
    return greedy_continuations(tiny, prompts, GREEDY.max_tokens)


def make_engine(tiny: Path, **kw: object) -> Iterator[Engine]:
    engine = load_engine(EngineConfig(model=str(tiny), device="cpu", **kw), progress=False)
    try:
        yield engine
    finally:
        engine.close()


async def collect(handle: JobHandle) -> tuple[list[int], Job]:
    ids: list[int] = []
    async for delta in handle:
        ids.extend(delta.token_ids)
    return ids, handle.job


async def generate(engine: Engine, prompt: list[int]) -> tuple[list[int], Job]:
    return await collect(engine.submit(prompt, GREEDY))


async def first_then_rest(engine: Engine, prompts: list[list[int]]) -> list[tuple[list[int], Job]]:
    """One job alone (it fills the cache), then the others at once (they share it): the model
    loop takes them in one iteration, however late this event loop gets to each."""
    first = await generate(engine, prompts[0])
    with engine.model_loop._cv:
        handles = [engine.submit(p, GREEDY) for p in prompts[1:]]
    rest = await asyncio.gather(*(collect(h) for h in handles))
    return [first, *rest]


async def test_greedy_output_is_identical_with_prefix_caching_on_and_off(
    tiny: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    assert all(len(p) > 24 for p in prompts)  # a prefix of several blocks
    for engine in make_engine(tiny, max_batch_size=4, block_size=4, prefix_caching=False):
        results = await first_then_rest(engine, prompts)
        assert [ids for ids, _ in results] == reference
        assert engine.stats()["prefix_cache"] is None
        assert b"flockctl_prefix_cache" not in engine.metrics.render()[0]
    for engine in make_engine(tiny, max_batch_size=4, block_size=4):
        results = await first_then_rest(engine, prompts)
        assert [ids for ids, _ in results] == reference
        stats = engine.stats()["prefix_cache"]
        shared = min(len(p) for p in prompts[1:]) // 4 * 4 - 4  # at least this much each
        assert stats["hits"] >= shared * (len(prompts) - 1)
        assert stats["queries"] == sum(len(p) for p in prompts)
        assert stats["hit_rate"] == round(stats["hits"] / stats["queries"], 4)
        assert stats["cached_blocks"] > 0
        assert engine.stats()["kv"]["used_tokens"] == 0  # finished: cached, idle, not in use
        text = engine.metrics.render()[0].decode()
        assert f"flockctl_prefix_cache_queries_total {float(stats['queries'])}" in text
        assert f"flockctl_prefix_cache_hits_total {float(stats['hits'])}" in text


@pytest.mark.parametrize("host_kv_budget", [None, 0], ids=["swap", "recompute"])
@pytest.mark.parametrize("steps", [1, 16], ids=["step", "runs"])
async def test_greedy_output_is_identical_under_kv_pressure(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    host_kv_budget: int | None,
    steps: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a step an iteration, caches move to make room (preemptions); with runs of decode
    steps, a job short of blocks for a whole run takes one step and the others go on."""
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # runs however slow the host
    # room for one job and a half: even sharing their prefix, caches move to make room
    budget = max(len(p) for p in prompts) + GREEDY.max_tokens + 24
    for engine in make_engine(
        tiny, max_batch_size=4, block_size=4, kv_budget=budget, host_kv_budget=host_kv_budget,
        num_scheduler_steps=steps,
    ):  # fmt: skip
        results = await first_then_rest(engine, prompts)
        assert [ids for ids, _ in results] == reference
        stats = engine.stats()
        if steps == 1:
            assert sum(stats["preemptions_total"].values()) > 0
        else:
            assert stats["decode_runs"]["runs"] > 0
        assert stats["prefix_cache"]["hits"] > 0
        assert stats["kv"]["used_tokens"] == 0 and stats["kv"]["host_tokens"] == 0


async def test_greedy_output_is_identical_with_speculation(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    near = build_near_model(tiny, tmp_path_factory.mktemp("near"))  # some drafts rejected
    for engine in make_engine(
        tiny,
        max_batch_size=4,
        block_size=4,
        draft_models=(str(near),),
        spec="on",
        spec_tree=(2, 1, 1),
    ):
        results = await first_then_rest(engine, prompts)
        assert [ids for ids, _ in results] == reference
        stats = engine.stats()
        assert stats["speculation"]["num_drafts"] > 0
        assert stats["prefix_cache"]["hits"] > 0
        assert stats["kv"]["used_tokens"] == 0


# -- the flag, end to end ----------------------------------------------------------------------


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flockctl.engine.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["on", "off"])
def test_serve_prefix_caching_flag(tiny: Path, mode: str) -> None:
    port = free_port()
    proc = serve("--model", str(tiny), "--device", "cpu", "--port", str(port),
                 "--prefix-caching", mode, "--log-level", "warning")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"{base}/health").status_code == 200
            except httpx.TransportError:
                return False

        until_sync(healthy, "the engine to answer /health", 120)
        for question in QUESTIONS[:2]:
            r = httpx.post(
                f"{base}/generate",
                json={"prompt": f"{SYSTEM_TEXT} {question}", "max_new_tokens": 2},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        stats = httpx.get(f"{base}/stats").json()["prefix_cache"]
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    if mode == "off":
        assert stats is None and "flockctl_prefix_cache" not in metrics
    else:
        assert 0 < stats["hits"] < stats["queries"] and 0 < stats["hit_rate"] < 1
        assert f"flockctl_prefix_cache_hits_total {float(stats['hits'])}" in metrics


@pytest.mark.e2e
def test_serve_refuses_a_prefix_caching_value_other_than_on_or_off() -> None:
    proc = serve("--prefix-caching", "maybe")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.USAGE
    assert "--prefix-caching" in err
