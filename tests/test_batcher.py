"""The batcher on a CPU KV pool with hand-made jobs: no model, no clock. Blocks hold 4 tokens;
an "iteration" here is what the model loop does to a batch: every token cached, one more out."""

from __future__ import annotations

import torch

from flockctl.engine.batcher import Batcher, Plan
from flockctl.engine.job import Job, JobState, Preemption, SamplingParams
from flockctl.engine.kv import KVPool

BLOCK = 4


def batcher(budget: int, host: int | None = None, batch: int = 4) -> Batcher:
    pool = KVPool(1, budget, torch.device("cpu"), torch.float32, BLOCK, host_budget_tokens=host)
    return Batcher(pool, batch)


def job(prompt: int) -> Job:
    return Job([1] * prompt, SamplingParams(max_tokens=16))


def run(b: Batcher, order: list[Job], finished: tuple[Job, ...] = ()) -> Plan:
    """One iteration: plan, feed the batch (one token out each), finish ``finished``, settle."""
    plan = b.plan(order)
    for j in plan.batch:
        b.mark_cached(j, j.total_tokens)
        j.output_ids.append(7)
    for j in finished:
        j.state = JobState.FINISHED
        b.release(j)
    b.end_iteration([j for j in order if j not in finished], plan)
    return plan


def test_the_batch_takes_jobs_in_priority_order_up_to_its_size() -> None:
    b = batcher(64, batch=2)
    first, second, third = job(4), job(4), job(4)
    plan = b.plan([first, second, third])
    assert plan.batch == [first, second]
    assert [j.state for j in (first, second, third)] == [
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.WAITING,
    ]
    assert b.pool.resident(first.id) and not b.pool.resident(third.id)
    assert plan.preempted == [] and b.preemptions == dict.fromkeys(Preemption, 0)


def test_a_job_left_out_is_preempted_once_and_keeps_its_cache_on_the_device() -> None:
    b = batcher(64, batch=1)
    old, new = job(4), job(4)
    run(b, [old])
    plan = run(b, [new, old])  # the newcomer ranks higher
    assert plan.batch == [new] and plan.preempted == [old]
    assert old.state == JobState.PREEMPTED
    assert old.preemptions[Preemption.DESCHEDULED] == 1
    assert b.pool.resident(old.id) and old.cached_tokens == 4
    run(b, [new, old])  # still waiting: that is no second preemption
    assert old.preemption_count == 1
    assert b.preemptions[Preemption.DESCHEDULED] == 1


def test_short_of_blocks_the_lowest_priority_cache_moves_to_host_memory() -> None:
    b = batcher(16, host=64, batch=2)  # 4 blocks
    high, low = job(4), job(4)
    run(b, [high, low])  # one block each; each needs a second for its next token
    urgent = job(12)  # three blocks
    plan = run(b, [urgent, high, low])
    assert plan.batch == [urgent]
    assert plan.swapped_out == [low]  # the lowest priority goes first
    assert low.state == JobState.SWAPPED and low.swaps == 1
    assert low.cached_tokens == 4 and b.pool.host_tokens == 4
    assert high.state == JobState.PREEMPTED and b.pool.resident(high.id)
    # each counted once, by why it left: moved out, or simply not taken
    assert plan.preempted == [low, high]
    assert low.preemptions[Preemption.SWAPPED] == 1 and low.preemption_count == 1
    assert high.preemptions[Preemption.DESCHEDULED] == 1 and high.preemption_count == 1
    assert b.preemptions == {
        Preemption.DESCHEDULED: 1,
        Preemption.SWAPPED: 1,
        Preemption.RECOMPUTED: 0,
    }


def test_without_host_room_the_cache_is_dropped_and_recomputed() -> None:
    b = batcher(16, host=0, batch=1)
    old = job(8)
    run(b, [old])
    plan = run(b, [job(12), old])
    assert plan.dropped == [old] and plan.swapped_out == []
    assert old.state == JobState.PREEMPTED and old.cached_tokens == 0
    assert old.needs_prefill  # its whole history is fed again when it runs
    assert old.preemptions[Preemption.RECOMPUTED] == 1
    assert b.pool.drops == 1 and not b.pool.resident(old.id)


def test_a_swapped_job_taken_into_the_batch_gets_its_cache_back() -> None:
    b = batcher(16, host=64, batch=1)
    old = job(8)
    run(b, [old])
    urgent = job(12)
    run(b, [urgent, old])
    assert old.state == JobState.SWAPPED
    plan = b.plan([old, urgent])  # old ranks first again (urgent was demoted, say)
    assert plan.batch == [old] and plan.swapped_in == [old]
    assert plan.swapped_out == [urgent]  # the room it needs comes from the job behind it
    assert old.state == JobState.RUNNING and old.cached_tokens == 8
    assert not old.needs_prefill  # nothing to recompute
    assert b.pool.host_tokens == urgent.cached_tokens == 12


def test_a_swapped_job_comes_back_ahead_of_its_turn_when_blocks_free_up() -> None:
    b = batcher(20, host=64, batch=1)  # 5 blocks
    old = job(8)
    run(b, [old])
    big = job(12)
    run(b, [big, old])  # big takes the other three blocks; old waits on the device
    assert old.state == JobState.PREEMPTED
    plan = b.plan([big, old])  # big's next token needs a fourth block: old's cache moves out
    assert plan.swapped_out == [old] and old.state == JobState.SWAPPED
    assert old.preemption_count == 1  # it was not running: moving it out is no preemption
    assert b.end_iteration([big, old], plan) is None  # one block free: none to spare
    b.mark_cached(big, big.total_tokens)
    big.output_ids.append(7)
    big.state = JobState.FINISHED
    b.release(big)
    assert b.end_iteration([old], plan) is old
    assert old.state == JobState.PREEMPTED and b.pool.resident(old.id)
    assert old.cached_tokens == 8 and b.pool.host_tokens == 0


