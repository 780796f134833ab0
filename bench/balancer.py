"""Balancer overhead: the same requests sent straight to two fake workers and through the daemon.

    python bench/balancer.py [--duration 8] [--requests N] [--warmup 0.5] [--quick]
                             [--policies least-connection,prefix] [--tracing]

The script is the load generator (one aiohttp ClientSession, pooled keep-alive connections) and
runs in a process of its own. It starts two fake OpenAI-compatible workers and a foreground
daemon (``flockctl up --foreground`` with both as static endpoints, in a temporary
``FLOCKCTL_HOME``) on free 127.0.0.1 ports, waits until the daemon reports both workers READY,
measures every case, and stops everything it started, on errors and Ctrl-C too. Stdout gets one
JSON object; progress goes to stderr.

Cases: non-streaming and streaming (16 SSE chunks) requests at concurrency 1, 16 and 64, and
streaming with 20 ms between chunks at concurrency 64; each once direct (requests alternate
between the workers) and once through the balancer. Clients run a closed loop (the next request
when one finishes). A closed loop keeps the phase its clients start with, so in the 20 ms case
the clients start spread over one request's duration, like independent users; the ``-burst``
variant starts all 64 together, so they keep arriving in waves of 64 and the figures show how
each path absorbs such a wave.

Each case runs ``--warmup`` seconds unmeasured, then a window of ``--duration`` seconds (or
``--requests`` completed requests, whichever ends first) with the load still running, so the
window sees steady state only. Latency figures are for requests completed in the window; CPU
figures are each process's user+system time in the window divided by those requests, which
holds even when the client, the daemon and the workers share a few cores (latencies on a small
machine include waiting for a core).

``--policies A,B,...`` measures what each balancing policy costs instead: one daemon per policy
over the same two workers, streamed requests at concurrency 16 and 64 through each (no direct
cases), each request one of 32 chat conversations with a 2 KB system prompt and up to four
turns, so ``prefix`` parses every body and walks and extends its tree as it would for chat
traffic. It reports each policy's balancer CPU per request and its ratio to the first policy's
(target for ``prefix``: at most 2x least-connection's).

``--tracing`` measures what OpenTelemetry costs the balancer: two daemons over the same workers,
one without a collector and one with ``--otel-collector-endpoint`` pointing at a receiver in
this process that accepts every export and drops it, sampling 10% of the traces
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``). Each case
runs on both in turn, twice (off, on, on, off), and the report gives each one's balancer CPU per
request and the difference (target: at most +0.05 ms per request). ``--rounds N`` repeats that
N times on a noisy machine and also gives each round's difference and their median, which the
target is checked on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import HOST, Processes, cpu_seconds, free_port, percentile, say, wait_until

ROOT = Path(__file__).resolve().parents[1]
FAKE_WORKER = ROOT / "tests" / "fake_worker.py"
TOKENS = 16
CONCURRENCY = (1, 16, 64)
SLOW_TOKEN_DELAY = 0.02
SLOW_CONCURRENCY = 64
DONE = b"data: [DONE]\n\n"

TARGET_CPU_MS = 0.5
TARGET_ADDED_P50_MS = 1.0
TARGET_TTFB_P99_MS = 5.0
TARGET_POLICY_CPU_RATIO = 2.0
TARGET_TRACING_ADDED_CPU_MS = 0.05
TRACING_SAMPLE_RATIO = "0.1"
POLICY_CONCURRENCY = (16, 64)
CONVERSATIONS = 32


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    stream: bool
    concurrency: int
    token_delay: float = 0.0
    burst: bool = False
    #: Chat conversations the clients cycle through (0: one short message for every request).
    conversations: int = 0

    @property
    def name(self) -> str:
        kind = "stream" if self.stream else "plain"
        delay = f"-{self.token_delay * 1000:g}ms" if self.token_delay else ""
        return f"{kind}{delay}{'-burst' if self.burst else ''}/c{self.concurrency}"

    @property
    def spread(self) -> float:
        """Seconds over which the clients start: about one request's duration."""
        return 0.0 if self.burst else TOKENS * self.token_delay

    def payload(self) -> bytes:
        body: dict[str, Any] = {
            "model": "fake",
            "messages": [{"role": "user", "content": "Say sixteen words."}],
            "max_tokens": TOKENS,
            "stream": self.stream,
        }
        if self.token_delay:
            body["fake_token_delay"] = self.token_delay
        return json.dumps(body).encode()

    def payloads(self) -> list[bytes]:
        """The bodies the clients send, client ``i`` the ``i % len``-th one."""
        if not self.conversations:
            return [self.payload()]
        out = []
        for i in range(self.conversations):
            system = f"Conversation {i // 4}. You answer questions about code. " * 36
            messages = [{"role": "system", "content": system[:2048]}]
            for turn in range(i % 4):
                messages.append({"role": "user", "content": f"question {turn} about sorting"})
                messages.append({"role": "assistant", "content": f"answer {turn}, at length"})
            messages.append({"role": "user", "content": "and now?"})
            body = {"model": "fake", "messages": messages, "max_tokens": TOKENS, "stream": True}
            out.append(json.dumps(body).encode())
        return out


