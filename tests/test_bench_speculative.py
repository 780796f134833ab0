"""bench/speculative.py's contention: busy neighbours that come and go, and leave nothing behind."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import psutil
import pytest
from conftest import until_sync

BENCH = Path(__file__).resolve().parent.parent / "bench" / "speculative.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # by its path, with its directory importable for its `common`
    spec = importlib.util.spec_from_file_location("bench_speculative", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speculative"] = module
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def busy_children() -> list[psutil.Process]:
    here = psutil.Process()
    return [p for p in here.children() if "getppid" in " ".join(p.cmdline())]


@pytest.mark.e2e
def test_contention_stops_and_starts_its_busy_processes_and_ends_them(bench: ModuleType) -> None:
    assert busy_children() == []
    with bench.contention(0.05):
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
