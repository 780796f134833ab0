"""What one snapshot value looks like in a cell of the dashboard: the tables and the worker detail
format every figure here, so a figure reads the same on every screen (and as ``flockctl status``
prints it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.text import Text

from flockctl.render import memory_pair

BAR_WIDTH = 10
#: Where ``gpu_memory`` was read: the engine's device through NVML or torch, or the host's RAM.
GPU_SOURCES = frozenset({"nvml", "torch"})


def cell_text(value: Any) -> str:
    """A snapshot value as a cell shows it: '-' for none, floats without trailing zeros."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def ms_text(value: Any) -> str:
    """A latency in milliseconds with one decimal (``3.3``), as ``flockctl status`` prints it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.1f}"


def memory_bar(used: Any, total: Any) -> Text:
    """``█████░░░░░ 2.0/16.0 GiB``; the figures carry the meaning, the bar only shows it."""
    figures = memory_pair(used, total)
    if not isinstance(used, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
        return Text(figures)
    filled = round(BAR_WIDTH * min(1.0, used / total))
    return Text.assemble(("█" * filled, "bold"), ("░" * (BAR_WIDTH - filled), "dim"), f" {figures}")


def memory_place(mem: Mapping[str, Any]) -> str:
    """Whose memory ``gpu_memory`` measures: ``GPU cuda:0`` (the engine's device, read through
    NVML or torch), ``host`` (the machine's RAM, read through psutil: the engine runs on the
    CPU), or '' when the snapshot does not say."""
    device, source = mem.get("device"), mem.get("source")
    if source == "psutil" or (source is None and device == "cpu"):
        return "host"
    if source in GPU_SOURCES:
        return f"GPU {device}" if device else "GPU"
    return str(device) if device else ""


def memory_cell(mem: Any, width: int = 0) -> Text:
    """``GPU cuda:0 ██░░░░░░░░ 2.0/8.0 GiB``: where, then the bar; ``width`` pads the place so
    the bars of a column line up."""
    mem = mem if isinstance(mem, dict) else {}
    bar = memory_bar(mem.get("used"), mem.get("total"))
    place = memory_place(mem)
    if not place:
        return bar
    return Text.assemble(place.ljust(width) + " ", bar)


def preemptions(engine: Any) -> int | None:
    """The engine's preemptions since it started, every kind together (its ``/stats``
    ``preemptions_total`` counts them per kind); None for a worker without flockctl's engine."""
    if not isinstance(engine, dict):
        return None
    total = engine.get("preemptions_total")
    if isinstance(total, dict):
        return sum(v for v in total.values() if isinstance(v, int) and not isinstance(v, bool))
    return total if isinstance(total, int) and not isinstance(total, bool) else None
