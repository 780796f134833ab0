"""bench/scheduler.py's fake-clock replay: the engine's scheduler classes on a trace, with no
engine and no wall time."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import BENCH_DIR, load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("scheduler")


def detail(base_ms: float) -> dict[str, object]:
    """An MLFQ engine's scheduler_detail whose decode steps cost ``base_ms``."""
    return {"levels": 6, "quanta_ms": [base_ms * 2**k for k in range(6)], "starvation_limit_s": 5.0}


def test_the_replay_keeps_the_quanta_at_one_iteration_of_its_own_clock(bench: ModuleType) -> None:
    # The engine's quanta time its decode steps alone; an iteration of the closed loop costs
    # more (prefills, the HTTP side). Replayed at 20 ms an iteration, quanta of 5 ms would
    # let a 24-token job run through every level and wait behind the long jobs at the bottom.
    trace = bench.make_trace(bench.trace_lengths(150, 1), rate=3.0, seed=1)
    at_pace = bench.simulate(trace, "mlfq", 4, 0.020, detail(20.0))
    assert bench.simulate(trace, "mlfq", 4, 0.020, detail(5.0)) == at_pace
    fcfs = bench.simulate(trace, "fcfs", 4, 0.020, detail(5.0))
    # a short job runs at once and finishes in its own service time, a few tenths of a second
    assert at_pace["short_jct_s"]["p99"] < 0.6
    assert at_pace["short_jct_s"]["mean"] < fcfs["short_jct_s"]["mean"] / 2


@pytest.mark.parametrize(
    ("load", "mean", "long"),
    [(0.8, 1.5, 0.85), (0.95, 1.8, 0.8)],
)
def test_on_the_bench_traces_mlfq_cuts_the_mean_and_long_jobs_keep_most_of_their_pace(
    bench: ModuleType, load: float, mean: float, long: float
) -> None:
    # The bench's traces, seeds 0-2 of 150 jobs, offered `load` of a batch of 4 at 20 ms an
    # iteration: the policy alone, as the engine would run it on a quiet host.
    iteration = 0.020
    for seed in range(3):
        lengths = bench.trace_lengths(150, seed)
        rate = load * (4 / iteration) * len(lengths) / sum(lengths)
        trace = bench.make_trace(lengths, rate, seed)
        fcfs, mlfq = (
            bench.simulate(trace, name, 4, iteration, detail(iteration * 1000))
            for name in ("fcfs", "mlfq")
        )
        assert fcfs["jct_s"]["mean"] / mlfq["jct_s"]["mean"] >= mean, seed
        assert fcfs["long_jct_s"]["mean"] / mlfq["long_jct_s"]["mean"] >= long, seed


@pytest.mark.e2e
def test_quick_run_reports_every_job_and_the_load_met_after_the_trace(tiny: Path) -> None:
    import json
    import subprocess

    argv = [sys.executable, str(BENCH_DIR / "scheduler.py"), "--quick", "--no-decode"]
    # long jobs that fit the tiny model's 256-token context beside their prompt
    argv += ["--model", str(tiny), "--jobs", "12", "--long-tokens", "60", "120"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    schedulers = json.loads(done.stdout)["schedulers"]
    after = schedulers["capacity"]["after_trace_tokens_per_s"]
    assert set(after) == {"fcfs", "mlfq"} and all(v > 0 for v in after.values())
    assert schedulers["trace"]["offered_load_after"] > 0
    assert "after" in done.stderr.splitlines()[-1]  # the summary line names both loads
    for name, run in schedulers["runs"].items():
        rows = run["job_jct_s"]
        assert len(rows) == 12
        assert all(tokens > 0 and jct > 0 for tokens, jct, *_ in rows)
        admitted, final = zip(*(row[3:] for row in rows), strict=True)
        if name == "fcfs":
            assert set(admitted) == set(final) == {0}
        else:  # every job's levels came back, and a long one ends below where it started
            assert None not in admitted + final
            assert any(end > start for start, end in zip(admitted, final, strict=True))