SLOW = Case(True, SLOW_CONCURRENCY, SLOW_TOKEN_DELAY)
CASES = [
    *(Case(stream, c) for stream in (False, True) for c in CONCURRENCY),
    SLOW,
    Case(True, SLOW_CONCURRENCY, SLOW_TOKEN_DELAY, burst=True),
]


# -- load generation -----------------------------------------------------------------------------


@dataclass
class Result:
    seconds: float
    latencies: list[float]
    ttfbs: list[float]
    errors: int
    first_error: str | None
    cpu: dict[str, float]


async def run_load(
    session: aiohttp.ClientSession,
    urls: list[str],
    case: Case,
    watched: dict[str, psutil.Process],
    warmup: float,
    duration: float,
    max_requests: int | None,
) -> Result:
    """Closed-loop load; measures a window after ``warmup`` while the load keeps running."""
    payloads = case.payloads()
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    first_error: str | None = None
    recording = stopping = False
    enough = asyncio.Event()
    clock = time.perf_counter

    async def client(i: int) -> None:
        nonlocal errors, first_error
        if case.spread:
            await asyncio.sleep(case.spread * i / case.concurrency)
        n = i
        payload = payloads[i % len(payloads)]
        while not stopping:
            url = urls[n % len(urls)]
            n += 1
            t0 = clock()
            first = 0.0
            tail = b""
            problem = None
            try:
                async with session.post(url, data=payload, headers=headers) as resp:
                    async for chunk in resp.content.iter_any():
                        if not first:
                            first = clock()
                        tail = (tail + chunk)[-len(DONE) :]
                    if resp.status != 200 or (case.stream and tail != DONE):
                        problem = f"status {resp.status}, body ending {tail!r}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            end = clock()
            if not recording:
                continue
            if problem is not None:
                errors += 1
                first_error = first_error or problem
                continue
            latencies.append(end - t0)
            ttfbs.append((first or end) - t0)
            if max_requests is not None and len(latencies) >= max_requests:
                enough.set()

    clients = [asyncio.ensure_future(client(i)) for i in range(case.concurrency)]
    try:
        # Long enough for every client to have started and finished a request.
        await asyncio.sleep(max(warmup, 2 * case.spread))
        before = {who: cpu_seconds(p) for who, p in watched.items()}
        start = clock()
        recording = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(enough.wait(), duration)
        recording = False
        seconds = clock() - start
        cpu = {who: cpu_seconds(p) - before[who] for who, p in watched.items()}
        stopping = True
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
    latencies.sort()
    ttfbs.sort()
    return Result(seconds, latencies, ttfbs, errors, first_error, cpu)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def summarize(case: Case, target: str, result: Result) -> dict[str, Any]:
    n = len(result.latencies)
    row: dict[str, Any] = {
        "target": target,
        "stream": case.stream,
        "concurrency": case.concurrency,
        "token_delay_ms": case.token_delay * 1000,
        "clients_start": "spread" if case.spread else "together",
        "requests": n,
        "errors": result.errors,
        "seconds": round(result.seconds, 3),
        "rps": round(n / result.seconds, 1) if result.seconds else 0.0,
        "latency_ms": {
            "p50": _ms(percentile(result.latencies, 50)),
            "p99": _ms(percentile(result.latencies, 99)),
        },
        "ttfb_ms": {
            "p50": _ms(percentile(result.ttfbs, 50)),
            "p99": _ms(percentile(result.ttfbs, 99)),
        },
    }
    for who, seconds in result.cpu.items():
        row[f"{who}_cpu_ms_per_req"] = round(seconds * 1000 / max(n, 1), 4)
    if result.first_error:
        row["first_error"] = result.first_error
    return row


