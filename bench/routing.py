"""Routing policies on real engines: prefix routing for multi-turn chat, latency routing around a
slow worker.

    python bench/routing.py [--mode prefix|latency|both] [--model demo] [--sessions 8]
                            [--turns 4] [--system-chars 2400] [--rate 1.0] [--think 1.0]
                            [--max-tokens 8] [--requests 160] [--slow-requests 80]
                            [--tenant-streams 8] [--latency-args FLAGS] [--repeats 2]
                            [--seed 0]

Each configuration starts two engine workers (``flockctl engine serve``) and a foreground daemon
over them (``flockctl up --endpoint A --endpoint B --policy P``) on free 127.0.0.1 ports, runs
the same trace through the daemon, reads each engine's ``/stats``, and stops everything it
started (on errors and Ctrl-C too). Stdout gets one JSON object; progress goes to stderr.

``--mode prefix``: a multi-turn chat trace. Sessions start as a Poisson process (``--rate`` per
second); each has a system prompt of ``--system-chars`` characters of its own (the demo's code
snippets in a session-seeded order) and ``--turns`` turns, each the whole conversation so far
(the engine's earlier answers included) plus a new question, sent ``--think`` seconds (mean,
exponential) after the previous answer ended. Run three ways: least-connection with the engines'
``--prefix-caching off``, least-connection with it on, ``--policy prefix`` with it on. Reported:
mean and p99 time to first token (the first streamed chunk), requests and tokens per second,
and the prompt tokens served from the engines' caches (their ``/stats`` ``prefix_cache``).

``--mode latency``: an honestly slow worker. Both engines run the same flags
(``--latency-engine-args``, prefix caching off), but engine 2 also serves another tenant:
``--tenant-streams`` clients send it ``--tenant-chars``-character prompts for ``--tenant-tokens``
tokens each, straight to the engine (bypassing the balancer, so least-connection cannot see that
load), until request ``--slow-requests`` of the trace arrives. The trace is ``--requests``
unrelated completions as a Poisson process (``--latency-rate`` per second), the same for
least-connection and ``--policy latency``, each run ``--repeats`` times in alternating order.
Reported per run and phase (while the tenant loads engine 2, after it stopped, and that phase's
second half): mean and p99 time to first token and latency, and the share of requests engine 2
answered (told by the instance token its response ids begin with).

Both engines share this machine's cores with the daemon and the client, so a run is a
comparison within one run, not an absolute figure; the load average is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import HOST, PROMPTS, Processes, free_port, percentile, say, wait_until

from flockctl.engine.job import instance_of

TARGET_PREFIX_VS_OFF = 2.0
TARGET_PREFIX_VS_ON = 1.3
TARGET_LATENCY = 1.3


def system_prompt(session: int, chars: int) -> str:
    order = list(PROMPTS)
    random.Random(session).shuffle(order)
    text = f"# session {session}: answer as the code below would.\n" + "\n".join(order)
    return (text * (chars // len(text) + 1))[:chars]


async def stream(
    http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int
) -> tuple[float, float, str, int, str]:
    """One streamed completion: (time to first chunk, whole time, text, tokens, response id)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = 0.0
    text: list[str] = []
    tokens = 0
    rid = ""
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"completion failed: {r.status} {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            rid = rid or event.get("id", "")
            choice = event["choices"][0]
            if choice.get("text"):
                if not first:
                    first = time.perf_counter() - t0
                text.append(choice["text"])
                tokens += 1
    return first, time.perf_counter() - t0, "".join(text), tokens, rid


async def chat_trace(http: aiohttp.ClientSession, url: str, args: argparse.Namespace) -> dict:
    """The multi-turn trace; every request's TTFT and tokens."""
    rng = random.Random(args.seed)
    starts: list[float] = []
    t = 0.0
    for _ in range(args.sessions):
        t += rng.expovariate(args.rate)
        starts.append(t)
    thinks = [[rng.expovariate(1 / args.think) for _ in range(args.turns)] for _ in starts]
    ttfts: list[float] = []
    tokens = 0

    async def session(i: int) -> None:
        nonlocal tokens
        await asyncio.sleep(starts[i])
        conversation = system_prompt(i, args.system_chars)
        for turn in range(args.turns):
            question = PROMPTS[(i + turn) % len(PROMPTS)]
            conversation += f"\n# user: {question}\n# assistant:"
            ttft, _, answer, n, _ = await stream(http, url, conversation, args.max_tokens)
            ttfts.append(ttft)
            tokens += n
            conversation += answer
            await asyncio.sleep(thinks[i][turn])

    began = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(args.sessions)))
    wall = time.perf_counter() - began
    return {"ttfts": ttfts, "tokens": tokens, "wall": wall}