def test_prefetch_leaves_a_block_for_each_running_job_next_token() -> None:
    b = batcher(16, host=64, batch=2)  # 4 blocks
    old = job(8)
    run(b, [old])
    long, short = job(12), job(4)
    plan = b.plan([long, short, old])
    assert plan.batch == [long, short] and plan.swapped_out == [old]
    for j in plan.batch:
        b.mark_cached(j, j.total_tokens)
        j.output_ids.append(7)
    long.state = JobState.FINISHED
    b.release(long)
    # three blocks free, as many as old needs, but short's next token needs one of them
    assert b.end_iteration([short, old], plan) is None
    assert old.state == JobState.SWAPPED


def test_a_job_that_does_not_fit_holds_back_the_jobs_behind_it() -> None:
    b = batcher(16, batch=3)
    running = job(8)
    run(b, [running])
    large, small = job(12), job(4)
    plan = b.plan([running, large, small])
    assert plan.batch == [running]  # small would fit, but it never overtakes large
    assert large.state == JobState.WAITING and small.state == JobState.WAITING


def chunked(budget: int, tokens: int, batch: int = 4, host: int | None = None) -> Batcher:
    pool = KVPool(1, budget, torch.device("cpu"), torch.float32, BLOCK, host_budget_tokens=host)
    return Batcher(pool, batch, batched_tokens=tokens)


def feed(b: Batcher, plan: Plan) -> None:
    """What the model loop does with a plan: a chunk caches that many tokens, anything else
    caches every token and gets one more."""
    for j in plan.batch:
        n = plan.chunks.get(j.id)
        if n is None:
            b.mark_cached(j, j.total_tokens)
            j.output_ids.append(7)
        else:
            b.mark_cached(j, j.cached_tokens + n)


def test_a_token_budget_feeds_decodes_first_and_a_long_prompt_in_chunks() -> None:
    b = chunked(256, tokens=10)
    short = job(3)
    feed(b, b.plan([short]))  # decoding from now on
    long = job(40)
    plan = b.plan([long, short])  # the new prompt ranks higher, the decode still runs
    assert plan.batch == [long, short]
    assert plan.chunks == {long.id: 9}  # ten tokens less the decode's one
    feed(b, plan)
    assert long.cached_tokens == 9 and long.needs_prefill and long.output_ids == []
    fed = []
    while long.needs_prefill:
        plan = b.plan([long, short])
        fed.append(plan.chunks.get(long.id))
        feed(b, plan)
    assert fed == [9, 9, 9, None]  # the last iteration feeds the 4 left and samples
    assert long.cached_tokens == 40 and len(long.output_ids) == 1
    assert short.state == JobState.RUNNING and len(short.output_ids) == 6


def test_prompts_beyond_the_token_budget_wait_without_being_preempted() -> None:
    b = chunked(256, tokens=8)
    first, second = job(20), job(20)
    plan = b.plan([first, second])
    assert plan.batch == [first] and plan.chunks == {first.id: 8}
    assert second.state == JobState.WAITING and plan.preempted == []


def test_a_prompt_that_fits_the_budget_is_not_chunked() -> None:
    b = chunked(256, tokens=10)
    small, other = job(6), job(6)
    plan = b.plan([small, other])  # the first fits whole, the second gets what is left
    assert plan.batch == [small, other] and plan.chunks == {other.id: 4}


def test_a_job_scoring_its_prompt_is_fed_whole() -> None:
    b = chunked(256, tokens=8)
    scoring = Job([1] * 20, SamplingParams(max_tokens=1, prompt_logprobs=1))
    plan = b.plan([scoring])
    assert plan.batch == [scoring] and plan.chunks == {}


def test_a_half_prefilled_job_swapped_out_resumes_where_it_stopped() -> None:
    b = chunked(24, tokens=8, batch=2, host=64)  # six blocks of four
    half = job(20)
    feed(b, b.plan([half]))
    assert half.cached_tokens == 8 and half.needs_prefill
    other = job(12)  # needs blocks the half-prefilled job holds
    plan = b.plan([other, half])
    assert plan.swapped_out == [half] and half.state == JobState.SWAPPED
    assert half.cached_tokens == 8  # its host copy holds what was prefilled
    feed(b, plan)
    other.state = JobState.FINISHED
    b.release(other)
    plan = b.plan([half])
    assert plan.swapped_in == [half] and plan.chunks == {half.id: 8}
    feed(b, plan)
    assert half.cached_tokens == 16
    feed(b, b.plan([half]))
    assert half.cached_tokens == 20 and half.output_ids == [7]


def test_auto_batch_size_follows_the_kv_budget() -> None:
    from flockctl.engine.batcher import auto_batch_size

    assert auto_batch_size(131072, 2048, None) == 128  # 128 jobs of 1024 tokens
    assert auto_batch_size(131072, 256, None) == 256  # short context: capped
    assert auto_batch_size(4096, 2048, None) == 8  # never fewer than the old fixed 8
    assert auto_batch_size(131072, 256, 100) == 50  # half the iteration's tokens at most
