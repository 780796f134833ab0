"""The overview's widgets. They only render a status snapshot they are given; none talks HTTP."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.widgets import DataTable, Static

from flockctl.render import ago, engine_jobs, job_cells, memory_pair, natural_key, state_text

BAR_WIDTH = 10


def memory_bar(used: Any, total: Any) -> Text:
    """``█████░░░░░ 2.0/16.0 GiB``; the figures carry the meaning, the bar only shows it."""
    figures = memory_pair(used, total)
    if not isinstance(used, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
        return Text(figures)
    filled = round(BAR_WIDTH * min(1.0, used / total))
    return Text.assemble(("█" * filled, "bold"), ("░" * (BAR_WIDTH - filled), "dim"), f" {figures}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class KeyedTable(DataTable):
    """A table whose rows are kept by key: existing rows update in place, new keys are added and
    gone keys removed, and rows stay in ``natural_key`` order of their keys, which are the values
    of the first ``key_columns`` columns joined by '/'."""

    key_columns = 1
    COLUMNS: tuple[str, ...] = ()

    def on_mount(self) -> None:
        for name in self.COLUMNS:
            self.add_column(name, key=name.lower())
        self.cursor_type = "row"

    def sync(self, rows: dict[str, list[Any]]) -> None:
        current = {str(key.value) for key in self.rows}
        for gone in current - rows.keys():
            self.remove_row(gone)
        columns = list(self.columns)
        added = False
        for key, cells in rows.items():
            if key not in current:
                self.add_row(*cells, key=key)
                added = True
                continue
            for column, cell in zip(columns, cells, strict=True):
                if self.get_cell(key, column) != cell:
                    self.update_cell(key, column, cell)
        if added:  # new rows go in key order among the others
            self.sort(key=self._order)

    def _order(self, row: Any) -> Any:
        return natural_key(self._key_of(row))

    def _key_of(self, row: Any) -> str:
        return "/".join(str(cell) for cell in row[: self.key_columns])


class WorkersTable(KeyedTable):
    key_columns = 1
    COLUMNS = ("WORKER", "STATE", "PROVISIONER", "URL", "IN FLIGHT", "SERVED", "P50 MS", "MEMORY")

    def show(self, snap: dict[str, Any]) -> None:
        rows = {}
        for w in snap.get("workers") or []:
            mem = w.get("gpu_memory") or {}
            rows[str(w["id"])] = [
                str(w["id"]),
                state_text(str(w.get("state", "?"))),
                _cell(w.get("provisioner")),
                _cell(w.get("url")),
                _cell(w.get("in_flight")),
                _cell(w.get("served")),
                _cell(w.get("latency_p50_ms")),
                memory_bar(mem.get("used"), mem.get("total")),
            ]
        self.sync(rows)


class JobsTable(KeyedTable):
    key_columns = 2
    COLUMNS = ("WORKER", "JOB", "STATE", "LEVEL", "GENERATED", "PREEMPTIONS", "SPEC", "AGE")

    def show(self, snap: dict[str, Any]) -> None:
        jobs = engine_jobs(snap.get("workers") or [])
        self.sync({f"{w}/{job.get('id')}": job_cells(w, job) for w, job in jobs})


class DeploymentLine(Static):
    def show(self, snap: dict[str, Any], now: float | None = None) -> None:
        d = snap.get("deployment") or {}
        now = time.time() if now is None else now
        r = snap.get("requests") or {}
        self.update(
            Text.assemble(
                (str(d.get("name", "?")), "bold"),
                f"  {d.get('endpoint', '-')}  up {ago(d.get('started_at'), now)}",
                f"  provisioner {d.get('provisioner', '-')}  policy {d.get('policy', '-')}",
                f"  requests {r.get('total', 0)} ({_cell(r.get('rate'))}/s),",
                f" in flight {r.get('in_flight', 0)}, queued {r.get('queued', 0)},",
                f" failed {r.get('failed', 0)}",
            )
        )


class AutoscalerPanel(Static):
    def show(self, snap: dict[str, Any]) -> None:
        a = snap.get("autoscaler")
        if not isinstance(a, dict):
            self.update("autoscaler: none (static endpoints)")
            return
        current = snap.get("ready_workers", 0)
        thresholds = a.get("thresholds") or {}
        limits = ", ".join(f"{k} {_cell(v)}" for k, v in thresholds.items())
        decision = a.get("last_decision") or {}
        self.update(
            Text.assemble(
                ("autoscaler ", "bold"),
                f"{a.get('policy', '?')}: qlrm {_cell(a.get('qlrm'))}",
                f" ({limits})" if limits else "",
                f"  target {a.get('target', '-')} / ready {current}",
                f"  (bounds {a.get('min_workers', '-')}-{a.get('max_workers', '-')})\n",
                f"last decision: {decision.get('reason') or '-'}",
                (f"\n⚠ {a['launch_blocked']}", "bold") if a.get("launch_blocked") else "",
            )
        )
