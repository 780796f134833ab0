"""bench/speculative.py's contention: busy neighbours that come and go, and leave nothing behind."""

from __future__ import annotations

from types import ModuleType

import psutil
import pytest
from conftest import load_bench, until_sync


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("speculative")


def busy_children() -> list[psutil.Process]:
    here = psutil.Process()
    return [p for p in here.children() if "getppid" in " ".join(p.cmdline())]


@pytest.mark.e2e
def test_contention_stops_and_starts_its_busy_processes_and_ends_them(bench: ModuleType) -> None:
    assert busy_children() == []
    # stopped windows three times as long as the waits' polling, so a poll always lands in one
    with bench.contention(0.3):
        procs = busy_children()
        assert len(procs) == (psutil.cpu_count() or 1)
        # running, then stopped by the toggle, then running again
        until_sync(lambda: all(p.status() == psutil.STATUS_STOPPED for p in procs), "a stop")
        until_sync(lambda: all(p.status() != psutil.STATUS_STOPPED for p in procs), "a restart")
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs)
    assert busy_children() == []


def test_no_contention_without_a_period(bench: ModuleType) -> None:
    with bench.contention(None):
        assert busy_children() == []


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_contend_wants_positive_seconds(bench: ModuleType, seconds: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--contend", seconds])
    assert exit_info.value.code == 2  # argparse's usage error, one line on stderr
