"""How a recorded pid is recognised as the same live process (``flockctl/state.py``): the
daemon re-adopting its workers, its health checks of them, and ``down`` finding the daemon all
rest on it."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from flockctl.state import TIME_OF_DAY_FLOOR, DaemonRecord, is_same_process, process_start_time

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")


def record(start: float) -> DaemonRecord:
    return DaemonRecord(os.getpid(), start, "127.0.0.1", 1, "token", "0", "default")


@linux
def test_a_clock_step_does_not_make_a_live_process_look_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pid = os.getpid()
    recorded = process_start_time(pid)
    assert recorded is not None
    before = psutil.Process(pid).create_time()
    # The kernel works out the boot time from the time of day at each read: the clock stepped
    # 5 s forward (NTP, a virtual machine catching up) moves it, and psutil's create_time with it
    from psutil import _pslinux

    booted = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, "boot_time", lambda: booted + 5)
    assert psutil.Process(pid).create_time() == pytest.approx(before + 5)
    assert process_start_time(pid) == recorded
    assert is_same_process(pid, recorded)
    assert record(recorded).alive()


@linux
def test_on_linux_a_start_time_is_seconds_since_boot() -> None:
    started = process_start_time(os.getpid())
    assert started is not None
    assert 0 < started <= time.clock_gettime(time.CLOCK_BOOTTIME) < TIME_OF_DAY_FLOOR


def test_a_record_written_with_a_time_of_day_still_names_its_process() -> None:
    pid = os.getpid()
    written = psutil.Process(pid).create_time()  # what daemon.json and workers.json held before
    assert written >= TIME_OF_DAY_FLOOR
    assert is_same_process(pid, written)
    assert record(written).alive()
    assert not is_same_process(pid, written - 10)  # another process that had this pid


def test_another_start_a_gone_pid_or_no_record_is_not_the_process() -> None:
    pid = os.getpid()
    started = process_start_time(pid)
    assert started is not None
    assert not is_same_process(pid, started + 1)
    assert not record(started - 1).alive()
    gone = max(psutil.pids()) + 100_000
    assert process_start_time(gone) is None and not is_same_process(gone, started)
    assert not is_same_process(None, started) and not is_same_process(pid, None)
