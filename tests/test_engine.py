"""The engine loop on a tiny real model: batching, preemption, swap and recompute keep greedy
output identical to a plain one-sequence loop; cancel frees the cache; limits are enforced."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import before_forwards, hold_first_decode, until
from tinymodel import greedy_continuations
from transformers import AutoTokenizer

from flockctl.engine import fused_forward
from flockctl.engine import loop as loop_module
from flockctl.engine.config import EngineConfig, EngineLoadError
from flockctl.engine.device import DeviceMemory
from flockctl.engine.engine import Engine, QueueFull
from flockctl.engine.job import (
    FinishReason,
    InvalidRequest,
    Job,
    JobState,
    Preemption,
    SamplingParams,
)
from flockctl.engine.loader import load_engine
from flockctl.engine.scheduler import MLFQ
from flockctl.engine.text import TextStream

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [
    "the quick brown fox",
    "hello",
    "tokens stream out one by one and the scheduler picks jobs from queues",
    "memory holds keys and values for every sequence until the job is done",
    "a flock of birds",
    "servers answer requests in batches while quiet hills",
]


@pytest.fixture(scope="module")
def prompts(tiny: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(tiny: Path, prompts: list[list[int]]) -> list[list[int]]:
    return greedy_continuations(tiny, prompts, GREEDY.max_tokens)


def make_engine(tiny: Path, **kw: object) -> Iterator[Engine]:
    engine = load_engine(EngineConfig(model=str(tiny), device="cpu", **kw), progress=False)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def engine(tiny: Path) -> Iterator[Engine]:
    yield from make_engine(tiny, max_batch_size=8)


async def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    handle = engine.submit(prompt, params)
    pieces, ids, reason = [], [], None
    async for delta in handle:
        pieces.append(delta.text)
        ids.extend(delta.token_ids)
        reason = delta.finish_reason
    return ids, pieces, reason, handle.job


async def run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return await asyncio.gather(*(run(engine, p, params) for p in prompts))


async def test_batched_greedy_equals_one_at_a_time(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for engine in make_engine(tiny, max_batch_size=8, num_scheduler_steps=1):
        results = await run_all(engine, prompts)
        assert [r[0] for r in results] == reference
        assert max(j.iterations for *_, j in results) == GREEDY.max_tokens  # a token each
        assert engine.stats()["decode_runs"] == {"runs": 0, "steps": 0}
    # several decode steps a compiled call while every job decodes: the same tokens
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # however slow the host
    for engine in make_engine(tiny, max_batch_size=8):
        results = await run_all(engine, prompts)
        assert [r[0] for r in results] == reference
        runs = engine.stats()["decode_runs"]
        assert runs["runs"] > 0 and runs["steps"] > 2 * runs["runs"]
        assert max(j.iterations for *_, j in results) < GREEDY.max_tokens
    for engine in make_engine(tiny, max_batch_size=1, scheduler="fcfs"):
        results = await run_all(engine, prompts)
        assert [r[0] for r in results] == reference


async def test_jobs_joining_mid_flight_get_the_same_tokens(
    engine: Engine,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoding, go = hold_first_decode(engine, monkeypatch)
    longer = SamplingParams(max_tokens=8 * GREEDY.max_tokens, temperature=0, ignore_eos=True)
    first = asyncio.ensure_future(run(engine, prompts[2], longer))
    await until(decoding.is_set, "the first job to be decoding")
    others = asyncio.ensure_future(run_all(engine, prompts[3:]))
    await until(lambda: len(engine.model_loop._inbox) == len(prompts[3:]), "the others")
    go.set()
    rest = await others
    assert (await first)[0][: GREEDY.max_tokens] == reference[2]
    assert [r[0] for r in rest] == reference[3:]


async def test_a_request_posted_during_a_run_of_decode_steps_ends_it_after_one_step(
    engine: Engine,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job decoding alone runs several steps a compiled call; a request posted meanwhile ends
    the call after its current step (the loop's interrupt), the new job is prefilled in the next
    iteration, and once both decode the runs go on; both keep their greedy tokens."""
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # runs however slow the host
    decoding, go = hold_first_decode(engine, monkeypatch)
    made: list[list[int]] = []  # tokens each job got from each call
    greedy = engine.runner.greedy

    def picking(jobs: list[Job], *run: object) -> object:
        picks = greedy(jobs, *run)
        if picks is not None:
            made.append([len(tokens) for tokens in picks])
        return picks

    monkeypatch.setattr(engine.runner, "greedy", picking)
    first = asyncio.ensure_future(run(engine, prompts[2]))
    await until(decoding.is_set, "the first job to be decoding")
    second = asyncio.ensure_future(run(engine, prompts[3]))
    await until(lambda: len(engine.model_loop._inbox) == 1, "the second job")
    go.set()
    assert (await first)[0] == reference[2]
    assert (await second)[0] == reference[3]
    assert made[0] == [1]  # the held call was a run; the posted request ended it at once
    assert any(len(m) == 2 and min(m) > 1 for m in made[1:])


