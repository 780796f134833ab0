"""What the benchmark scripts share: ports, progress lines, child processes, percentiles."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

import psutil

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def child_setup() -> None:
    """In each child before exec: its own session, and SIGTERM if the benchmark dies (Linux)."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted ``values``."""
    if not values:
        return None
    rank = max(1, min(len(values), -(-len(values) * q // 100)))
    return values[int(rank) - 1]
