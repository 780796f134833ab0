"""A simulation's figures: the JSON document, the text summary, the plot, and a sweep's table.

The JSON keys ``requests``, ``worker_seconds``, ``cost``, ``ttft_p50_s``, ``ttft_p99_s``,
``latency_p99_s``, ``slo_attainment``, ``refused``, ``max_workers`` and ``scale_events`` are the
stable ones scripts read; the others (p90s, means, refusals by status, duration) complete them.
Latencies count from a request's arrival at the balancer, so time in the admission queue is in
them; refused and failed requests have none and count as missing the SLO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from flockctl.server.simulate.sim import Raw

SPARK = "▁▂▃▄▅▆▇█"


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (linear between order statistics), None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(raw: Raw, slo_ttft: float | None = None) -> dict[str, Any]:
    ttfts = [s[1] for s in raw.served]
    latencies = [s[2] for s in raw.served]
    requests = len(raw.arrivals)
    attained: float | None = None
    if slo_ttft is not None:
        met = sum(1 for t in ttfts if t <= slo_ttft)
        attained = met / requests if requests else None
    return {
        "requests": requests,
        "worker_seconds": round(raw.worker_seconds, 6),
        "cost": round(raw.cost, 6),
        "ttft_p50_s": _r(quantile(ttfts, 0.5)),
        "ttft_p90_s": _r(quantile(ttfts, 0.9)),
        "ttft_p99_s": _r(quantile(ttfts, 0.99)),
        "ttft_mean_s": _r(sum(ttfts) / len(ttfts)) if ttfts else None,
        "latency_p50_s": _r(quantile(latencies, 0.5)),
        "latency_p90_s": _r(quantile(latencies, 0.9)),
        "latency_p99_s": _r(quantile(latencies, 0.99)),
        "latency_mean_s": _r(sum(latencies) / len(latencies)) if latencies else None,
        "slo_ttft_s": slo_ttft,
        "slo_attainment": _r(attained),
        "served": len(raw.served),
        "refused": sum(raw.refused.values()),
        "refused_by_status": {str(code): n for code, n in raw.refused.items()},
        "failed": raw.failed,
        "preempted": raw.preempted,
        "max_workers": raw.max_workers,
        "duration_s": round(raw.duration, 3),
        "scale_events": [e.to_dict() for e in raw.scale_events],
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def render(summary: dict[str, Any], console: Console, events: int = 10) -> None:
    """The summary for a person: totals, latencies, and the first scale events with reasons."""
    s = summary
    refused = s["refused_by_status"]
    console.print(
        f"requests {s['requests']} over {s['duration_s']:.0f}s: served {s['served']},"
        f" refused {s['refused']} (429: {refused['429']}, 503: {refused['503']}),"
        f" failed {s['failed']}"
    )
    console.print(
        f"workers: max {s['max_workers']}, {s['worker_seconds']:.0f} worker-seconds,"
        f" cost {s['cost']:.2f}" + (f", {s['preempted']} preempted" if s["preempted"] else "")
    )
    table = Table(box=None, pad_edge=False)
    for col in ("", "p50", "p90", "p99", "mean"):
        table.add_column(col, justify="right" if col else "left")
    for name, key in (("TTFT", "ttft"), ("latency", "latency")):
        table.add_row(
            name,
            *(_s(s[f"{key}_{p}_s"]) for p in ("p50", "p90", "p99", "mean")),
        )
    console.print(table)
    if s["slo_attainment"] is not None:
        console.print(
            f"SLO: {s['slo_attainment']:.1%} of requests had TTFT <= {s['slo_ttft_s']:g}s"
        )
    changes = s["scale_events"]
    console.print(f"scale events: {len(changes)}")
    for e in changes[:events]:
        console.print(f"  {e['t']:>9.1f}s  {e['from']} -> {e['to']}  {e['reason']}", markup=False)
    if len(changes) > events:
        console.print(f"  ... and {len(changes) - events} more (--json lists them all)")


# -- plot ---------------------------------------------------------------------------------------


def spark(values: Sequence[float | None]) -> str:
    """One character per value, scaled to the largest; a gap where there is no value."""
    real = [v for v in values if v is not None]
    top = max(real, default=0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif top <= 0:
            out.append(SPARK[0])
        else:
            out.append(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)])
    return "".join(out)


def series(raw: Raw, width: int) -> dict[str, list[float | None]]:
    """Load (requests/s), live workers and p99 TTFT in ``width`` equal slices of the run."""
    span = max(raw.duration, 1e-9)
    step = span / width
    load = [0.0] * width
    ttft: list[list[float]] = [[] for _ in range(width)]
    for t in raw.arrivals:
        load[min(int(t / step), width - 1)] += 1 / step
    for arrival, first, _ in raw.served:
        ttft[min(int(arrival / step), width - 1)].append(first)
    workers: list[float | None] = [None] * width
    for sample in raw.samples:
        i = min(int(sample.t / step), width - 1)
        workers[i] = max(workers[i] or 0, sample.live)
    last = 0.0
    for i, w in enumerate(workers):  # a slice between two samples keeps the last count
        last = w if w is not None else last
        workers[i] = last
    return {
        "load": list(load),
        "workers": workers,
        "ttft_p99": [quantile(b, 0.99) for b in ttft],
    }


def plot(raw: Raw, console: Console, width: int | None = None) -> None:
    """Load, workers and p99 TTFT over simulated time, one line each (rich text, no colour
    needed to read it), as wide as the terminal allows."""
    width = width or max(console.width - 26, 16)
    lines = series(raw, width)
    labels = {
        "load": ("load", "req/s"),
        "workers": ("workers", ""),
        "ttft_p99": ("TTFT p99", "s"),
    }
    for key, values in lines.items():
        name, unit = labels[key]
        real = [v for v in values if v is not None]
        top = max(real, default=0.0)
        text = Text(f"{name:>9} ")
        text.append(spark(values), style="bold")
        text.append(f" max {top:.3g}{unit}")
        console.print(text, no_wrap=True, crop=False)
    console.print(f"{'':>9} 0s{'':>{max(width - 8, 1)}}{raw.duration:.0f}s")


# -- sweep --------------------------------------------------------------------------------------


def pareto(points: Sequence[tuple[float, float | None]]) -> list[bool]:
    """Which (cost, p99 TTFT) points no other point beats on both (lower is better); a point
    with no TTFT (nothing served) is never on the front."""
    front = []
    for i, (cost, ttft) in enumerate(points):
        if ttft is None:
            front.append(False)
            continue
        beaten = any(
            j != i and t is not None and c <= cost and t <= ttft and (c < cost or t < ttft)
            for j, (c, t) in enumerate(points)
        )
        front.append(not beaten)
    return front


def sweep_table(rows: list[dict[str, Any]], names: list[str], console: Console) -> None:
    """One row per setting of the grid; the Pareto front of cost vs p99 TTFT marked ``*``."""
    table = Table(title="sweep (* = Pareto front of cost vs p99 TTFT)", title_justify="left")
    for name in names:
        table.add_column(name.replace("_", "-"), no_wrap=True)
    for col in ("cost", "worker-s", "TTFT p99", "latency p99", "SLO", "refused", "max w", "front"):
        table.add_column(col, justify="right")
    for row in rows:
        s = row["result"]
        slo = "-" if s["slo_attainment"] is None else f"{s['slo_attainment']:.1%}"
        table.add_row(
            *(str(row["params"][n]) for n in names),
            f"{s['cost']:.2f}",
            f"{s['worker_seconds']:.0f}",
            _s(s["ttft_p99_s"]),
            _s(s["latency_p99_s"]),
            slo,
            str(s["refused"]),
            str(s["max_workers"]),
            "* pareto" if row["pareto"] else "",
        )
    console.print(table)
