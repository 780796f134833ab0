"""CPU the dashboard uses while it watches a large deployment.

    python bench/dashboard.py            # 20 workers, 200 jobs, 1 s polls, 30 s measured
    python bench/dashboard.py --quick    # 5 s

A status server of this script's own serves snapshots of 20 workers with 10 engine jobs each on
127.0.0.1; every snapshot differs from the last (counters, ages, states and the job set move), so
every poll makes the dashboard update its tables. The dashboard runs as its own process, a real
`flockctl.tui` app on a 140x40 screen (under tmux when it is installed, else Textual's headless
driver), and psutil reads that process's CPU time over the window. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web
from common import HOST, cpu_seconds, machine, say

TOKEN = "bench"
TARGET = 0.10  # of one core


def snapshot(tick: int, workers: int, jobs: int) -> dict[str, Any]:
    rows = []
    states = ("running", "waiting", "preempted", "swapped")
    for w in range(1, workers + 1):
        engine_jobs = [
            {
                "id": f"job-{tick + j}",  # the set of jobs moves on every poll
                "state": states[(tick + j) % 4],
                "level": (tick + j) % 6,
                "generated_tokens": tick * 3 + j,
                "preemptions": (tick + j) % 5,
                "age": tick + j * 0.5,
                "speculation": {"enabled": True, "mean_accepted_length": 2 + (j % 3) / 2},
            }
            for j in range(jobs // workers)
        ]
        rows.append(
            {
                "id": f"w{w}",
                "state": "READY" if (w + tick) % 7 else "DRAINING",
                "provisioner": "local",
                "url": f"http://127.0.0.1:{9000 + w}",
                "in_flight": (w * tick) % 9,
                "served": tick * w,
                "latency_p50_ms": 10 + (tick % 10),
                "gpu_memory": {"used": (w % 8 + 1) << 30, "total": 16 << 30},
                "engine": {"engine": "flockctl", "queue_lengths": [1, 2, 3], "jobs": engine_jobs},
            }
        )
    return {
        "schema": 1,
        "deployment": {"name": "bench", "endpoint": "http://127.0.0.1:3000", "started_at": 0},
        "autoscaler": {
            "policy": "qlrm",
            "target": workers,
            "min_workers": 1,
            "max_workers": workers,
            "qlrm": tick % 10,
            "qlrm_history": [[t, (t * 7) % 10] for t in range(max(0, tick - 60), tick)],
            "thresholds": {"autoscale_up": 7, "autoscale_down": 4},
            "last_decision": {"target": workers, "reason": f"tick {tick}"},
            "launch_blocked": None,
        },
        "requests": {"total": tick * 100, "in_flight": 5, "queued": 0, "failed": 0, "rate": 3.5},
        "ready_workers": workers,
        "workers": rows,
    }


DASHBOARD = """
import sys
from flockctl.themes import load_themes
from flockctl.tui.app import Dashboard
from flockctl.tui.feed import Feed
app = Dashboard(Feed(sys.argv[1], sys.argv[2]), float(sys.argv[3]), load_themes(), "flockctl-dark")
app.run(headless=sys.argv[4] == "headless", size=(140, 40))
"""


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    polls = 0

    async def status(request: web.Request) -> web.Response:
        nonlocal polls
        polls += 1
        return web.json_response(snapshot(polls, args.workers, args.jobs))

    async def requests(request: web.Request) -> web.Response:
        return web.json_response({"records": [], "last": 0, "reset": False})

    app = web.Application()
    app.router.add_get("/-/status", status)
    app.router.add_get("/-/requests", requests)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    url = f"http://{HOST}:{runner.addresses[0][1]}"
    tmux = shutil.which("tmux") if not args.headless else None
    script = Path(tempfile.mkdtemp(prefix="flockctl-bench-")) / "dashboard.py"
    script.write_text(DASHBOARD)
    argv = [sys.executable, str(script), url, TOKEN, str(args.interval)]
    socket_name = f"flockctl-bench-{os.getpid()}"
    if tmux:
        command = " ".join(shlex.quote(part) for part in [*argv, "tty"])
        subprocess.run(
            [tmux, "-L", socket_name, "new-session", "-d", "-x", "140", "-y", "40", command],
            check=True,
        )
        pid = int(
            subprocess.run(
                [tmux, "-L", socket_name, "list-panes", "-F", "#{pane_pid}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        proc = psutil.Process(pid)
        mode = "tmux"
    else:
        child = subprocess.Popen([*argv, "headless"])
        proc = psutil.Process(child.pid)
        mode = "headless"
    try:
        await asyncio.sleep(args.warmup)
        if not proc.is_running():
            raise RuntimeError("the dashboard exited during the warm-up")
        cpu0, polls0, t0 = cpu_seconds(proc), polls, time.monotonic()
        await asyncio.sleep(args.duration)
        cpu1, polls1, t1 = cpu_seconds(proc), polls, time.monotonic()
    finally:
        if tmux:
            subprocess.run([tmux, "-L", socket_name, "kill-server"], capture_output=True)
        else:
            child.terminate()
            child.wait(10)
        await runner.cleanup()
    share = (cpu1 - cpu0) / (t1 - t0)
    return {
        "machine": machine(),
        "mode": mode,
        "workers": args.workers,
        "jobs": args.jobs,
        "interval_s": args.interval,
        "window_s": round(t1 - t0, 2),
        "polls": polls1 - polls0,
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "cpu_share_of_one_core": round(share, 4),
        "targets": {
            "cpu_share_of_one_core": {
                "value": round(share, 4),
                "max": TARGET,
                "pass": share < TARGET,
            }
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/dashboard.py", description=__doc__)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--headless", action="store_true", help="Textual's headless driver")
    parser.add_argument("--quick", action="store_true", help="5 s window")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 5.0
    try:
        report = asyncio.run(bench(args))
    except (RuntimeError, OSError) as exc:
        say(f"failed: {exc}")
        return 1
    print(json.dumps(report, indent=2))
    say(
        f"dashboard CPU: {report['cpu_share_of_one_core']:.1%} of one core"
        f" ({report['mode']}, {report['polls']} polls); target under {TARGET:.0%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
