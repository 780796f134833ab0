"""The policy that picks each job's draft depth under ``--spec auto``, driven with made-up
measurements: no model, no clock."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.spec_policy import (
    MAX_BACKOFF,
    MEASURE_DEPTH,
    RECHECK,
    SpecPolicy,
    SpecState,
    expected_tokens,
)

GREEDY = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
TREE = (1, 1, 1, 1, 1, 1)
MS = 1e-3


def new_job() -> Job:
    job = Job([1, 2], GREEDY)
    job.spec = SpecState(draft_cached=[0])
    return job


def spec_step(
    policy: SpecPolicy,
    batch: int,
    depth: int,
    draft: float,
    tokens: int,
    verify: float,
    catchup: int = 1,
) -> None:
    """A speculative step observed as the speculator reports one: ``depth`` SSM forwards of
    ``draft`` seconds each, the first of them counted with the verification of ``verify``."""
    policy.observe_speculative(
        batch, depth - 1, (depth - 1) * draft, tokens, verify + draft, catchup
    )


def measured(
    policy: SpecPolicy,
    batch: int = 1,
    inc: float = 10 * MS,
    draft: float = 2 * MS,
    node: float = 1 * MS,
) -> SpecPolicy:
    """Costs as if measured: an incremental step ``inc``, an SSM forward ``draft``, and a
    verification ``inc + node`` per tree token past the first (seen at two tree sizes)."""
    for _ in range(policy.min_samples):
        policy.observe_incremental(batch, inc)
        for depth in (2, 6):
            tokens = policy.tree_tokens(depth)
            spec_step(policy, batch, depth, draft, tokens, inc + node * (tokens - 1))
    return policy


def steps(policy: SpecPolicy, job: Job, accept: Callable[[int], int], n: int) -> None:
    """``n`` steps at the policy's depth for ``job``; step ``i`` has its first ``accept(i)``
    drafts accepted (as many as it drafted, at most)."""
    for i in range(n):
        depth = policy.choose([job]).get(job.id, 0)
        policy.observe_job(job, depth, depth, min(depth, accept(i)))


def every(i: int) -> int:
    return 99


def never(i: int) -> int:
    return 0


def first_of_two(i: int) -> int:
    """Every other step the first draft, never the second."""
    return i % 2


def test_expected_tokens_count_the_drafts_a_step_keeps_plus_the_llms_own() -> None:
    assert expected_tokens([]) == [1.0]
    assert expected_tokens([0.5, 0.5]) == pytest.approx([1.0, 1.5, 1.75])
    assert expected_tokens([1.0, 0.0, 1.0]) == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_step_costs_are_read_off_the_measured_tree_sizes() -> None:
    policy = measured(SpecPolicy("auto", TREE))
    # a step of depth d: d draft forwards of 2 ms and a verification of 10 + d ms
    for depth in range(len(TREE) + 1):
        assert policy.step_seconds(1, depth) == pytest.approx((10 + 3 * depth) * MS)
    assert policy.cost_ratio(1, 4) == pytest.approx(2.2)
    assert policy.step_seconds(2, 1) is None  # another batch size is measured on its own


def test_one_rejected_deep_draft_does_not_end_drafting_that_deep() -> None:
    """Engine-wide, a position's rate starts from the one before it, worth several drafts: one
    rejection at the third position leaves it and every deeper one likely (deep chains are where
    a strong draft pays), and only repeated rejections bring them down."""
    policy = SpecPolicy("auto", TREE)
    job = new_job()
    for _ in range(20):
        policy.observe_job(job, 2, 2, 2)  # the first two positions accepted every time
    policy.observe_job(job, 3, 3, 2)  # the third tried once: rejected
    rates = policy.rates()
    assert rates[1] > 0.9 and rates[2] > 0.7
    assert rates[3:] == pytest.approx([rates[2]] * (len(TREE) - 3))  # not reached: as the third
    for _ in range(30):
        policy.observe_job(job, 3, 3, 2)
    assert policy.rates()[2] < 0.3


def test_a_job_drafts_as_deep_as_its_acceptance_pays_for() -> None:
    policy = measured(SpecPolicy("auto", TREE), draft=1 * MS)
    good, fair, useless = new_job(), new_job(), new_job()
    steps(policy, good, every, 60)
    steps(policy, fair, first_of_two, 60)
    steps(policy, useless, never, 60)
    # tokens a second, E(d) / (10 + 2d) ms: all accepted pays up to the whole tree; half of the
    # first pays one position (1.5 tokens for 1.2 steps) and no more; nothing accepted never pays
    assert policy.choose([good]) == {good.id: 6}
    assert policy.choose([fair]) == {fair.id: 1}
    assert policy.choose([useless]) == {}
    assert policy.describe()["active"] is False
    assert "costs 2.20 incremental steps" in policy.describe()["reason"]  # at depth 6
    # a batch goes as deep as its best job pays for; each job drafts at most its own best (the
    # padded forward costs what the deepest tree does), the useless one none
    measured(policy, batch=3, draft=1 * MS)
    assert policy.choose([good, fair, useless]) == {good.id: 6, fair.id: 1}
    summary = good.spec.summary()  # type: ignore[union-attr]
    assert summary["depth"] == 6 and summary["enabled"] is True
    assert useless.spec.summary()["depth"] == 0  # type: ignore[union-attr]


def test_depth_follows_a_job_whose_acceptance_changes() -> None:
    policy = measured(SpecPolicy("auto", TREE, probe_every=8))
    job = new_job()
    steps(policy, job, every, 40)
    assert policy.choose([job])[job.id] == 6
    steps(policy, job, never, 30)  # its text turned to something the draft cannot guess
    decisions = []
    for _ in range(90):
        depth = policy.choose([job]).get(job.id, 0)
        decisions.append(depth)
        policy.observe_job(job, depth, depth, 0)  # still nothing accepted
    probes = [i for i, d in enumerate(decisions) if d]
    # only the probes: two steps in a row (the first one is not timed); each round that finds
    # nothing waits twice as long as the one before, up to 4 x 8 skipped steps
    rounds = probes[::2]
    assert probes[1::2] == [first + 1 for first in rounds]
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert len(gaps) >= 2 and gaps == sorted(gaps) and gaps[-1] == 2 + 4 * 8 - 1
    steps(policy, job, every, 40)  # its probes find the draft good again
    assert policy.choose([job])[job.id] == 6


def test_a_job_that_missed_deep_once_drafts_deep_again_as_the_miss_ages() -> None:
    """A job that drafts shallower than before never sees its deeper positions again: its own
    misses there fade (its counts), so the engine-wide rate, which other steps keep, takes over
    and the job goes deep again."""
    policy = measured(SpecPolicy("auto", TREE), draft=1 * MS)
    steps(policy, new_job(), every, 60)  # engine-wide, every position is accepted
    job = new_job()
    for _ in range(6):  # its drafts past the first rejected a few times in a row
        depth = policy.choose([job])[job.id]
        policy.observe_job(job, depth, depth, 1)
    assert policy.choose([job])[job.id] == 1
    depths = []
    for _ in range(40):  # the first draft accepted at each step of depth 1
        depth = policy.choose([job])[job.id]
        depths.append(depth)
        policy.observe_job(job, depth, depth, depth)
    assert depths[0] == 1 and depths[-1] == 6, depths


def test_a_size_not_timed_lately_gives_way_to_the_line_through_those_that_were() -> None:
    policy = SpecPolicy("auto", TREE)
    for _ in range(3):  # a 5-token verification timed three times on a loaded machine
        policy.observe_incremental(1, 10 * MS)
        policy.observe_speculative(1, 3, 6 * MS, 5, 40 * MS)
    for _ in range(200):  # then the policy picked depths 1 and 6 only, on a quiet one
        policy.observe_incremental(1, 10 * MS)
        policy.observe_speculative(1, 0, 0.0, 2, 12 * MS)
        policy.observe_speculative(1, 5, 10 * MS, 7, 17 * MS)
    policy.costs.forget_old(1)  # as each decision does
    # the sizes timed lately keep their own cost; 5 tokens is read off the line through them
    assert policy.costs.verify_seconds(1, 2) == pytest.approx(12 * MS)
    assert policy.costs.verify_seconds(1, 7) == pytest.approx(17 * MS)
    assert policy.costs.verify_seconds(1, 5) == pytest.approx(15 * MS)


def test_a_new_job_starts_from_the_engine_wide_acceptance() -> None:
    policy = measured(SpecPolicy("auto", TREE))
    assert policy.choose([new_job()]) != {}  # unmeasured positions are given the benefit
    steps(policy, new_job(), never, 200)
    fresh = new_job()
    assert policy.choose([fresh]) == {}  # every job so far wasted its drafts


def test_each_batch_size_has_its_own_depth() -> None:
    policy = measured(SpecPolicy("auto", TREE))
    # at batch 4 a forward costs more per token and an SSM forward almost as much as the LLM's
    measured(policy, batch=4, inc=12 * MS, draft=9 * MS, node=4 * MS)
    jobs = [new_job() for _ in range(4)]
    for job in jobs:
        steps(policy, job, lambda i: i % 4, 40)  # 0, 1, 2, 3 accepted in turn
    # three steps in four accept the first draft: 1.75 tokens for 13 ms beats 1 for 10 ms at
    # batch 1; at batch 4 a depth-1 step costs 25 ms, more than two incremental steps
    alone = policy.choose(jobs[:1])
    assert alone.get(jobs[0].id, 0) >= 1
    assert policy.choose(jobs) == {}
    described = policy.describe()
    assert described["depth_by_batch"] == {"1": alone[jobs[0].id], "4": 0}
    assert described["step_costs_by_batch"]["4"]["draft_forward_ms"] == pytest.approx(9.0)


def test_costs_are_measured_before_they_are_judged() -> None:
    policy = SpecPolicy("auto", TREE, min_samples=2)
    job = new_job()
    # nothing measured: an incremental step first (speculative costs are kept relative to it),
    # then speculation to learn its cost
    assert policy.choose([job]) == {}
    policy.observe_incremental(1, 10 * MS)
    # measured at MEASURE_DEPTH, not the whole tree (on a weak draft a step of the whole tree
    # costs many incremental steps); deeper costs are read off a line until measured
    assert policy.choose([job]) == {job.id: MEASURE_DEPTH}
    for _ in range(2):
        spec_step(policy, 1, 2, 2 * MS, 3, 12 * MS)
    seen = [policy.choose([job]) for _ in range(4)]
    assert {} in seen and {job.id: 2} in seen  # incremental steps are interleaved to time them
    assert "measuring" in policy.describe()["reason"]


def test_on_drafts_the_whole_tree_and_off_nothing() -> None:
    job = new_job()
    assert SpecPolicy("on", (1, 2, 1)).choose([job]) == {job.id: 3}
    assert SpecPolicy("off", (1, 2, 1)).choose([job]) == {}
    assert SpecPolicy("auto", (1, 2, 1), drafters=2).tree_tokens(3) == 1 + 2 * (1 + 2 + 2)
    with pytest.raises(ValueError, match="expected auto, on or off"):
        SpecPolicy("sometimes")


def test_incremental_steps_are_timed_again_now_and_then() -> None:
    policy = measured(SpecPolicy("auto", TREE, probe_every=8))
    job = new_job()
    plain = []
    for i in range(32):
        depths = policy.choose([job])
        depth = depths.get(job.id, 0)
        if depth:
            tokens = policy.tree_tokens(depth)
            spec_step(policy, 1, depth, 2 * MS, tokens, (9 + tokens) * MS)
        else:
            plain.append(i)
            policy.observe_incremental(1, 10 * MS)
        policy.observe_job(job, depth, depth, depth)  # every draft accepted
    # a job that gains from every speculative step still leaves one step in eight incremental,
    # so a machine that slows down or speeds up is compared with itself
    assert len(plain) == 4 and all(b - a == 8 for a, b in itertools.pairwise(plain))


def test_one_stalled_step_does_not_turn_speculation_off() -> None:
    policy = measured(SpecPolicy("auto", TREE))
    job = new_job()
    steps(policy, job, every, 20)
    depth = policy.choose([job])[job.id]
    tokens = policy.tree_tokens(depth)
    # another process held the cores for a whole second during one verification
    spec_step(policy, 1, depth, 2 * MS, tokens, 1.0)
    assert policy.choose([job]) == {job.id: depth}
    assert policy.step_seconds(1, depth) == pytest.approx((10 + 3 * depth) * MS)


def test_a_tree_size_timed_once_on_a_stalled_machine_does_not_set_its_cost() -> None:
    policy = SpecPolicy("auto", TREE)
    for _ in range(15):
        policy.observe_incremental(1, 10 * MS)
        for tokens in (2, 5):
            policy.observe_speculative(1, 1, 2 * MS, tokens, (9 + tokens) * MS)
    policy.observe_speculative(1, 2, 4 * MS, 3, 60 * MS)  # the only timing of 3 tokens
    assert policy.costs.verify_seconds(1, 3) == pytest.approx(12 * MS, abs=4 * MS)
    assert policy.costs.verify_seconds(1, 9) == pytest.approx(18 * MS, abs=4 * MS)


def test_a_step_that_catches_the_ssm_up_is_not_timed() -> None:
    policy = measured(SpecPolicy("auto", TREE))
    before = [policy.step_seconds(1, depth) for depth in range(len(TREE) + 1)]
    # first steps after a run of incremental ones: the SSM's first forward feeds 30 tokens
    for _ in range(15):
        policy.observe_speculative(1, 1, 9 * MS, 2, 25 * MS, catchup=30)
    assert [policy.step_seconds(1, depth) for depth in range(len(TREE) + 1)] == before
    policy.observe_speculative(1, 1, 9 * MS, 2, 25 * MS, catchup=2)  # a steady step is timed
    assert policy.costs.draft[1].count == 2 * policy.min_samples + 1


def test_a_tree_size_timed_often_costs_what_it_measured() -> None:
    policy = SpecPolicy("auto", TREE)
    for _ in range(3):
        policy.observe_incremental(1, 10 * MS)
        policy.observe_speculative(1, 1, 2 * MS, 2, 12 * MS)
        policy.observe_speculative(1, 3, 6 * MS, 4, 16 * MS)
        policy.observe_speculative(1, 8, 16 * MS, 9, 19 * MS)
    # two sizes timed once each while another process held the cores
    policy.observe_speculative(1, 2, 4 * MS, 3, 60 * MS)
    policy.observe_speculative(1, 5, 10 * MS, 6, 60 * MS)
    # each size measured three times keeps its own cost (the line through them passes near,
    # not through, each), and that line gives the others: the two stalled timings do not bend it
    assert policy.costs.verify_seconds(1, 2) == pytest.approx(12 * MS)
    assert policy.costs.verify_seconds(1, 4) == pytest.approx(16 * MS)
    assert policy.costs.verify_seconds(1, 9) == pytest.approx(19 * MS)
    assert policy.costs.verify_seconds(1, 5) == pytest.approx(47 / 3 * MS)


def test_speculation_resumes_soon_after_a_stall_that_turned_it_off() -> None:
    policy = measured(SpecPolicy("auto", TREE, probe_every=32))
    job = new_job()
    stalled = True
    previous = 0  # the depth of the iteration before

    def iteration() -> int:
        nonlocal previous
        depth = policy.choose([job]).get(job.id, 0)
        slow = 5.0 if stalled else 1.0
        if depth:
            tokens = policy.tree_tokens(depth)
            catchup = 2 if previous else 20  # the SSM missed the incremental steps
            policy.observe_speculative(
                1, depth, depth * 2 * MS * slow, tokens, (9 + tokens) * MS * slow, catchup
            )
        else:
            policy.observe_incremental(1, 10 * MS)  # the stall came and went between these
        policy.observe_job(job, depth, depth, min(depth, 2))  # the first two drafts accepted
        previous = depth
        return depth

    # a stall that slowed every speculative step five times over, long enough to fill every
    # window of timings and turn speculation off
    depths = [iteration() for _ in range(200)]
    assert depths[-20:] == [0] * 20
    stalled = False
    # its probes find speculation cheap again: the stalled timings give way within a few
    # probes, not after a whole window of them (15 probes, about 500 iterations)
    depths = [iteration() for _ in range(200)]
    assert depths[-20:].count(0) <= 1


def test_a_probe_on_a_loaded_machine_is_compared_with_the_steps_just_before_it() -> None:
    policy = measured(SpecPolicy("auto", TREE), draft=1 * MS)
    job = new_job()
    steps(policy, job, first_of_two, 60)  # half of the first drafts accepted: speculation pays
    chosen = policy.choose([job])
    assert chosen
    # other tenants take the cores: every step now takes twice as long; the machine's incremental
    # steps are timed first, then speculative steps of depth 1 (12 ms each when quiet)
    for _ in range(15):
        policy.observe_incremental(1, 20 * MS)
    for _ in range(15):
        spec_step(policy, 1, 1, 2 * MS, 2, 22 * MS, catchup=2)
    # the tenants leave: the next incremental steps run at 10 ms again
    for _ in range(15):
        policy.observe_incremental(1, 10 * MS)
    # a depth-1 step still costs 1.2 incremental steps, as it did, not 2.4
    assert policy.cost_ratio(1, 1) == pytest.approx(1.2)
    assert policy.choose([job]) == chosen


def test_a_plain_decision_stands_a_few_iterations_unless_a_probe_is_due() -> None:
    """A batch size found losing at every depth is judged again after RECHECK decode iterations,
    not at each one (with sub-millisecond decode steps that cost a twentieth of them); a new job
    in the batch, or a job's probe, is judged at once."""
    # a draft forward of 3 ms: depth 1 costs 1.4 incremental steps, more than the 1.3 tokens
    # the engine-wide prior expects of it (2 ms would tie them)
    policy = measured(SpecPolicy("auto", TREE, probe_every=1000), draft=3 * MS)
    job = new_job()
    steps(policy, job, never, 40)
    judged: list[int] = []
    forget = policy.costs.forget_old

    def counted(batch: int, *args: int) -> None:
        judged.append(batch)
        forget(batch, *args)

    policy.costs.forget_old = counted  # type: ignore[method-assign]
    for _ in range(32):
        assert policy.choose([job]) == {}
        policy.observe_incremental(1, 10 * MS)
        policy.observe_job(job, 0, 0, 0)
    assert 32 // RECHECK - 1 <= len(judged) <= 32 // RECHECK  # once every RECHECK iterations
    assert policy.describe()["active"] is False
    assert "costs" in policy.describe()["reason"]
    before = len(judged)
    other = new_job()
    assert policy.choose([other]) == {}  # another job (the engine's rates say plain too)
    assert len(judged) == before + 1  # judged at once
    policy.choose([other])
    assert len(judged) == before + 1  # that decision stands