def start_processes(
    procs: Processes, home: Path, policies: list[str] | None = None, otel: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Two fake workers and a daemon balancing over them per policy (``daemon-POLICY``; one
    ``daemon`` when no policy is named; with ``otel``, ``daemon-off`` and ``daemon-otel``
    sending to that collector); returns the workers' and each daemon's base URLs."""
    upstreams = []
    for i in (1, 2):
        port = free_port()
        argv = [sys.executable, str(FAKE_WORKER), "--host", HOST, "--port", str(port)]
        procs.start(f"worker{i}", [*argv, "--id", f"w{i}", "--tokens", str(TOKENS)])
        upstreams.append(f"http://{HOST}:{port}")
    daemons: dict[str, str] = {}
    named: list[str | None] = list(policies or [None]) if otel is None else ["off", "otel"]
    for policy in named:
        port = free_port()
        name = "daemon" if policy is None else f"daemon-{policy}"
        argv = [sys.executable, "-m", "flockctl", "up", "--foreground", "--name", name]
        argv += ["--host", HOST, "--port", str(port)]
        for url in upstreams:
            argv += ["--endpoint", url]
        argv += ["--worker-capacity", "1000", "--max-queue", "10000", "--probe-interval", "1"]
        env = {**os.environ, "FLOCKCTL_HOME": str(home)}
        if otel is not None:
            if policy == "otel":
                argv += ["--otel-collector-endpoint", otel]
                env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
                env["OTEL_TRACES_SAMPLER_ARG"] = TRACING_SAMPLE_RATIO
        elif policy is not None:
            argv += ["--policy", policy]
        env.pop("FLOCKCTL_NAME", None)
        procs.start(name, argv, env)
        daemons[name] = f"http://{HOST}:{port}"
    return upstreams, daemons


async def bench(args: argparse.Namespace, procs: Processes, home: Path) -> dict[str, Any]:
    # SIGTERM ends the run the way Ctrl-C does: the task is cancelled, `finally` blocks run.
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    collector = await start_collector() if args.tracing else None
    otel = f"http://{HOST}:{collector[1]}" if collector else None
    upstreams, daemons = start_processes(procs, home, args.policies, otel)
    workers = [psutil.Process(p.pid) for name, p in procs.procs if name.startswith("worker")]
    pids = {name: psutil.Process(p.pid) for name, p in procs.procs if name.startswith("daemon")}
    balancer, daemon = daemons.get("daemon", ""), pids.get("daemon")
    me = psutil.Process()
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def healthy(url: str) -> bool:
            async with session.get(url + "/health") as resp:
                return resp.status == 200

        async def daemon_ready(url: str) -> bool:
            async with session.get(url + "/health") as resp:
                return resp.status == 200 and (await resp.json())["ready_workers"] == 2

        for url in upstreams:
            await wait_until(lambda url=url: healthy(url), f"fake worker {url}", 30, procs)
        for name, url in daemons.items():
            await wait_until(lambda url=url: daemon_ready(url), name, 60, procs)
        if args.policies:
            return await bench_policies(args, procs, session, daemons, pids, workers)
        if collector is not None:
            try:
                return await bench_tracing(args, procs, session, daemons, pids, collector[2])
            finally:
                await collector[0].cleanup()
        assert daemon is not None
        say(f"workers {', '.join(upstreams)}; daemon {balancer} (pid {daemon.pid})")

        # What the daemon spends with no traffic (probes, samplers), for scale.
        idle = min(1.0, args.duration)
        before = cpu_seconds(daemon)
        await asyncio.sleep(idle)
        idle_cpu = (cpu_seconds(daemon) - before) / idle

        results: dict[str, dict[str, Any]] = {}
        for case in CASES:
            for target, bases in (("direct", upstreams), ("balancer", [balancer])):
                urls = [base + "/v1/chat/completions" for base in bases]
                watched = {"client": me, "worker1": workers[0], "worker2": workers[1]}
                if target == "balancer":
                    watched["balancer"] = daemon
                result = await run_load(
                    session, urls, case, watched, args.warmup, args.duration, args.requests
                )
                procs.check()
                result.cpu["workers"] = result.cpu.pop("worker1") + result.cpu.pop("worker2")
                row = results[f"{target}/{case.name}"] = summarize(case, target, result)
                say(progress_line(f"{target}/{case.name}", row))
    return {"idle_cpu_ms_per_s": round(idle_cpu * 1000, 1), "cases": results}


async def bench_policies(
    args: argparse.Namespace,
    procs: Processes,
    session: aiohttp.ClientSession,
    daemons: dict[str, str],
    pids: dict[str, psutil.Process],
    workers: list[psutil.Process],
) -> dict[str, Any]:
    """Each policy's daemon under the same chat traffic; CPU per request side by side."""
    results: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float | None] = {}
    for c in POLICY_CONCURRENCY:
        case = Case(True, c, conversations=CONVERSATIONS)
        for policy in args.policies:
            name = f"daemon-{policy}"
            watched = {"balancer": pids[name], "worker1": workers[0], "worker2": workers[1]}
            result = await run_load(
                session,
                [daemons[name] + "/v1/chat/completions"],
                case,
                watched,
                args.warmup,
                args.duration,
                args.requests,
            )
            procs.check()
            result.cpu["workers"] = result.cpu.pop("worker1") + result.cpu.pop("worker2")
            row = results[f"{policy}/{case.name}"] = summarize(case, policy, result)
            say(progress_line(f"{policy}/{case.name}", row))
        base = results[f"{args.policies[0]}/{case.name}"]["balancer_cpu_ms_per_req"]
        for policy in args.policies[1:]:
            cpu = results[f"{policy}/{case.name}"]["balancer_cpu_ms_per_req"]
            ratios[f"{policy}/{case.name}"] = round(cpu / base, 3) if base else None
    return {"cases": results, "cpu_ratio_to_" + args.policies[0]: ratios}