async def tenant_load(
    http: aiohttp.ClientSession, url: str, args: argparse.Namespace, stop: asyncio.Event
) -> int:
    """Another tenant's traffic sent to ``url`` directly (the balancer never sees it):
    ``--tenant-streams`` clients, each sending its next long-prompt completion when the last
    one ended, until ``stop`` is set. Returns the completions it got."""
    done = 0

    async def client(k: int) -> None:
        nonlocal done
        n = 0
        while not stop.is_set():
            order = list(PROMPTS)
            random.Random(5000 + 97 * k + n).shuffle(order)
            text = f"# tenant {k} job {n}\n" + "\n".join(order)
            prompt = (text * (args.tenant_chars // len(text) + 1))[: args.tenant_chars]
            await stream(http, url, prompt, args.tenant_tokens)
            done += 1
            n += 1

    await asyncio.gather(*(client(k) for k in range(args.tenant_streams)))
    return done


async def slow_worker_trace(
    http: aiohttp.ClientSession, url: str, slow_url: str, args: argparse.Namespace
) -> dict:
    """``--requests`` unrelated completions as a Poisson process through the balancer; another
    tenant loads the slow engine directly until request ``--slow-requests`` arrives, then stops.
    Each request's arrival, time to first token, whole latency and the engine that answered."""
    rng = random.Random(args.seed)
    arrivals: list[float] = []
    at = 0.0
    for _ in range(args.requests):
        at += rng.expovariate(args.latency_rate)
        arrivals.append(at)
    slow_until = arrivals[min(args.slow_requests, args.requests) - 1] if args.slow_requests else 0
    rows: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def one(i: int) -> None:
        await asyncio.sleep(arrivals[i])
        order = list(PROMPTS)
        random.Random(1000 + i).shuffle(order)
        prompt = f"# request {i}\n" + "\n".join(order)[: args.system_chars // 4]
        first, whole, _, _, rid = await stream(http, url, prompt, args.max_tokens)
        rows.append(
            {
                "i": i,
                "slow_phase": arrivals[i] <= slow_until,
                "ttft": first,
                "latency": whole,
                "instance": instance_of(rid),
            }
        )

    async def end_slowness() -> None:
        await asyncio.sleep(slow_until)
        stop.set()

    began = time.perf_counter()
    tenant = asyncio.create_task(tenant_load(http, slow_url, args, stop))
    await asyncio.gather(end_slowness(), *(one(i) for i in range(args.requests)))
    tenant_done = await tenant
    wall = time.perf_counter() - began
    return {
        "rows": sorted(rows, key=lambda r: r["i"]),
        "tenant_requests": tenant_done,
        "wall": wall,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def run_config(
    args: argparse.Namespace,
    name: str,
    policy: str,
    engine_args: list[str],
    trace: str,
    daemon_args: str = "",
) -> dict[str, Any]:
    """Two engines and a daemon with ``policy`` (and ``daemon_args``, more ``flockctl up``
    flags); the trace through it; everything stopped."""
    with tempfile.TemporaryDirectory(prefix="flockctl-routing-") as tmp:
        procs = Processes(Path(tmp))
        try:
            engines = []
            for i, extra in enumerate(engine_args, 1):
                port = free_port()
                argv = [sys.executable, "-m", "flockctl", "engine", "serve", "--model", args.model]
                argv += ["--host", HOST, "--port", str(port), *shlex.split(extra)]
                procs.start(f"engine{i}", argv)
                engines.append(f"http://{HOST}:{port}")
            port = free_port()
            argv = [sys.executable, "-m", "flockctl", "up", "--foreground", "--name", "routing"]
            argv += ["--host", HOST, "--port", str(port), "--policy", policy]
            for url in engines:
                argv += ["--endpoint", url]
            argv += ["--probe-interval", "1", *shlex.split(daemon_args)]
            env = {**os.environ, "FLOCKCTL_HOME": str(Path(tmp) / "home")}
            env.pop("FLOCKCTL_NAME", None)
            procs.start("daemon", argv, env)
            balancer = f"http://{HOST}:{port}"
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def ready() -> bool:
                    async with http.get(balancer + "/health") as r:
                        return r.status == 200 and (await r.json())["ready_workers"] == 2

                await wait_until(ready, f"{name}: the daemon and both engines", 300, procs)
                # One request to each engine directly: it warms it, and its answer's id names
                # the engine (the instance token every id it gives out begins with).
                instances = []
                for url in engines:
                    *_, rid = await stream(http, url, "# warm up\n" + PROMPTS[0], 2)
                    instances.append(instance_of(rid))
                say(f"{name}: running the {trace} trace")
                if trace == "chat":
                    result = await chat_trace(http, balancer, args)
                else:
                    result = await slow_worker_trace(http, balancer, engines[-1], args)
                    result["slow_instance"] = instances[-1]
                procs.check()
                caches = []
                for url in engines:
                    async with http.get(url + "/stats") as r:
                        caches.append((await r.json()).get("prefix_cache"))
        finally:
            procs.stop_all()
    return {"policy": policy, "engine_args": engine_args, **result, "caches": caches}


def chat_row(run: dict[str, Any]) -> dict[str, Any]:
    ttfts = sorted(run["ttfts"])
    queries = sum((c or {}).get("queries", 0) for c in run["caches"])
    hits = sum((c or {}).get("hits", 0) for c in run["caches"])
    return {
        "policy": run["policy"],
        "engine_args": run["engine_args"],
        "requests": len(ttfts),
        "ttft_mean_ms": _ms(sum(ttfts) / len(ttfts)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "requests_per_s": round(len(ttfts) / run["wall"], 3),
        "tokens_per_s": round(run["tokens"] / run["wall"], 2),
        "cache_hit_rate": round(hits / queries, 4) if queries else None,
    }


def _summary(rows: list[dict[str, Any]], slow: str) -> dict[str, Any]:
    """Mean and p99 time to first token and latency of ``rows``, and the share the slow engine
    answered."""
    if not rows:
        return {"requests": 0}
    ttft = sorted(r["ttft"] for r in rows)
    lat = sorted(r["latency"] for r in rows)
    return {
        "requests": len(rows),
        "ttft_mean_ms": _ms(sum(ttft) / len(ttft)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "latency_mean_ms": _ms(sum(lat) / len(lat)),
        "latency_p99_ms": _ms(percentile(lat, 99)),
        "to_slow_worker": round(sum(r["instance"] == slow for r in rows) / len(rows), 3),
        "latency_mean_ms_on_slow_worker": _mean_ms([r for r in rows if r["instance"] == slow]),
        "latency_mean_ms_on_other_worker": _mean_ms([r for r in rows if r["instance"] != slow]),
    }


def _mean_ms(rows: list[dict[str, Any]]) -> float | None:
    return _ms(sum(r["latency"] for r in rows) / len(rows)) if rows else None


def latency_row(run: dict[str, Any]) -> dict[str, Any]:
    """A slow-worker run by phase: while the other tenant loads it, and after it stopped (all
    of that phase, and its second half, where the slow engine should have won traffic back)."""
    rows, slow = run["rows"], run["slow_instance"]
    after = [r for r in rows if not r["slow_phase"]]
    return {
        "policy": run["policy"],
        "engine_args": run["engine_args"],
        "slow_phase": _summary([r for r in rows if r["slow_phase"]], slow),
        "after": _summary(after, slow),
        "after_second_half": _summary(after[len(after) // 2 :], slow),
        "whole_trace": _summary(rows, slow),
        "tenant_requests": run["tenant_requests"],
        "requests_per_s": round(len(rows) / run["wall"], 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.mode in ("prefix", "both"):
        t = args.threads
        off = f"--threads {t} --prefix-caching off"
        on = f"--threads {t} --prefix-caching on"
        rows = {
            "least-connection/caching-off": chat_row(
                await run_config(args, "lc-off", "least-connection", [off, off], "chat")
            ),
            "least-connection/caching-on": chat_row(
                await run_config(args, "lc-on", "least-connection", [on, on], "chat")
            ),
            "prefix/caching-on": chat_row(
                await run_config(args, "prefix-on", "prefix", [on, on], "chat")
            ),
        }
        prefix = rows["prefix/caching-on"]["ttft_mean_ms"]
        vs_off = ratio(rows["least-connection/caching-off"]["ttft_mean_ms"], prefix)
        vs_on = ratio(rows["least-connection/caching-on"]["ttft_mean_ms"], prefix)
        out["prefix"] = {
            "runs": rows,
            "ttft_mean_ratio_vs_prefix": {
                "least-connection/caching-off": vs_off,
                "least-connection/caching-on": vs_on,
            },
            "targets": {
                "vs_caching_off": {"value": vs_off, "min": TARGET_PREFIX_VS_OFF},
                "vs_caching_on": {"value": vs_on, "min": TARGET_PREFIX_VS_ON},
                "met": bool(
                    vs_off
                    and vs_on
                    and vs_off >= TARGET_PREFIX_VS_OFF
                    and vs_on >= TARGET_PREFIX_VS_ON
                ),
            },
        }
    if args.mode in ("latency", "both"):
        engine = args.latency_engine_args + " --prefix-caching off"
        pair = [engine, engine]
        runs: dict[str, list[dict[str, Any]]] = {"least-connection": [], "latency": []}
        for rep in range(args.repeats):
            for policy in (
                ("least-connection", "latency") if rep % 2 == 0 else ("latency", "least-connection")
            ):
                extra = args.latency_args if policy == "latency" else ""
                run = await run_config(args, f"{policy} #{rep + 1}", policy, pair, "slow", extra)
                runs[policy].append(latency_row(run))
        ratios = [
            ratio(lc["slow_phase"]["latency_mean_ms"], lat["slow_phase"]["latency_mean_ms"])
            for lc, lat in zip(runs["least-connection"], runs["latency"], strict=True)
        ]
        worst = min((r for r in ratios if r is not None), default=None)
        out["latency"] = {
            "slow_worker": (
                f"engine 2 also serves another tenant: {args.tenant_streams} clients sending"
                f" {args.tenant_chars}-character prompts for {args.tenant_tokens} tokens to it"
                f" directly, until request {args.slow_requests} of {args.requests} arrives"
            ),
            "runs": runs,
            "slow_phase_latency_mean_ratio_least_connection_over_latency": ratios,
            "targets": {
                "value": worst,
                "min": TARGET_LATENCY,
                "met": bool(worst and worst >= TARGET_LATENCY),
            },
        }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/routing.py", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("prefix", "latency", "both"), default="both")
    p.add_argument("--model", default="demo", help="engine --model (default demo)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-chars", type=int, default=2400)
    p.add_argument("--rate", type=float, default=1.0, help="sessions started per second")
    p.add_argument("--think", type=float, default=1.0, help="mean seconds between turns")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="engine threads (prefix mode)")
    p.add_argument("--requests", type=int, default=160, help="latency mode: requests")
    p.add_argument(
        "--slow-requests",
        type=int,
        default=80,
        help="latency mode: the other tenant stops when this request arrives",
    )
    p.add_argument("--latency-rate", type=float, default=2.0, help="latency mode: requests/s")
    p.add_argument(
        "--latency-engine-args", default="--threads 1", help="latency mode: both engines' flags"
    )
    p.add_argument(
        "--latency-args",
        default="",
        help="latency mode: more flockctl up flags for the --policy latency daemon"
        " (e.g. '--latency-decay 5 --latency-probe-interval 0.5')",
    )
    p.add_argument(
        "--tenant-streams",
        type=int,
        default=8,
        help="latency mode: the other tenant's concurrent clients on engine 2",
    )
    p.add_argument(
        "--tenant-chars",
        type=int,
        default=4000,
        help="latency mode: the other tenant's prompt length",
    )
    p.add_argument(
        "--tenant-tokens",
        type=int,
        default=16,
        help="latency mode: the other tenant's answer length",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="latency mode: runs of each policy, alternating which goes first",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        report = asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; the engines and daemons are stopped")
        return 130
    except RuntimeError as exc:
        say(f"failed: {exc}")
        return 1
    report["settings"] = {k: v for k, v in vars(args).items()}
    report["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
