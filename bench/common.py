"""What the benchmark scripts share: ports, progress lines, child processes, percentiles, the
prompts they send and a description of the machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

HOST = "127.0.0.1"

# Openings of Python code, the kind of text the demo model learned from
PROMPTS = (
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "    for key, value in sorted(items.items()):\n        if",
    "def read_config(path):\n    with open(path) as f:\n",
    "    except KeyError as exc:\n        raise ValueError(",
    'if __name__ == "__main__":\n    ',
    'def __repr__(self):\n        return f"{type(self).__name__}(',
    "    return [x for x in values if",
    'class Timer:\n    """Measure elapsed time."""\n\n    def __enter__(self):',
    "    result = {}\n    for line in text.splitlines():\n",
    "def fetch(url, timeout=10):\n    request = urllib.request.Request(",
)


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


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


class Processes:
    """Children started by the benchmark; ``stop_all`` ends every one of them, by pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> psutil.Process:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.logs,
                preexec_fn=child_setup if sys.platform == "linux" else None,
                start_new_session=sys.platform != "linux",
            )
        self.procs.append((name, proc))
        return psutil.Process(proc.pid)

    def forget(self, pid: int) -> None:
        """A child the benchmark killed on purpose: no longer checked nor stopped."""
        self.procs = [(name, proc) for name, proc in self.procs if proc.pid != pid]

    def check(self) -> None:
        """Raise if a child has exited: the benchmark would measure nothing useful."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.tail(name)}")

    def tail(self, name: str, lines: int = 5) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop_all(self, timeout: float = 15.0) -> None:
        for _name, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                say(f"{name} (pid {proc.pid}) ignored SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.procs.clear()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float, procs: Processes
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        procs.check()
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
            last = f" (last error: {exc or type(exc).__name__})"
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {timeout:g}s{last}")


async def job_tokens(handle: Any) -> list[int]:
    """Every token an in-process engine job makes (an ``Engine.submit`` handle), in order;
    raises when the job fails."""
    out: list[int] = []
    async for delta in handle:
        if delta.error:
            raise RuntimeError(f"engine job failed: {delta.error}")
        out += delta.token_ids
    return out
