"""FCFS and skip-join MLFQ as pure classes, driven with made-up clocks and iteration costs."""

from __future__ import annotations

import pytest

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.profiler import DecodePace, Profile, fit_line
from flockctl.engine.scheduler import FCFS, MLFQ, make_scheduler

Q = 0.010  # base quantum: one decode iteration, 10 ms


def job(prompt_len: int = 4, arrival: float = 0.0) -> Job:
    return Job([1] * prompt_len, SamplingParams(max_tokens=8), arrival=arrival)


def mlfq(**kw: object) -> MLFQ:
    # prefill costs 1 ms per prompt token
    return MLFQ(Q, levels=5, starvation_limit=1.0, predict_prefill=lambda n: n * 0.001, **kw)


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


def test_quanta_double_from_the_base() -> None:
    s = mlfq()
    assert [round(s.quantum(k), 6) for k in range(5)] == [0.01, 0.02, 0.04, 0.08, 0.16]
    assert s.describe()["quanta_ms"] == [10.0, 20.0, 40.0, 80.0, 160.0]


@pytest.mark.parametrize(
    ("prompt_len", "level"),
    [(1, 0), (10, 0), (11, 1), (20, 1), (21, 2), (40, 2), (80, 3), (160, 4), (5000, 4)],
)
def test_skip_join_enters_the_highest_level_whose_quantum_covers_the_prefill(
    prompt_len: int, level: int
) -> None:
    s = mlfq()
    j = job(prompt_len)
    s.add(j, now=0.0)
    assert j.level == level
    assert j.predicted_prefill == pytest.approx(prompt_len * 0.001)


def test_higher_levels_run_first_and_fifo_within_a_level() -> None:
    s = mlfq()
    long_prompt, short_a, short_b = job(100), job(2), job(3)
    for j in (long_prompt, short_a, short_b):
        s.add(j, 0.0)
    assert ids(s.order(0.0)) == ids([short_a, short_b, long_prompt])
    assert s.queue_lengths() == [2, 0, 0, 0, 1]  # 100 ms prefill: past the 80 ms quantum


def test_demotion_when_service_at_a_level_reaches_its_quantum() -> None:
    s = mlfq()
    a, b = job(2), job(2)
    s.add(a, 0.0)
    s.add(b, 0.0)
    s.charge(a, 0.006, now=0.01)
    assert a.level == 0  # 6 ms of a 10 ms quantum
    s.charge(a, 0.006, now=0.02)
    assert (a.level, a.service_at_level) == (1, 0.0)  # 12 ms >= 10 ms: one level down, fresh
    assert ids(s.order(0.02)) == ids([b, a])
    # level 1's quantum is 20 ms
    for t in range(3):
        s.charge(a, 0.007, now=0.03 + t * 0.01)
    assert a.level == 2
    assert s.describe()["demotions"] == 2


def test_the_last_level_keeps_its_jobs() -> None:
    s = mlfq()
    a = job(2)
    s.add(a, 0.0)
    for t in range(200):
        s.charge(a, 0.05, now=t * 0.05)
    assert a.level == 4


def test_demoted_job_goes_to_the_back_of_its_new_level() -> None:
    s = mlfq()
    waiting = job(15)  # joins level 1
    runner = job(2)  # level 0
    s.add(waiting, 0.0)
    s.add(runner, 0.0)
    s.charge(runner, 0.011, now=0.011)  # demoted to level 1, behind `waiting`
    assert ids(s.order(0.011)) == ids([waiting, runner])


def test_starvation_promotes_one_level_per_limit_waited_with_arrival_as_last_run() -> None:
    s = mlfq()
    old = job(200, arrival=0.0)  # level 4
    s.add(old, now=0.0)
    fresh = job(2, arrival=0.5)
    s.add(fresh, now=0.5)
    assert ids(s.order(0.9)) == ids([fresh, old])
    assert old.level == 4
    # 1 s after its arrival without running: one level up, not to the top
    s.order(1.0)
    assert (old.level, s.describe()["promotions"]) == (3, 1)
    # not promoted again until it has waited another full limit
    s.charge(fresh, 0.001, now=1.2)
    s.order(1.5)
    assert (old.level, s.describe()["promotions"]) == (3, 1)
    s.order(2.0)
    s.order(3.0)
    assert (old.level, s.describe()["promotions"]) == (1, 3)
    # up to the top, behind the job already there, and no further
    s.order(4.0)
    assert ids(s.order(5.0)) == ids([fresh, old])
    assert (old.level, s.describe()["promotions"]) == (0, 4)


