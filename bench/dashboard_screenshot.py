"""An SVG screenshot of the dashboard's overview under load, for the docs.

    python bench/dashboard_screenshot.py    # docs/screenshots/dashboard-overview-after.svg
    python bench/dashboard_screenshot.py -o path/to/file.svg

Five workers in mixed states (engine workers on a GPU and on the host, one draining, one
starting) and 20 jobs on each engine: the snapshot of ``bench/dashboard.py`` at one tick, with the
fields a real engine adds (device and memory source, preemption totals) and a fractional qlrm and
p50, and 5 minutes of request log records for the latency panel. The app runs headless on a
140x40 screen, fed that snapshot; prints the path it wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from dashboard import snapshot

from flockctl import admin_routes as routes
from flockctl.themes import load_themes
from flockctl.tui.app import Dashboard
from flockctl.tui.feed import Feed
from flockctl.tui.widgets import JobsTable, WorkersTable

SIZE = (140, 40)
DEFAULT = Path(__file__).resolve().parent.parent / "docs/screenshots/dashboard-overview-after.svg"


def loaded() -> dict[str, Any]:
    """Five workers, 100 engine jobs, and what a real deployment adds to the bench's snapshot."""
    snap = snapshot(tick=12, workers=5, jobs=100)
    devices = [("cuda", "nvml"), ("cuda", "torch"), ("cpu", "psutil"), ("mps", "torch")]
    for i, worker in enumerate(snap["workers"][:4]):
        device, source = devices[i]
        worker["gpu_memory"] |= {"device": device, "source": source}
        worker["latency_p50_ms"] = [3.3333, 12.4567, 187.25, 41.0][i]
        kinds = {"descheduled": 3 * i + 1, "swapped": i, "recomputed": i % 2}
        worker["engine"]["preemptions_total"] = kinds
    starting = snap["workers"][4]
    starting.update(state="STARTING", url=None, in_flight=0, served=0, latency_p50_ms=None)
    starting.update(gpu_memory=None, engine=None)
    snap["autoscaler"]["qlrm"] = 0.00619762
    snap["autoscaler"].setdefault("launch_blocked", None)  # the snapshot's key since schema 1
    return snap


#: The moment the screenshot shows: the latency panel's clock and the records' times.
NOW = 1_767_225_600.0


def request_records(workers: list[str]) -> dict[str, Any]:
    """A ``GET /-/requests`` answer: a request every 2 s for 5 minutes, round the workers, each
    worker with its own latency and the third one slowing down in the last minute."""
    records = []
    for i in range(150):
        worker = workers[i % len(workers)]
        ago = 299 - 2 * i
        base = [30.0, 85.0, 140.0, 400.0][i % len(workers)]
        latency = base * (1 + (i % 7) / 10) * (3 if worker == workers[2] and ago < 60 else 1)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - ago)) + ".000Z"
        records.append(
            {
                "time": stamp,
                "worker": worker,
                "status": 200,
                "seq": i + 1,
                "ttfb_ms": round(latency / 4, 3),
                "latency_ms": round(latency, 3),
            }
        )
    return {"records": records, "last": len(records), "reset": False}


class Recorded(Feed):
    """The same snapshot on every poll, without a daemon."""

    def __init__(self, snap: dict[str, Any]) -> None:
        super().__init__("http://127.0.0.1:0", None)
        self.snap = snap

    async def status(self) -> dict[str, Any]:
        return self.snap

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        if path.startswith(routes.REQUESTS):
            ready = [w["id"] for w in self.snap["workers"] if w["state"] == "READY"]
            return request_records(ready[:4] or ["w1"])
        return await super().call(method, path, **kwargs)


async def shoot(path: Path) -> None:
    snap = loaded()
    app = Dashboard(Recorded(snap), interval=60, themes=load_themes(), theme_name="flockctl-dark")
    app.overview.latency.clock = lambda: NOW
    async with app.run_test(size=SIZE) as pilot:
        workers = app.query_one(WorkersTable)
        for _ in range(250):
            jobs = app.query_one(JobsTable).row_count
            if workers.row_count == len(snap["workers"]) and jobs and app.overview.latency.last:
                break
            await pilot.pause(0.02)
        await pilot.pause()
        path.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(path.name, str(path.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/dashboard_screenshot.py", description=__doc__
    )
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT)
    args = parser.parse_args(argv)
    asyncio.run(shoot(args.output))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
