"""Is ``flockctl simulate`` faithful? One synthetic trace, replayed against a real local deployment
and through the simulator, for the qlrm and request-rate autoscalers.

The real deployment is ``flockctl up --foreground`` with local workers that are the tests' fake
OpenAI server timed by the same service model (``tests/fake_worker.py --service-model``, which
runs the simulator's own worker model on its loop), so what differs is everything else: real
processes starting, probes, HTTP, the event loop under load. Mean and p99 latency and
worker-seconds are compared; the issue asks them to agree within 15%.

    python bench/simulate_validate.py [--duration 600] [--rate 3] [--seed 1]

Prints one JSON object. A worker's cold start in the simulator is ``--start-delay`` plus the
measured time a fake worker takes to start answering probes (``--boot``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HOST, Processes, free_port, say, wait_until

from flockctl.server.simulate.report import summarize
from flockctl.server.simulate.service import ServiceModel
from flockctl.server.simulate.sim import simulate
from flockctl.server.simulate.trace import Trace, synthetic
from flockctl.server.spec_file import resolve

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_worker.py"

MODEL = ServiceModel(
    prefill_tokens_per_s=2000,
    decode_tokens_per_s=50,
    max_batch_size=4,
    capacity=8,
    cold_start_s=0,  # set from --start-delay and --boot
)

AUTOSCALERS: dict[str, dict[str, Any]] = {
    "qlrm": {
        "autoscaler": "qlrm",
        "autoscale_up": 3,
        "autoscale_down": 1,
        "queue_tracking_window": 30,
        "upscale_delay": 10,
        "downscale_delay": 30,
    },
    "request-rate": {
        "autoscaler": "request-rate",
        "target_qps_per_replica": 1.5,
        "upscale_delay": 10,
        "downscale_delay": 30,
    },
}


def flags_of(settings: dict[str, Any]) -> list[str]:
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


async def replay(http: aiohttp.ClientSession, url: str, trace: Trace) -> dict[str, Any]:
    """Send every request at its time; per request its TTFT and latency, or its status."""
    start = time.monotonic()
    served: list[tuple[float, float, float]] = []
    refused = {429: 0, 503: 0}

    async def one(t: float, prompt: int, output: int) -> None:
        await asyncio.sleep(max(start + t - time.monotonic(), 0))
        sent = time.monotonic()
        body = {
            "model": "fake",
            "prompt": "x",
            "max_tokens": max(output, 1),
            "fake_prompt_tokens": prompt,
            "stream": True,
        }
        async with http.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                refused[r.status] = refused.get(r.status, 0) + 1
                await r.read()
                return
            first = None
            async for _chunk in r.content.iter_any():
                first = first if first is not None else time.monotonic()
        end = time.monotonic()
        served.append((t, (first or end) - sent, end - sent))

    await asyncio.gather(*(one(r.t, r.prompt_tokens, r.output_tokens) for r in trace.requests))
    return {"served": served, "refused": refused, "elapsed": time.monotonic() - start}


def worker_seconds(home: Path, name: str, now: float) -> tuple[float, int]:
    env = {**os.environ, "FLOCKCTL_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "flockctl", "status", "--json", "--name", name],
        capture_output=True,
        env=env,
        check=True,
        text=True,
    ).stdout
    workers = json.loads(out)["workers"]
    total = sum((w["ended_at"] or now) - w["created_at"] for w in workers)
    return total, len(workers)


async def real_run(
    args: argparse.Namespace, name: str, settings: dict[str, Any], trace: Trace, model_file: Path
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flockctl-simval-") as tmp:
        procs = Processes(Path(tmp))
        home = Path(tmp) / "home"
        try:
            port = free_port()
            command = (
                f"{sys.executable} {FAKE} --port {{port}} --service-model {model_file}"
                f" --start-delay {args.start_delay}"
            )
            argv = [sys.executable, "-m", "flockctl", "up", "--foreground", "--name", name]
            argv += ["--host", HOST, "--port", str(port), "--worker-command", command]
            argv += ["--min-workers", "1", "--max-workers", str(args.max_workers)]
            argv += ["--worker-capacity", str(MODEL.worker_capacity), "--probe-interval", "0.5"]
            argv += flags_of(settings)
            env = {**os.environ, "FLOCKCTL_HOME": str(home)}
            env.pop("FLOCKCTL_NAME", None)
            procs.start("daemon", argv, env)
            url = f"http://{HOST}:{port}"
            timeout = aiohttp.ClientTimeout(total=None)
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(timeout=timeout, connector=conn) as http:

                async def ready() -> bool:
                    async with http.get(url + "/health") as r:
                        return r.status == 200 and (await r.json())["ready_workers"] >= 1

                await wait_until(ready, f"{name}: the daemon and its first worker", 120, procs)
                say(f"{name}: replaying {len(trace.requests)} requests over {trace.duration:g}s")
                begin = time.time()
                result = await replay(http, url, trace)
                end = time.time()
                # The trace may end before its duration: the worker-seconds cover the same span.
                span = max(trace.duration, result["elapsed"])
                seconds, count = worker_seconds(home, name, begin + span)
                procs.check()
        finally:
            procs.stop_all()
    return {**result, "worker_seconds": seconds, "workers": count, "wall": end - begin}


def stats(served: list[tuple[float, float, float]]) -> dict[str, float | None]:
    lat = sorted(s[2] for s in served)
    if not lat:
        return {"latency_mean_s": None, "latency_p99_s": None}
    p99 = lat[min(len(lat) - 1, int(0.99 * (len(lat) - 1) + 0.5))]
    return {"latency_mean_s": sum(lat) / len(lat), "latency_p99_s": p99}


def gap(real: float | None, sim: float | None) -> float | None:
    if real is None or sim is None or real == 0:
        return None
    return round(abs(sim - real) / real, 4)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    trace = synthetic(f"poisson:{args.rate}:{args.duration}", args.seed, 64, 32)
    model = MODEL.replace(cold_start_s=args.start_delay + args.boot)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flockctl-simval-model-") as tmp:
        model_file = Path(tmp) / "model.json"
        model_file.write_text(json.dumps(MODEL.to_dict()))
        for name, settings in AUTOSCALERS.items():
            cfg = resolve(
                None,
                {
                    **settings,
                    "min_workers": 1,
                    "max_workers": args.max_workers,
                    "worker_capacity": MODEL.worker_capacity,
                },
            )
            # The simulator runs its own loop: on a thread, beside this one.
            raw = await asyncio.to_thread(simulate, trace, cfg, model, args.seed)
            sim = summarize(raw)
            real = await real_run(args, name.replace("-", ""), settings, trace, model_file)
            mine = stats(real["served"])
            row = {
                "autoscaler": name,
                "real": {
                    **{k: round(v, 4) for k, v in mine.items() if v is not None},
                    "worker_seconds": round(real["worker_seconds"], 1),
                    "workers_launched": real["workers"],
                    "refused": real["refused"],
                },
                "simulated": {
                    "latency_mean_s": sim["latency_mean_s"],
                    "latency_p99_s": sim["latency_p99_s"],
                    "worker_seconds": round(sim["worker_seconds"], 1),
                    "max_workers": sim["max_workers"],
                    "refused": sim["refused_by_status"],
                },
            }
            row["relative_gap"] = {
                "latency_mean": gap(mine["latency_mean_s"], sim["latency_mean_s"]),
                "latency_p99": gap(mine["latency_p99_s"], sim["latency_p99_s"]),
                "worker_seconds": gap(real["worker_seconds"], sim["worker_seconds"]),
            }
            say(f"{name}: {json.dumps(row['relative_gap'])}")
            rows.append(row)
    return {
        "trace": f"poisson:{args.rate}:{args.duration} (seed {args.seed}), prompts ~64,"
        " outputs ~32 tokens",
        "service_model": MODEL.to_dict() | {"cold_start_s": model.cold_start_s},
        "runs": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="Seconds of trace.")
    parser.add_argument("--rate", type=float, default=3, help="Requests per second.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=4)
    parser.add_argument("--start-delay", type=float, default=3, help="A worker's load time.")
    parser.add_argument(
        "--boot", type=float, default=1.0, help="Seconds a fake worker takes to start answering."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(asyncio.run(bench(parse_args(argv))), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