def test_a_promoted_job_keeps_its_level_when_the_quanta_change() -> None:
    s = mlfq()
    old = job(200)  # level 4
    s.add(old, now=0.0)
    s.order(1.0)
    assert old.level == 3
    s.set_base_quantum(0.011)  # skip-join would place it at level 4 again: it is not asked
    assert old.level == 3


def test_running_resets_the_starvation_clock() -> None:
    s = mlfq()
    j = job(200)
    s.add(j, 0.0)
    s.charge(j, 0.001, now=0.9)
    s.order(1.5)
    assert j.level == 4  # last ran at 0.9: waited 0.6 s only


def test_the_last_level_runs_its_jobs_in_arrival_order() -> None:
    # Three long jobs reach the last level in the opposite order of their arrival: they run
    # oldest first there, one after another, instead of taking turns.
    s = MLFQ(Q, levels=3, starvation_limit=1000.0)
    first, second, third = job(arrival=0.0), job(arrival=0.1), job(arrival=0.2)
    for j in (first, second, third):
        s.add(j, now=j.arrival)
    for j in (third, second, first):  # 10 + 20 ms: through levels 0 and 1
        s.charge(j, 0.010, now=1.0)
        s.charge(j, 0.020, now=1.0)
    assert [j.level for j in (first, second, third)] == [2, 2, 2]
    newcomer = job(arrival=1.0)
    s.add(newcomer, now=1.0)
    assert ids(s.order(1.0)) == ids([newcomer, first, second, third])
    # at an upper level, the order is the order of entering it
    a, b = job(arrival=0.5), job(arrival=0.6)
    s.add(a, now=1.0)
    s.add(b, now=1.0)
    s.charge(b, 0.010, now=1.1)
    s.charge(a, 0.010, now=1.1)
    assert ids(s.order(1.1)[1:3]) == ids([b, a])


def test_in_the_last_level_only_the_oldest_job_is_promoted() -> None:
    # The last level runs its jobs in arrival order: a younger one that waits there waits for
    # the older ones, as under FCFS. Moved up, it would take the slot of an older job still
    # running; only the oldest, held back by the upper levels alone, moves up.
    s = MLFQ(Q, levels=3, starvation_limit=1.0)
    a, b, c = job(arrival=0.0), job(arrival=0.1), job(arrival=0.2)
    for j in (a, b, c):
        s.add(j, now=j.arrival)
        s.charge(j, 0.010, now=1.0)
        s.charge(j, 0.020, now=1.0)
    assert [j.level for j in (a, b, c)] == [2, 2, 2]
    for t in (1.5, 2.0):  # a batch of two: the two oldest run, c waits
        s.charge(a, 0.001, now=t)
        s.charge(b, 0.001, now=t)
    assert ids(s.order(2.1)) == ids([a, b, c])  # c has not run for 1.1 s: it stays behind them
    assert (c.level, s.describe()["promotions"]) == (2, 0)
    # a newcomer at the top takes the batch from 2.1 on: a, the oldest, moves up; b and c wait
    newcomer = job(arrival=2.1)
    s.add(newcomer, now=2.1)
    for t in (2.5, 3.0):
        s.charge(newcomer, 0.001, now=t)
    assert ids(s.order(3.1)) == ids([newcomer, a, b, c])
    assert [j.level for j in (a, b, c)] == [1, 2, 2]
    assert s.describe()["promotions"] == 1


def test_fcfs_orders_by_arrival_and_ignores_service() -> None:
    s = FCFS()
    a, b, c = job(500, arrival=1.0), job(1, arrival=2.0), job(1, arrival=3.0)
    for j in (c, a, b):
        s.add(j, 3.0)
    s.charge(a, 100.0, now=4.0)
    assert ids(s.order(10.0)) == ids([a, b, c])
    assert s.queue_lengths() == [3]


def test_remove_forgets_the_job() -> None:
    s = mlfq()
    a = job()
    s.add(a, 0.0)
    s.remove(a)
    s.remove(a)
    assert s.order(0.0) == []


def test_make_scheduler_names() -> None:
    assert make_scheduler("fcfs", Q, lambda n: 0.0).name == "fcfs"
    assert make_scheduler("mlfq", Q, lambda n: 0.0).name == "mlfq"
    with pytest.raises(ValueError, match="unknown scheduler 'sjf'"):
        make_scheduler("sjf", Q, lambda n: 0.0)
    with pytest.raises(ValueError, match="base_quantum"):
        MLFQ(0.0)