def test_a_new_job_waits_as_long_as_the_latest_losing_round() -> None:
    """After rounds of probes that kept losing, a new job's first probe waits as long as the
    latest round did (short jobs on a draft that cannot follow skip it); a paying probe resets
    the wait."""
    policy = measured(SpecPolicy("auto", TREE, probe_every=8))
    job = new_job()
    steps(policy, job, never, 120)
    assert policy.backoff == MAX_BACKOFF
    late = Job([1, 2], GREEDY)
    late.spec = SpecState(draft_cached=[0], backoff=policy.backoff)  # as Speculator.job_spec
    decisions = []
    for _ in range(40):
        depth = policy.choose([late]).get(late.id, 0)
        decisions.append(depth)
        policy.observe_job(late, depth, depth, 0)
    assert next(i for i, d in enumerate(decisions) if d) == MAX_BACKOFF * 8 - 1
    steps(policy, job, every, 60)  # the old job's probes find the draft good again
    assert policy.backoff == 1


def test_a_batch_whose_drafting_is_overlapped_costs_its_verification_alone() -> None:
    """Where a batch size's drafting runs on another thread while the model verifies (a lone
    job's pipelined runs), a step of depth ``d`` costs its verification of ``d + 1`` tokens,
    not that plus ``d - 1`` more draft forwards."""
    policy = SpecPolicy("auto", (1,) * 4)
    for _ in range(5):
        policy.costs.add_incremental(1, 0.010)
        policy.costs.add_speculative(1, 1, 0.002, 2, 0.012)
        policy.costs.add_speculative(1, 1, 0.002, 5, 0.018)
    drafted = policy.step_seconds(1, 4)
    policy.overlapped.add(1)
    overlapped = policy.step_seconds(1, 4)
    assert overlapped == pytest.approx(policy.costs.verify_seconds(1, 5))
    assert drafted == pytest.approx(overlapped + 3 * 0.002)
    assert policy.step_seconds(1, 0) == pytest.approx(0.010)  # incremental: unchanged
