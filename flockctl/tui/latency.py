"""The overview's latency panel: time to first byte and latency, p50 and p99, per worker over the
last minutes, with a sparkline of each worker's p99 latency.

It is fed the daemon's request log records through ``GET /-/requests``, fetched after the last
one it has (``after``), so an idle deployment costs one small answer per poll. ``LatencyWindow``
holds the figures (plain logic with an injectable clock); ``LatencyPanel`` only draws them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from flockctl import admin_routes as routes
from flockctl.request_log_reader import Record

#: The minutes the panel covers, and the width of one sparkline bar.
WINDOW_SECONDS = 300.0
BUCKET_SECONDS = 15.0
#: Records kept at most (a busy deployment's window is a sample of its newest requests).
MAX_KEPT = 20_000
BARS = "▁▂▃▄▅▆▇█"


def epoch(stamp: Any) -> float | None:
    """A record's ``time`` (ISO 8601, UTC) in seconds since the epoch; None when unreadable."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted ``values`` (``share`` 0.5 is the median)."""
    rank = max(0, min(len(values) - 1, math.ceil(share * len(values)) - 1))
    return values[rank]


class WorkerLatency:
    """One worker's figures over the window."""

    def __init__(self, worker: str, samples: list[tuple[float, float | None, float]], now: float):
        self.worker = worker
        self.requests = len(samples)
        ttfb = sorted(t for _at, t, _l in samples if t is not None)
        latency = sorted(lat for _at, _t, lat in samples)
        self.ttfb = (percentile(ttfb, 0.5), percentile(ttfb, 0.99)) if ttfb else None
        self.latency = (percentile(latency, 0.5), percentile(latency, 0.99))
        buckets: list[list[float]] = [[] for _ in range(int(WINDOW_SECONDS / BUCKET_SECONDS))]
        for at, _t, lat in samples:
            index = len(buckets) - 1 - int((now - at) // BUCKET_SECONDS)
            if 0 <= index < len(buckets):
                buckets[index].append(lat)
        #: The p99 latency of each bucket, oldest first; None where no request ended.
        self.p99s = [percentile(sorted(b), 0.99) if b else None for b in buckets]


class LatencyWindow:
    """The request log's records of the last ``WINDOW_SECONDS``, and where to fetch more from."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        #: The number (``seq``) of the newest record taken; None before the first fetch.
        self.last: int | None = None
        self._samples: deque[tuple[float, str, float | None, float]] = deque(maxlen=MAX_KEPT)
        self.error: str | None = None

    def path(self) -> str:
        """What to fetch next: the records after the newest one taken."""
        return routes.requests_path(after=self.last, limit=routes.MAX_REQUESTS)

    def take(self, answer: Any) -> None:
        """Add one ``GET /-/requests`` answer (or note the error it was)."""
        if not isinstance(answer, dict):
            self.error = str(answer) if answer is not None else None
            return
        self.error = None
        if answer.get("reset"):  # a new daemon numbers its records afresh
            self._samples.clear()
        self.add(answer.get("records") or [])
        last = answer.get("last")
        if isinstance(last, int):
            self.last = last

    def add(self, records: Iterable[Record]) -> None:
        for record in records:
            at, latency = epoch(record.get("time")), record.get("latency_ms")
            worker = record.get("worker")
            if at is None or not isinstance(latency, int | float) or not worker:
                continue  # refused at the front door: no worker to show it under
            ttfb = record.get("ttfb_ms")
            ttfb = float(ttfb) if isinstance(ttfb, int | float) else None
            self._samples.append((at, str(worker), ttfb, float(latency)))

    def workers(self) -> list[WorkerLatency]:
        """Each worker with a request in the window, busiest first."""
        now = self.clock()
        since = now - WINDOW_SECONDS
        while self._samples and self._samples[0][0] < since:
            self._samples.popleft()
        by_worker: dict[str, list[tuple[float, float | None, float]]] = {}
        for at, worker, ttfb, latency in self._samples:
            if at >= since:  # one out of order (a clock step) is left out, not shown as new
                by_worker.setdefault(worker, []).append((at, ttfb, latency))
        found = [WorkerLatency(w, s, now) for w, s in by_worker.items()]
        return sorted(found, key=lambda w: (-w.requests, w.worker))


def sparkline(values: list[float | None], top: float) -> Text:
    """One bar per value, scaled to ``top``; a gap where there was nothing."""
    out = Text()
    for value in values:
        if value is None or top <= 0:
            out.append("·", style="dim")
        else:
            out.append(BARS[min(len(BARS) - 1, int(value / top * (len(BARS) - 1) + 0.5))])
    return out


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


class LatencyPanel(Static):
    """The figures of a ``LatencyWindow``: a row per worker, at most ``MAX_ROWS``."""

    MAX_ROWS = 4

    def show(self, window: LatencyWindow) -> None:
        workers = window.workers()
        minutes = f"{WINDOW_SECONDS / 60:g} min"
        if window.error:
            self.update(Text(f"latency: ✗ {window.error}", style="dim"))
            return
        if not workers:
            self.update(Text(f"latency: no requests answered in the last {minutes}", style="dim"))
            return
        top = max((p for w in workers for p in w.p99s if p is not None), default=0.0)
        table = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False)
        table.add_column(f"LATENCY, last {minutes}", no_wrap=True)
        for name in ("REQS", "TTFB P50", "TTFB P99", "P50 MS", "P99 MS"):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column(f"P99 PER {BUCKET_SECONDS:g} S (█ {_ms(top)} ms)", no_wrap=True)
        for w in workers[: self.MAX_ROWS]:
            ttfb = (_ms(w.ttfb[0]), _ms(w.ttfb[1])) if w.ttfb else ("-", "-")
            table.add_row(
                w.worker,
                str(w.requests),
                *ttfb,
                _ms(w.latency[0]),
                _ms(w.latency[1]),
                sparkline(w.p99s, top),
            )
        more = len(workers) - self.MAX_ROWS
        if more > 0:
            table.add_row(Text(f"+{more} more", style="dim"))
        self.update(table)