async def start_collector() -> tuple[Any, int, dict[str, int]]:
    """An OTLP/HTTP receiver that accepts every export and drops it (counting the exports)."""
    from aiohttp import web

    counts = {"traces": 0, "metrics": 0}

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        counts[request.path.rsplit("/", 1)[-1]] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", accept)
    app.router.add_post("/v1/metrics", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    return runner, port, counts


async def bench_tracing(
    args: argparse.Namespace,
    procs: Processes,
    session: aiohttp.ClientSession,
    daemons: dict[str, str],
    pids: dict[str, psutil.Process],
    exports: dict[str, int],
) -> dict[str, Any]:
    """The same traffic through a daemon without a collector and one with it, side by side."""
    results: dict[str, list[dict[str, Any]]] = {}
    added: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    cases = [case for _ in range(args.rounds) for case in (Case(False, 16), Case(True, 64))]
    for case in cases:
        for mode in ("off", "otel", "otel", "off"):
            name = f"daemon-{mode}"
            result = await run_load(
                session,
                [daemons[name] + "/v1/chat/completions"],
                case,
                {"balancer": pids[name]},
                args.warmup,
                args.duration,
                args.requests,
            )
            procs.check()
            row = summarize(case, mode, result)
            results.setdefault(f"{mode}/{case.name}", []).append(row)
            say(progress_line(f"{mode}/{case.name}", row))
        this_round = {
            mode: [row["balancer_cpu_ms_per_req"] for row in results[f"{mode}/{case.name}"][-2:]]
            for mode in ("off", "otel")
        }
        diff = (sum(this_round["otel"]) - sum(this_round["off"])) / 2
        per_round.setdefault(case.name, []).append(round(diff, 4))
    for name, diffs in per_round.items():
        added[name] = round(statistics.median(diffs), 4)
    worst = max(added.values())
    return {
        "sample_ratio": float(TRACING_SAMPLE_RATIO),
        "rounds": args.rounds,
        "cases": results,
        "added_cpu_ms_per_req_per_round": per_round,
        "added_cpu_ms_per_req": added,
        "exports_received": dict(exports),
        "targets": {
            "added_cpu_ms_per_req": {"value": worst, "max": TARGET_TRACING_ADDED_CPU_MS},
            "met": worst <= TARGET_TRACING_ADDED_CPU_MS and exports["traces"] > 0,
        },
    }


def progress_line(name: str, row: dict[str, Any]) -> str:
    line = (
        f"{name:30} {row['rps']:>8} req/s  p50 {row['latency_ms']['p50']:>8} ms"
        f"  p99 {row['latency_ms']['p99']:>8} ms  ttfb p99 {row['ttfb_ms']['p99']:>8} ms"
    )
    if "balancer_cpu_ms_per_req" in row:
        line += f"  cpu {row['balancer_cpu_ms_per_req']} ms/req"
    if row["errors"]:
        line += f"  ERRORS {row['errors']} ({row.get('first_error')})"
    return line


def compare(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Balancer against direct, case by case (differences in ms)."""
    out: dict[str, dict[str, float]] = {}
    for name, row in results.items():
        if row["target"] != "balancer":
            continue
        case = name.split("/", 1)[1]
        base = results[f"direct/{case}"]
        lat, ttfb = row["latency_ms"], row["ttfb_ms"]
        out[case] = {
            "rps_ratio": round(row["rps"] / base["rps"], 3) if base["rps"] else None,
            "added_p50_ms": _diff(lat["p50"], base["latency_ms"]["p50"]),
            "added_p99_ms": _diff(lat["p99"], base["latency_ms"]["p99"]),
            "added_ttfb_p50_ms": _diff(ttfb["p50"], base["ttfb_ms"]["p50"]),
            "added_ttfb_p99_ms": _diff(ttfb["p99"], base["ttfb_ms"]["p99"]),
        }
    return out


def targets(
    results: dict[str, dict[str, Any]], vs: dict[str, dict[str, float | None]]
) -> dict[str, Any]:
    """The three figures the balancer is held to, each with its limit."""
    checks = {
        "balancer_cpu_ms_per_stream_req_c64": (
            results["balancer/stream/c64"]["balancer_cpu_ms_per_req"],
            TARGET_CPU_MS,
        ),
        "added_p50_ms_c1": (
            max(vs["plain/c1"]["added_p50_ms"] or 0.0, vs["stream/c1"]["added_p50_ms"] or 0.0),
            TARGET_ADDED_P50_MS,
        ),
        "added_ttfb_p99_ms_20ms_tokens_c64": (
            vs[SLOW.name]["added_ttfb_p99_ms"],
            TARGET_TTFB_P99_MS,
        ),
    }
    out: dict[str, Any] = {k: {"value": v, "max": limit} for k, (v, limit) in checks.items()}
    out["met"] = all(v is not None and v <= limit for v, limit in checks.values()) and not any(
        row["errors"] for row in results.values()
    )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/balancer.py",
        description="Measure the balancer's overhead against direct requests to fake workers.",
    )
    parser.add_argument(
        "--duration", type=float, default=8.0, help="measured seconds per case (default 8)"
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="end a case's window after this many requests"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured seconds before each window"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 s per case, 0.2 s warm-up"
    )
    parser.add_argument(
        "--policies",
        type=lambda text: [p for p in text.split(",") if p],
        default=None,
        help="compare balancing policies' CPU per request (e.g. least-connection,prefix)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="compare the balancer's CPU per request with and without an OTLP collector",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --tracing: repeat the off/on/on/off runs this many times (default 1)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1.0, 0.2
    if args.duration <= 0 or args.warmup < 0 or (args.requests is not None and args.requests < 1):
        parser.error("--duration must be positive, --warmup not negative, --requests at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flockctl-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            measured = runner(bench(args, procs, Path(tmp)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            say("interrupted; stopping the workers and the daemon")
            return 130
        except RuntimeError as exc:
            say(f"failed: {exc}")
            return 1
        finally:
            procs.stop_all()
    if args.tracing:
        measured["load_average"] = [round(x, 2) for x in os.getloadavg()]
        measured["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(measured, indent=2))
        return 0
    if args.policies:
        ratios = next(v for k, v in measured.items() if k.startswith("cpu_ratio_to_"))
        worst = max((r for r in ratios.values() if r is not None), default=None)
        measured["targets"] = {
            "worst_cpu_ratio": {"value": worst, "max": TARGET_POLICY_CPU_RATIO},
            "met": worst is not None and worst <= TARGET_POLICY_CPU_RATIO,
        }
        measured["load_average"] = [round(x, 2) for x in os.getloadavg()]
        measured["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(measured, indent=2))
        return 0
    results = measured["cases"]
    vs = compare(results)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
        },
        "settings": {
            "duration_s": args.duration,
            "requests": args.requests,
            "warmup_s": args.warmup,
            "tokens": TOKENS,
        },
        "daemon_idle_cpu_ms_per_s": measured["idle_cpu_ms_per_s"],
        "cases": results,
        "vs_direct": vs,
        "targets": targets(results, vs),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
