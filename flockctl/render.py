"""The status snapshot as a rich renderable.

Every state has a glyph and a word, so nothing is shown by colour alone.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATE_STYLE: dict[str, tuple[str, str]] = {
    "READY": ("●", "green"),
    "STARTING": ("◐", "yellow"),
    "PROVISIONING": ("◌", "yellow"),
    "PENDING": ("○", "dim"),
    "NOT_READY": ("▲", "red"),
    "DRAINING": ("◑", "magenta"),
    "TERMINATED": ("■", "dim"),
    "FAILED": ("✗", "bold red"),
}


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def state_text(state: str) -> Text:
    glyph, style = STATE_STYLE.get(state, ("?", ""))
    return Text(f"{glyph} {state}", style=style)


def status_view(snap: dict[str, Any]) -> Group:
    now = snap.get("generated_at") or time.time()
    dep = snap["deployment"]
    auto = snap.get("autoscaler") or {}
    req = snap["requests"]
    head = Text.assemble(
        (dep["name"], "bold"),
        "  ",
        (dep["endpoint"], "cyan"),
        f"  provisioner {dep['provisioner']}  policy {dep['policy']}",
        f"  up {ago(dep['started_at'], now)}",
    )
    qlrm = auto.get("qlrm")
    scale = Text.assemble(
        ("autoscaler ", "bold"),
        f"{auto.get('policy')}  target {auto.get('target')}",
        f" (min {auto.get('min_workers')}, max {auto.get('max_workers')})",
        f"  qlrm {'-' if qlrm is None else f'{qlrm:.2f}'}",
        f"  {(auto.get('last_decision') or {}).get('reason', '')}",
    )
    traffic = Text(
        f"requests {req['total']} total  {req['in_flight']} in flight  {req['queued']} queued"
        f"  {req['failed']} failed  {req['retried']} retried  {req['rate']:.1f}/s"
    )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (
        ("ID", "left"),
        ("STATE", "left"),
        ("PID", "right"),
        ("URL", "left"),
        ("IN FLIGHT", "right"),
        ("SERVED", "right"),
        ("P50 MS", "right"),
        ("FAILS", "right"),
        ("AGE", "right"),
        ("REASON", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for w in snap["workers"]:
        p50 = w.get("latency_p50_ms")
        table.add_row(
            w["id"],
            state_text(w["state"]),
            str(w["pid"] or "-"),
            w["url"] or "-",
            str(w["in_flight"]),
            str(w["served"]),
            "-" if p50 is None else f"{p50:.1f}",
            str(w["failures"]),
            ago(w["created_at"], now),
            Text(w.get("reason") or "", style="dim"),
        )
    parts: list[Any] = [head, scale, traffic]
    if auto.get("launch_blocked"):
        parts.append(Text(f"✗ {auto['launch_blocked']}", style="bold red"))
    parts.append(table if snap["workers"] else Text("no workers", style="dim"))
    return Group(*parts)