def test_quanta_follow_the_decode_cost_the_engine_measures() -> None:
    s = mlfq()
    a = job(2)
    s.add(a, 0.0)
    s.set_base_quantum(0.004)  # the host got faster than the start-up profile said
    assert s.describe()["quanta_ms"] == [4.0, 8.0, 16.0, 32.0, 64.0]
    s.charge(a, 0.005, now=0.01)
    assert a.level == 1  # 5 ms now outlasts the top level's quantum
    fcfs = FCFS()
    fcfs.set_base_quantum(0.004)  # no quanta: the order stays by arrival
    assert fcfs.describe() == {"name": "fcfs"}


def test_prefill_predictions_scale_with_how_decode_runs_now() -> None:
    pace = DecodePace(Profile(0.010, 4, 0.002, 0.001))
    assert pace.predict_prefill(10) == pytest.approx(0.012)  # nothing measured yet
    assert pace.decode_seconds == 0.010
    assert pace.observe(0.020) == pytest.approx(0.020)  # twice as slow as at start-up
    assert pace.predict_prefill(10) == pytest.approx(0.024)
    assert pace.observe(0.010) == pytest.approx(0.019)  # a moving average, not the last one


def test_jobs_not_yet_run_are_placed_again_when_the_quanta_change() -> None:
    s = mlfq()
    waiting, running = job(30), job(30)  # 30 ms prefill: level 2 (40 ms) at a 10 ms base
    s.add(waiting, 0.0)
    s.add(running, 0.0)
    assert (waiting.level, running.level) == (2, 2)
    s.charge(running, 0.001, now=0.01)
    s.set_base_quantum(0.030)  # iterations got slower: 30 ms now fits the top level
    assert (waiting.level, running.level) == (0, 2)
    s.set_base_quantum(0.004)  # faster: 30 ms needs the 32 ms quantum of level 3
    assert (waiting.level, running.level) == (3, 2)
    s.set_base_quantum(0.0)  # a nonsense measurement changes nothing
    assert s.base_quantum == 0.004


def test_skip_join_uses_the_prefill_cost_the_pace_measures() -> None:
    # start-up profile: 10 ms a decode step, prefill 2 ms + 1 ms a token
    pace = DecodePace(Profile(0.010, 4, 0.002, 0.001), min_prefills=4)
    s = MLFQ(Q, levels=5, starvation_limit=1.0, predict_prefill=pace.predict_prefill)
    before = job(30)
    s.add(before, 0.0)
    assert before.level == 2  # 32 ms predicted by the profile: level 2's 40 ms
    # the prefills the engine runs cost 4 ms + 0.2 ms a token: far cheaper than at start-up
    for tokens in (10, 20, 40, 80):
        pace.observe_prefill(tokens, 0.004 + 0.0002 * tokens)
    assert pace.predict_prefill(30) == pytest.approx(0.010)
    s.set_base_quantum(pace.observe(0.010))
    assert before.level == 0  # placed again: 10 ms fits the top level's 10 ms
    after = job(200)
    s.add(after, 0.0)
    assert after.predicted_prefill == pytest.approx(0.044)
    assert after.level == 3


def test_the_prefill_fit_waits_for_enough_lengths() -> None:
    pace = DecodePace(Profile(0.010, 4, 0.002, 0.001), window=4, min_prefills=3)
    for _ in range(5):
        pace.observe_prefill(16, 0.050)  # one length only: no slope to fit
    assert pace.predict_prefill(10) == pytest.approx(0.012)  # still the start-up model
    pace.observe_prefill(0, 0.050)  # nothing fed: not a prefill
    pace.observe_prefill(32, 0.0)  # no time: not a measurement
    pace.observe_prefill(48, 0.090)
    # window of 4: (16, 50 ms) x3 and (48, 90 ms): 30 ms + 1.25 ms a token
    assert pace.predict_prefill(10) == pytest.approx(0.0425)
    for _ in range(4):
        pace.observe_prefill(10, 0.003)
        pace.observe_prefill(20, 0.005)
    # the old samples left the window; the fit follows the new ones
    assert pace.predict_prefill(10) == pytest.approx(0.003)


def test_fit_line() -> None:
    assert fit_line([(10, 0.02), (20, 0.03), (30, 0.04)]) == pytest.approx((0.01, 0.001))
    assert fit_line([(10, 0.02)]) == (0.02, 0.0)
    # never a negative slope
    assert fit_line([(10, 0.05), (20, 0.01)]) == (pytest.approx(0.03), 0.0)
