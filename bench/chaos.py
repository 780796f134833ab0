"""What survives what: faults against real deployments, one row each, with figures and targets.

    python bench/chaos.py                   # every fault, about 4 minutes on 2 cores
    python bench/chaos.py --only sigstop,poison

Each fault starts its own deployment (``flockctl up --foreground`` in a temporary home, workers
running ``tests/fake_worker.py``), drives it with aiohttp clients on 127.0.0.1, bounded in time and
count, and stops every process it started. It prints progress on stderr and one JSON object on
stdout: per fault the requests sent, succeeded and failed by status, the longest client wait,
the time to recover (until the deployment served again with its workers READY), the daemon's
peak RSS, and the target it is held to with whether the run met it.

Faults: kill -9 a worker under load; SIGSTOP a worker under load (``--upstream-timeout 5``); kill -9
the daemon and restart it; 1,100 slow-header connections with the daemon's open-file limit at
1024; a 200 MB body; a 50 MB header; a poison request (a worker answers 500); scale to zero with a
slow-starting worker; a burst to an empty deployment; ``flockctl update`` under load (rolling,
blue-green, then a new version that exits at once and is rolled back).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import HOST, Processes, free_port, say, wait_until

FAKE_WORKER = Path(__file__).resolve().parent.parent / "tests" / "fake_worker.py"
CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
MB = 1 << 20


@dataclass
class Tally:
    """What the clients saw."""

    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    longest_wait: float = 0.0

    def add(self, status: int | str, waited: float) -> None:
        self.sent += 1
        if status == 200:
            self.ok += 1
        else:
            self.failed[str(status)] += 1
        self.longest_wait = max(self.longest_wait, waited)


class Deployment:
    """One daemon in the foreground (its pid is the daemon's) with fake workers it starts."""

    def __init__(self, procs: Processes, home: Path, name: str) -> None:
        self.procs, self.home, self.name = procs, home, name
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.daemon: psutil.Process | None = None
        self.argv: list[str] = []
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    def start(self, *flags: str, worker: str = "", nofile: int | None = None) -> None:
        command = f"{sys.executable} {FAKE_WORKER} --port {{port}} {worker}".strip()
        self.argv = [sys.executable, "-m", "flockctl", "up", "--foreground", "--name", self.name]
        self.argv += ["--host", HOST, "--port", str(self.port), "--worker-command", command]
        self.argv += ["--probe-interval", "0.5", *flags]
        self._spawn(nofile)

    def _spawn(self, nofile: int | None = None) -> None:
        env = {**os.environ, "FLOCKCTL_HOME": str(self.home)}
        env.pop("FLOCKCTL_NAME", None)
        if nofile is not None:
            # The common default: 1024 descriptors, soft and hard, so the daemon cannot raise it.
            env["FLOCKCTL_BENCH_NOFILE"] = str(nofile)
            argv = [sys.executable, "-c", _WITH_NOFILE, *self.argv]
        else:
            argv = self.argv
        self.daemon = self.procs.start(f"{self.name}-daemon-{len(self.procs.procs)}", argv, env)
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample())

    def restart(self) -> None:
        self._spawn()

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error, AttributeError):
                self.peak_rss = max(self.peak_rss, self.daemon.memory_info().rss)  # type: ignore[union-attr]
            await asyncio.sleep(0.02)

    def rss(self) -> int:
        assert self.daemon is not None
        return self.daemon.memory_info().rss

    def token(self) -> str:
        return json.loads((self.home / self.name / "daemon.json").read_text())["token"]

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token()}"}
        async with session.get(self.url + "/-/status", headers=headers) as resp:
            return await resp.json()

    async def answering(self, session: aiohttp.ClientSession, timeout: float = 60) -> None:
        """Wait until the daemon answers its admin API (it may have no worker yet)."""

        async def check() -> bool:
            return isinstance(await self.status(session), dict)

        await wait_until(check, "the daemon", timeout, self.procs)

    async def ready(self, session: aiohttp.ClientSession, n: int, timeout: float = 60) -> float:
        """Wait until ``n`` workers are READY; returns the seconds it took."""
        t0 = time.monotonic()

        async def check() -> bool:
            snap = await self.status(session)
            return sum(w["state"] == "READY" for w in snap["workers"]) >= n

        await wait_until(check, f"{n} READY workers", timeout, self.procs)
        return time.monotonic() - t0

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler


_WITH_NOFILE = """
import os, resource, sys
n = int(os.environ.pop("FLOCKCTL_BENCH_NOFILE"))
resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
os.execv(sys.argv[1], sys.argv[1:])
"""