async def test_a_new_prompts_first_token_goes_out_before_the_decoding_forward(
    engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In an iteration that prefills a new prompt beside decoding jobs, the new job's first token
    is handed to the event loop before the decoding jobs' forward runs, not after it."""
    decoding, go = hold_first_decode(engine, monkeypatch)
    events: list[tuple[str, set[str]]] = []  # in the model loop's order
    loop, runner = engine.model_loop, engine.runner
    deliver, forward, greedy = loop._deliver, runner.forward, runner.greedy

    def delivering(deliveries: list) -> None:
        events.append(("deliver", {handle.job.id for handle, _ in deliveries}))
        deliver(deliveries)

    def forwarding(jobs: list[Job], counts: object = None) -> object:
        events.append(("forward", {job.id for job in jobs}))
        return forward(jobs, counts)

    def picking(jobs: list[Job], *run: object) -> object:  # a greedy decode step's forward
        events.append(("forward", {job.id for job in jobs}))
        picks = greedy(jobs, *run)
        if picks is None:  # declined, having fed nothing: the runner's forward comes next
            events.pop()
        return picks

    monkeypatch.setattr(loop, "_deliver", delivering)
    monkeypatch.setattr(runner, "forward", forwarding)
    monkeypatch.setattr(runner, "greedy", picking)
    longer = SamplingParams(max_tokens=8 * GREEDY.max_tokens, temperature=0, ignore_eos=True)
    first = asyncio.ensure_future(run(engine, prompts[2], longer))
    await until(decoding.is_set, "the first job to be decoding")
    new = asyncio.ensure_future(run(engine, prompts[1]))
    await until(lambda: engine.model_loop._inbox, "the new prompt")
    go.set()
    _, _, _, job = await new
    old = (await first)[3]
    # the forward that prefilled the new job, then its delivery, then the old job's decode
    # (the old job's token from the iteration before goes out during the prefill's forward)
    at = next(i for i, (kind, ids) in enumerate(events) if kind == "forward" and job.id in ids)
    after = events[at + 1 :]
    decode = next(i for i, (kind, _) in enumerate(after) if kind == "forward")
    assert ("deliver", {job.id}) in after[:decode]
    assert after[decode][1] == {old.id}


async def test_an_iterations_tokens_go_out_just_before_the_next_compiled_forward(
    engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An iteration's tokens reach the event loop just before the next iteration's compiled
    forward lets the GIL go, not at the iteration's end, where the event loop's work on every
    stream held the GIL while the loop's own Python between forwards waited for it; the last
    ones once no job is left."""
    fused = engine.runner.fused
    assert fused is not None  # a float32 Llama on a CPU, one torch thread
    events: list[str] = []
    loop = engine.model_loop
    deliver, plan, rows = loop._deliver, engine.batcher.plan, fused._rows
    verify = fused_forward._decode

    def delivering(deliveries: list) -> None:
        events.append("deliver")
        deliver(deliveries)

    def planning(order: list[Job]) -> object:
        events.append("plan")
        return plan(order)

    def computing(*args: object) -> None:
        events.append("compute")
        rows(*args)

    def verifying(*args: object) -> None:  # greedy decode steps' compiled call
        events.append("compute")
        verify(*args)

    monkeypatch.setattr(loop, "_deliver", delivering)
    monkeypatch.setattr(engine.batcher, "plan", planning)
    monkeypatch.setattr(fused, "_rows", computing)
    monkeypatch.setattr(fused_forward, "_decode", verifying)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    loop.decode_steps = 1  # one decode step an iteration
    _, ids, reason, _ = await run(engine, prompts[0], params)
    assert len(ids) == 6 and reason == FinishReason.LENGTH
    # the prefill, then each decode step with the last step's token handed over just before
    # its compiled forward, then the last token once the job is done
    assert events == ["plan", "compute", *["plan", "deliver", "compute"] * 5, "deliver"]
    # five decode steps in one compiled call: the first token goes just before it, the others
    # once the job is done
    events.clear()
    loop.decode_steps = 16
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # however slow the host
    ids, pieces, reason, _ = await run(engine, prompts[0], params)
    assert len(ids) == 6 and len(pieces) == 2 and reason == FinishReason.LENGTH
    assert events == ["plan", "compute", "plan", "deliver", "compute", "deliver"]
    assert engine.stats()["decode_runs"] == {"runs": 1, "steps": 5}


@pytest.mark.parametrize("host_kv_budget", [None, 0], ids=["swap", "recompute"])
async def test_kv_pressure_keeps_greedy_output_identical(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    host_kv_budget: int | None,
) -> None:
    # 96 tokens of device KV for six jobs of up to ~40 tokens each: caches must move. A step an
    # iteration: in runs of several, a job short of blocks for the run takes one step instead,
    # and whether any cache moves depends on when the jobs arrive (test_prefix_cache.py runs
    # them under pressure)
    for engine in make_engine(
        tiny, max_batch_size=6, kv_budget=96, host_kv_budget=host_kv_budget, scheduler="mlfq",
        num_scheduler_steps=1,
    ):  # fmt: skip
        results = await run_all(engine, prompts)
        assert [r[0] for r in results] == reference
        stats = engine.stats()
        kind = "swapped" if host_kv_budget is None else "recomputed"
        assert stats["preemptions_total"][kind] > 0
        per_job = sum(job.preemption_count for *_, job in results)
        assert per_job == sum(stats["preemptions_total"].values())
        if host_kv_budget is None:
            assert stats["kv"]["swap_outs"] > 0
            assert stats["kv"]["swap_ins"] == stats["kv"]["swap_outs"]
        else:
            assert stats["kv"]["recomputes"] > 0
        assert stats["kv"]["used_tokens"] == 0
        assert stats["kv"]["host_tokens"] == 0


async def _long_then_short(engine: Engine, prompts: list[list[int]]):
    """Run a long job, submit a short one once the long one has 20 tokens, and return the
    order the engine finished them in (by its own finish times), with both jobs. The engine
    decodes a step an iteration (``num_scheduler_steps=1``)."""
    long_params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    handle = engine.submit(prompts[0], long_params)
    seen = 0
    # On a loaded host the engine's thread could finish the long job before this event loop
    # gets to submit the short one: past 20 tokens, the engine waits for it before going on.
    # (An iteration's tokens go out during the next one's forward: this event loop has seen 20
    # once the engine holds 21.)
    short_submitted = threading.Event()
    scheduler_order = engine.scheduler.order

    def order_once_the_short_one_is_in(now: float) -> list[Job]:
        if len(handle.job.output_ids) > 20:
            short_submitted.wait(60)
        return scheduler_order(now)

    engine.scheduler.order = order_once_the_short_one_is_in

    async def consume_long() -> None:
        nonlocal seen
        async for delta in handle:
            seen += len(delta.token_ids)

    task = asyncio.ensure_future(consume_long())
    try:
        await until(lambda: seen >= 20, "20 tokens of the long job")
        short = engine.submit(prompts[1], SamplingParams(max_tokens=4, temperature=0))
    finally:
        short_submitted.set()
    async for _delta in short:
        pass
    await task
    # The finish times are stamped by the engine's one thread as it ends each job: their order
    # is the engine's, whichever stream this event loop happened to read to its end first.
    jobs = {"long": handle.job, "short": short.job}
    assert all(job.finished is not None for job in jobs.values())
    order = sorted(jobs, key=lambda name: jobs[name].finished)
    return order, handle.job, short.job


def _one_quantum_per_iteration(scheduler: MLFQ) -> None:
    """Make the MLFQ's clock count iterations: each costs one fixed quantum and no prefill is
    predicted. Timed on a loaded host, one slow iteration can demote the short job below the
    long one, which then runs to its end first."""
    charge = scheduler.charge

    def one_quantum(job: Job, _seconds: float, now: float) -> None:
        charge(job, scheduler.base_quantum, now)

    scheduler.charge = one_quantum
    scheduler.set_base_quantum = lambda _seconds: None
    scheduler.predict_prefill = lambda _tokens: 0.0


async def test_mlfq_preempts_a_long_job_for_a_new_short_one(
    tiny: Path, prompts: list[list[int]]
) -> None:
    # No promotion for starving: the long job waits only for the short one's four iterations.
    # One decode step an iteration: the clock below counts iterations (a run of several steps
    # would be charged one quantum).
    for engine in make_engine(
        tiny, max_batch_size=1, scheduler="mlfq", starvation_limit=3600, num_scheduler_steps=1
    ):
        assert isinstance(engine.scheduler, MLFQ)
        _one_quantum_per_iteration(engine.scheduler)
        order, long_job, short_job = await _long_then_short(engine, prompts)
        assert order == ["short", "long"]
        assert long_job.level > short_job.level
        assert long_job.preemption_count >= 1
        assert long_job.preemptions[Preemption.DESCHEDULED] >= 1
        assert short_job.preemption_count == 0
        assert engine.stats()["preemptions_total"]["descheduled"] >= 1


async def test_fcfs_runs_the_long_job_to_completion_first(
    tiny: Path, prompts: list[list[int]]
) -> None:
    for engine in make_engine(tiny, max_batch_size=1, scheduler="fcfs", num_scheduler_steps=1):
        order, long_job, _short = await _long_then_short(engine, prompts)
        assert order == ["long", "short"]
        assert long_job.preemption_count == 0
        assert engine.stats()["preemptions_total"] == {
            "descheduled": 0,
            "swapped": 0,
            "recomputed": 0,
        }


async def test_streamed_pieces_are_the_decoded_text(engine: Engine, prompts: list[list[int]]):
    ids, pieces, reason, job = await run(engine, prompts[0])
    assert reason == FinishReason.LENGTH
    assert "".join(pieces) == engine.tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    assert job.state == JobState.FINISHED and engine.job_info(job.id)["generated_tokens"] == 24


def test_num_scheduler_steps_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="num_scheduler_steps must be at least 1, got 0"):
        EngineConfig(model="m", num_scheduler_steps=0)


async def test_a_sampling_job_decodes_a_step_an_iteration(
    tiny: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of decode steps take greedy jobs only: a job that samples, alone in the engine, takes
    one step an iteration, and no blocks are reserved for steps it will not run."""
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # runs however slow the host
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=1, ignore_eos=True)
    slack: list[int] = []  # cache positions reserved past a job's tokens, at each forward
    for engine in make_engine(tiny, max_batch_size=4, block_size=4):
        tables = engine.pool.tables

        def room(jobs: list[Job], tables: dict[str, list[int]] = tables) -> None:
            slack.extend(len(tables[j.id]) * 4 - j.total_tokens for j in jobs)

        before_forwards(engine, room, monkeypatch)
        ids, _, reason, job = await run(engine, prompts[0], params)
        assert len(ids) == 24 and reason == FinishReason.LENGTH
        assert job.iterations == 24 and engine.stats()["decode_runs"]["runs"] == 0
        assert slack and max(slack) < 4


@pytest.mark.parametrize("steps", [1, 16], ids=["step", "runs"])
async def test_a_stop_token_ends_the_job_without_showing(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
) -> None:
    """A job ends at the first of its ``stop_token_ids`` (reason stop, the token its last id and
    not in its text), also where several decode steps run in one compiled call; a job beside
    it that does not stop there goes on to its length."""
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # runs however slow the host
    stop = reference[0][5]
    cut = reference[0].index(stop)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=(stop,))
    for engine in make_engine(tiny, max_batch_size=8, num_scheduler_steps=steps):
        (ids, pieces, reason, _), (other, *_) = await asyncio.gather(
            run(engine, prompts[0], params), run(engine, prompts[1])
        )
        assert reason == FinishReason.STOP and ids == reference[0][: cut + 1]
        assert "".join(pieces) == engine.tokenizer.decode(
            ids[:-1], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert other == reference[1]
        assert (engine.stats()["decode_runs"]["runs"] > 0) == (steps > 1)


async def test_a_run_of_decode_steps_is_decoded_in_one_push(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where several decode steps run in one call, a job without stop strings turns each run's
    tokens into text with one push (the same text as pushing them one at a time); a job with a
    stop string still pushes its tokens one by one and ends where the string appears."""
    monkeypatch.setattr(loop_module, "RUN_SECONDS", 3600.0)  # runs however slow the host
    pushes: list[int] = []
    push = TextStream.push

    def counted(stream: TextStream, token_ids: Sequence[int]) -> str:
        pushes.append(len(token_ids))
        return push(stream, token_ids)

    monkeypatch.setattr(TextStream, "push", counted)
    for engine in make_engine(tiny, max_batch_size=8, num_scheduler_steps=16):
        ids, pieces, reason, _ = await run(engine, prompts[0])
        assert ids == reference[0] and reason == FinishReason.LENGTH
        assert "".join(pieces) == engine.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert engine.stats()["decode_runs"]["runs"] > 0
        assert max(pushes) > 1 and len(pushes) < len(ids)

        pushes.clear()
        text = engine.tokenizer.decode(reference[0], skip_special_tokens=True)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        params = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, stop=(stop,))
        ids, pieces, reason, _ = await run(engine, prompts[0], params)
        assert reason == FinishReason.STOP and "".join(pieces) == text[: text.index(stop)]
        assert set(pushes) == {1} and len(pushes) == len(ids)


async def test_stop_string_ends_the_job(
    engine: Engine, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    text = engine.tokenizer.decode(reference[0], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    ids, pieces, reason, _ = await run(
        engine, prompts[0], SamplingParams(max_tokens=24, temperature=0, stop=(stop,))
    )
    assert reason == FinishReason.STOP
    assert "".join(pieces) == text[: text.index(stop)]
    assert len(ids) < 24


async def test_seeded_sampling_is_reproducible_in_any_batch(
    engine: Engine, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = (await run(engine, prompts[0], params))[0]
    together = await asyncio.gather(
        run(engine, prompts[1], SamplingParams(max_tokens=16, temperature=1.0)),
        run(engine, prompts[0], params),
    )
    assert together[1][0] == alone


async def test_cancel_frees_the_cache(
    engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding, go = hold_first_decode(engine, monkeypatch)  # not finished before the cancel
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    handle = engine.submit(prompts[0], params)
    await until(decoding.is_set, "the job to be decoding")
    handle.cancel()
    handle.cancel()
    go.set()
    await until(lambda: not engine.stats()["jobs"], "the cancelled job to leave")
    stats = engine.stats()
    assert stats["jobs"] == [] and stats["kv"]["used_tokens"] == 0
    assert engine.job_info(handle.job.id)["finish_reason"] == "abort"


async def test_limits_are_enforced(tiny: Path, prompts: list[list[int]]) -> None:
    for engine in make_engine(tiny, max_batch_size=1, max_waiting=2, kv_budget=512):
        with pytest.raises(InvalidRequest, match="prompt is empty"):
            engine.submit([], GREEDY)
        with pytest.raises(InvalidRequest, match="context is 256 tokens") as err:
            engine.submit([5] * 300, GREEDY)
        assert err.value.param == "prompt"
        with pytest.raises(InvalidRequest, match=r"250 in max_tokens") as err:
            engine.submit([5] * 10, SamplingParams(max_tokens=250))
        assert err.value.param == "max_tokens"
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            engine.submit([10**6], GREEDY)
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        handles = []
        with pytest.raises(QueueFull, match="--max-waiting 2"):
            for _ in range(5):
                handles.append(engine.submit(prompts[0], long))
        assert 2 <= len(handles) <= 3  # two waiting, plus the one running if it started
        for h in handles:
            h.cancel()


def test_a_kv_budget_the_memory_cannot_hold_is_refused_at_start(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the whole budget is written at start: one larger than the available memory is
    refused with the most that fits, not left for the OS to kill the engine over."""
    monkeypatch.setattr(DeviceMemory, "free_bytes", lambda self: 2**20)  # 1 MiB available
    with pytest.raises(EngineLoadError, match=r"--kv-budget 1000000 tokens needs .* at most \d+"):
        load_engine(EngineConfig(model=str(tiny), device="cpu", kv_budget=1_000_000), False)
    for engine in make_engine(tiny, kv_budget=64):  # 64 tokens fit in 1 MiB
        assert engine.pool.budget_tokens == 64


async def test_a_job_the_engine_stops_under_gets_every_token_before_its_error(
    tiny: Path, prompts: list[list[int]]
) -> None:
    """Closing the engine ends a running job with an error; every token the job made reaches
    its stream first (the last iteration's are still held for the next forward then)."""
    engine = load_engine(EngineConfig(model=str(tiny), device="cpu"), progress=False)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    handle = engine.submit(prompts[0], params)
    go_on = threading.Event()
    order = engine.scheduler.order

    def order_until_closing(now: float) -> list[Job]:
        if len(handle.job.output_ids) >= 5:
            go_on.wait(60)  # the engine's thread waits here until the close below has begun
        return order(now)

    engine.scheduler.order = order_until_closing  # type: ignore[method-assign]
    try:
        await until(lambda: len(handle.job.output_ids) >= 5, "five tokens")
        closing = asyncio.ensure_future(asyncio.to_thread(engine.close))
        await until(lambda: engine.model_loop.stopping, "the engine to be stopping")
        go_on.set()
        await closing
    finally:
        go_on.set()
        engine.close()
    received: list[int] = []
    last = None
    async for delta in handle:
        received.extend(delta.token_ids)
        last = delta
    assert last is not None and last.error is not None and "shutting down" in last.error
    assert received == handle.job.output_ids and len(received) > 5