async def request(
    session: aiohttp.ClientSession,
    url: str,
    tally: Tally,
    body: dict[str, Any] | None = None,
    timeout: float = 120,
) -> int | str:
    t0 = time.monotonic()
    try:
        async with session.post(
            url, json=body or BODY, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            await resp.read()
            status: int | str = resp.status
    except asyncio.TimeoutError:
        status = "client timeout"
    except aiohttp.ClientError as exc:
        status = type(exc).__name__
    tally.add(status, time.monotonic() - t0)
    return status


async def load(
    session: aiohttp.ClientSession, url: str, tally: Tally, clients: int, until: asyncio.Event
) -> None:
    """``clients`` loops of back-to-back requests until ``until`` is set."""

    async def client() -> None:
        while not until.is_set():
            await request(session, url, tally)

    await asyncio.gather(*(client() for _ in range(clients)))


def row(
    fault: str,
    tally: Tally,
    dep: Deployment,
    recover: float | None,
    target: str,
    met: bool,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "fault": fault,
        "sent": tally.sent,
        "succeeded": tally.ok,
        "failed": dict(tally.failed),
        "longest_wait_s": round(tally.longest_wait, 2),
        "recover_s": None if recover is None else round(recover, 2),
        "daemon_peak_rss_mb": round(dep.peak_rss / MB, 1),
        "target": target,
        "met": met,
        **extra,
    }


async def worker_pids(dep: Deployment, session: aiohttp.ClientSession) -> dict[str, int]:
    snap = await dep.status(session)
    return {w["id"]: w["pid"] for w in snap["workers"] if w["state"] == "READY" and w["pid"]}


async def under_load(
    session: aiohttp.ClientSession,
    dep: Deployment,
    seconds: float,
    fault: Callable[[], Awaitable[None]],
    clients: int = 8,
) -> Tally:
    """Load for ``seconds``, with ``fault`` run one second in."""
    tally, stop = Tally(), asyncio.Event()
    runner = asyncio.get_running_loop().create_task(
        load(session, dep.url + CHAT, tally, clients, stop)
    )
    await asyncio.sleep(1)
    await fault()
    await asyncio.sleep(seconds - 1)
    stop.set()
    await runner
    return tally


# -- the faults ------------------------------------------------------------------------------------


async def kill_worker(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--min-workers", "2", "--max-workers", "2", worker="--token-delay 0.01")
    await dep.ready(session, 2)
    pid = (await worker_pids(dep, session))["w1"]
    killed_at = 0.0

    async def fault() -> None:
        nonlocal killed_at
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

    tally = await under_load(session, dep, 6, fault)
    await dep.ready(session, 2)
    recover = time.monotonic() - killed_at
    return row(
        "kill -9 a worker under load",
        tally,
        dep,
        recover,
        "requests on it retried before the first byte; a replacement READY",
        True,
    )


async def sigstop_worker(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    timeout = 5.0
    dep.start(
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--upstream-timeout",
        str(timeout),
        worker="--token-delay 0.01",
    )
    await dep.ready(session, 2)
    pid = (await worker_pids(dep, session))["w1"]

    async def fault() -> None:
        os.kill(pid, signal.SIGSTOP)

    try:
        tally = await under_load(session, dep, 15, fault)
    finally:
        os.kill(pid, signal.SIGCONT)
    recover = await dep.ready(session, 2)  # after SIGCONT: the prober brings it back
    bound = timeout + 2.0  # one timeout, then one retry on a healthy worker
    met = not tally.failed and tally.longest_wait <= bound
    return row(
        "SIGSTOP a worker under load (--upstream-timeout 5)",
        tally,
        dep,
        recover,
        f"0 failed; no wait over {bound:g}s (the timeout plus one retry)",
        met,
    )


async def kill_daemon(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--min-workers", "2", "--max-workers", "2")
    await dep.ready(session, 2)
    before = await worker_pids(dep, session)
    assert dep.daemon is not None
    dep.daemon.kill()
    dep.daemon.wait(10)
    dep.procs.forget(dep.daemon.pid)
    t0 = time.monotonic()
    dep.restart()
    tally = Tally()

    async def serving() -> bool:
        return await request(session, dep.url + CHAT, tally, timeout=5) == 200

    await wait_until(serving, "the restarted daemon", 60, dep.procs)
    await dep.ready(session, 2)
    recover = time.monotonic() - t0
    after = await worker_pids(dep, session)
    kept = sorted(set(before.values()) & set(after.values()))
    return row(
        "kill -9 the daemon and restart it",
        tally,
        dep,
        recover,
        "the restarted daemon re-adopts its live workers",
        len(kept) == 2,
        workers_readopted=len(kept),
    )


async def slow_headers(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--min-workers", "2", "--max-workers", "2", nofile=1024)
    await dep.ready(session, 2)
    conns: list[socket.socket] = []
    left_ready: set[str] = set()
    tally = Tally()
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, OSError, KeyError):
                for w in (await dep.status(session))["workers"]:
                    if w["state"] != "READY":
                        left_ready.add(w["id"])
            await asyncio.sleep(0.25)

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        for _ in range(1100):
            with contextlib.suppress(OSError):
                s = socket.create_connection((HOST, dep.port), timeout=5)
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                conns.append(s)
        opened = len(conns)
        for _ in range(100):
            await request(session, dep.url + CHAT, tally, timeout=30)
        # trickle one more header byte on each, as a slowloris client does
        for s in conns:
            with contextlib.suppress(OSError):
                s.send(b"X")
        for _ in range(100):
            await request(session, dep.url + CHAT, tally, timeout=30)
    finally:
        stop.set()
        await watcher
        for s in conns:
            s.close()
    met = tally.ok >= 0.99 * tally.sent and not left_ready
    return row(
        "1,100 slow-header connections, open-file limit 1024",
        tally,
        dep,
        None,
        ">= 99% of normal requests served; no healthy worker leaves READY",
        met,
        slow_connections_opened=opened,
        workers_that_left_ready=sorted(left_ready),
    )


async def huge_body(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--min-workers", "1", "--max-workers", "1")
    await dep.ready(session, 1)
    await asyncio.sleep(0.5)
    base = dep.rss()
    dep.peak_rss = base
    tally = Tally()
    chunk = b"x" * MB

    async def body() -> Any:
        for _ in range(200):
            yield chunk

    t0 = time.monotonic()
    try:
        async with session.post(
            dep.url + CHAT,
            data=body(),
            headers={"content-length": str(200 * MB), "content-type": "application/json"},
        ) as resp:
            await resp.read()
            status: int | str = resp.status
    except aiohttp.ClientError as exc:
        status = type(exc).__name__
    tally.add(status, time.monotonic() - t0)
    await request(session, dep.url + CHAT, tally)  # and the deployment keeps serving
    growth = (dep.peak_rss - base) / MB
    return row(
        "a 200 MB body",
        tally,
        dep,
        None,
        "413, daemon RSS growth under 30 MB, still serving",
        status == 413 and growth < 30 and tally.ok == 1,
        rss_growth_mb=round(growth, 1),
    )


async def huge_header(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--min-workers", "1", "--max-workers", "1")
    await dep.ready(session, 1)
    tally, normal, stop = Tally(), Tally(), asyncio.Event()
    runner = asyncio.get_running_loop().create_task(load(session, dep.url + CHAT, normal, 4, stop))
    await asyncio.sleep(0.5)
    reader, writer = await asyncio.open_connection(HOST, dep.port)
    t0 = time.monotonic()
    status: int | str
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(50):
            writer.write(b"a" * MB)
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        status = int(line.split()[1]) if line else "closed"
    except (OSError, asyncio.TimeoutError, IndexError, ValueError) as exc:
        status = type(exc).__name__
    finally:
        writer.close()
    tally.add(status, time.monotonic() - t0)
    await asyncio.sleep(0.5)
    stop.set()
    await runner
    met = status in (431, "ConnectionResetError", "BrokenPipeError", "closed") and not normal.failed
    return row(
        "a 50 MB header",
        tally,
        dep,
        None,
        "431 (or closed) at 64 KiB; other clients unaffected",
        met,
        others_sent=normal.sent,
        others_failed=dict(normal.failed),
        others_longest_wait_s=round(normal.longest_wait, 3),
    )


async def poison(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--min-workers", "3", "--max-workers", "3")
    await dep.ready(session, 3)
    tally = Tally()
    await request(session, dep.url + "/fail", tally)
    snap = await dep.status(session)
    attempts = sum(w["failures"] for w in snap["workers"])
    return row(
        "a poison request (the worker answers 500)",
        tally,
        dep,
        None,
        "at most one retry (2 attempts)",
        attempts <= 2,
        attempts=attempts,
    )


async def scale_to_zero(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start(
        "--min-workers",
        "0",
        "--max-workers",
        "2",
        "--downscale-delay",
        "1",
        "--upscale-delay",
        "0",
        worker="--start-delay 4",
    )
    await dep.answering(session)
    tally = Tally()
    for _ in range(3):
        await request(session, dep.url + CHAT, tally, timeout=90)
    snap = await dep.status(session)
    launched = len(snap["workers"])
    return row(
        "scale to zero with a slow-starting worker (4 s start, --downscale-delay 1)",
        tally,
        dep,
        None,
        "every request served; no worker launched twice for one waiting request",
        tally.ok == tally.sent and launched <= tally.sent,
        workers_launched=launched,
    )


async def burst_to_empty(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start(
        "--min-workers", "0", "--max-workers", "2", "--upscale-delay", "0", worker="--start-delay 2"
    )
    await dep.answering(session)
    tally = Tally()
    t0 = time.monotonic()
    await asyncio.gather(*(request(session, dep.url + CHAT, tally, timeout=90) for _ in range(50)))
    snap = await dep.status(session)
    return row(
        "a burst of 50 requests to an empty deployment",
        tally,
        dep,
        time.monotonic() - t0,
        "every request served",
        tally.ok == tally.sent,
        workers_launched=len(snap["workers"]),
    )


async def update_cli(dep: Deployment, *args: str) -> tuple[int, float, str]:
    """Run ``flockctl update`` against ``dep``: its exit code, seconds and last stderr line."""
    argv = [sys.executable, "-m", "flockctl", "update", "--name", dep.name, *args]
    env = {**os.environ, "FLOCKCTL_HOME": str(dep.home)}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    lines = err.decode(errors="replace").strip().splitlines()
    return proc.returncode or 0, time.monotonic() - t0, lines[-1] if lines else ""


async def update_under_load(session: aiohttp.ClientSession, dep: Deployment) -> dict[str, Any]:
    dep.start("--replicas", "2", "--drain-timeout", "20", worker="--token-delay 0.01 --model v1")
    await dep.ready(session, 2)
    runs: dict[str, Any] = {}

    def worker(version: str) -> str:
        return (
            f"{sys.executable} {FAKE_WORKER} --port {{port}} --token-delay 0.01 --model {version}"
        )

    async def fault() -> None:
        for mode, version in (("rolling", "v2"), ("blue-green", "v3")):
            code, took, _ = await update_cli(
                dep, "--worker-command", worker(version), "--mode", mode
            )
            runs[mode] = {"exit": code, "seconds": round(took, 2)}
        broken = f"{sys.executable} -c 'raise SystemExit(3)' {{port}}"
        code, took, said = await update_cli(dep, "--worker-command", broken)
        runs["broken"] = {"exit": code, "seconds": round(took, 2), "said": said}

    tally = await under_load(session, dep, 2, fault)
    snap = await dep.status(session)
    versions = sorted({w["version"] for w in snap["workers"] if w["state"] == "READY"})
    met = (
        not tally.failed
        and runs["rolling"]["exit"] == 0
        and runs["blue-green"]["exit"] == 0
        and runs["broken"]["exit"] == 9
        and versions == [snap["deployment"]["version"]] == [3]
    )
    return row(
        "flockctl update under load: rolling, blue-green, then a broken version rolled back",
        tally,
        dep,
        None,
        "0 failed; both updates succeed; the broken one exits 9 and version 3 keeps serving",
        met,
        updates=runs,
        serving_versions=versions,
    )


FAULTS: dict[str, Callable[[aiohttp.ClientSession, Deployment], Awaitable[dict[str, Any]]]] = {
    "kill-worker": kill_worker,
    "sigstop": sigstop_worker,
    "kill-daemon": kill_daemon,
    "slow-headers": slow_headers,
    "huge-body": huge_body,
    "huge-header": huge_header,
    "poison": poison,
    "scale-to-zero": scale_to_zero,
    "burst": burst_to_empty,
    "update": update_under_load,
}


async def run(names: list[str], base: Path) -> list[dict[str, Any]]:
    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for name in names:
            home = base / name
            home.mkdir()
            procs = Processes(home)
            dep = Deployment(procs, home, name)
            try:
                result = await asyncio.wait_for(FAULTS[name](session, dep), 300)
            except Exception as exc:
                result = {"fault": name, "error": f"{type(exc).__name__}: {exc}", "met": False}
            finally:
                await dep.close()
                procs.stop_all()
                _kill_workers(home)
            say(f"{name}: {json.dumps(result)}")
            rows.append(result)
    return rows


def _kill_workers(home: Path) -> None:
    """Workers a killed daemon could not stop: the ones recorded under this run's home."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(FAKE_WORKER) in cmd:
            with contextlib.suppress(psutil.Error):
                env = proc.environ()
                if env.get("FLOCKCTL_HOME") == str(home):
                    proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated faults of: {', '.join(FAULTS)}")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,100 client sockets of our own
    with tempfile.TemporaryDirectory(prefix="flockctl-chaos-") as tmp:
        rows = asyncio.run(run(names, Path(tmp)))
    print(json.dumps({"faults": rows, "all_met": all(r.get("met") for r in rows)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
