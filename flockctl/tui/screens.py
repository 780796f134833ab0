"""The dashboard's screens. Each live screen renders the snapshot (and the extra documents it asked
the poller for, through ``paths()``) that the app hands it in ``show``; none talks HTTP."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar, cast

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, RichLog, Sparkline, Static

from flockctl import admin_routes as routes
from flockctl.render import ago, spec_text, state_text
from flockctl.schema import EngineView, LogChunk, StatusSnapshot, WorkerDetail, WorkerView
from flockctl.tui.cells import cell_text, memory_cell, ms_text, preemptions
from flockctl.tui.feed import FeedError
from flockctl.tui.latency import LatencyPanel, LatencyWindow
from flockctl.tui.layout import share_rows
from flockctl.tui.widgets import AutoscalerPanel, DeploymentLine, JobsTable, LiveTable, WorkersTable


class ConnectionLine(Static):
    """Disconnected, paused or read-only: one line under the header, empty when all is well."""

    def show(self, text: str, state: str | None) -> None:
        self.update(text)
        self.set_class(state == "lost", "lost")
        self.set_class(state == "paused", "paused")


class LiveScreen(Screen[None]):
    """A screen fed by the app's poller."""

    #: Composed and mounted, so ``show`` can find its widgets.
    ready = False

    def on_mount(self) -> None:
        self.ready = True
        self.app.resumed(self)  # type: ignore[attr-defined]

    def on_unmount(self) -> None:
        self.ready = False

    def paths(self) -> list[str]:
        """Admin API paths (besides ``/-/status``) this screen wants fetched on every poll."""
        return []

    def show(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        """Render ``snap``; ``extras`` maps each of ``paths()`` to its JSON or a ``FeedError``."""

    def selected_worker(self) -> str | None:
        """The worker the screen's actions apply to, if any."""
        return None

    def on_screen_resume(self) -> None:
        if self.ready:
            self.app.resumed(self)  # type: ignore[attr-defined]

    def open_filter(self) -> None:
        for box in self.query("#filter").results(Input):
            box.display = True
            box.focus()
        self.app.refresh_bindings()

    def close_filter(self) -> bool:
        """Clear and hide the filter; False when there was none open."""
        if not self.query("#filter"):
            return False
        box = self.query_one("#filter", Input)
        if not box.display and not box.value:
            return False
        box.value = ""
        box.display = False
        self.apply_filter("")
        self.focus_next()
        self.app.refresh_bindings()
        return True

    def apply_filter(self, text: str) -> None:
        """Show only what contains ``text``."""

    def filtering(self) -> bool:
        """Whether the filter box is open or holds text."""
        return any(box.display or box.value for box in self.query("#filter").results(Input))

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.apply_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            if not event.value:
                event.input.display = False
            self.focus_next()


def filter_box() -> Input:
    box = Input(placeholder="filter: rows containing this text (esc clears)", id="filter")
    box.display = False
    return box


#: Rows a table keeps however little it holds: its header and two rows.
MIN_TABLE_ROWS = 3


class OverviewScreen(LiveScreen):
    """Deployment, workers, autoscaler, latency per worker, engine jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.latency = LatencyWindow()

    def compose(self) -> ComposeResult:
        yield DeploymentLine("connecting…")
        yield ConnectionLine("", id="connection")
        yield WorkersTable(id="workers")
        with Horizontal(id="scaling"):
            yield Sparkline([], id="qlrm")
            yield AutoscalerPanel("")
        yield LatencyPanel("", id="latency")
        yield JobsTable(id="jobs")
        yield filter_box()
        yield Footer()

    def paths(self) -> list[str]:
        return [self.latency.path()]

    def show(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        path = self.latency.path()
        if path in extras:
            self.latency.take(extras[path])
        self.query_one(LatencyPanel).show(self.latency)
        self.query_one(DeploymentLine).show(snap)
        self.query_one(WorkersTable).show(snap)
        self.query_one(JobsTable).show(snap)
        self.query_one(AutoscalerPanel).show(snap)
        # Worker groups add a line each under the autoscaler: the panel grows to hold them.
        self.query_one("#scaling").set_class(bool(snap.get("groups")), "grouped")
        autoscaler = snap["autoscaler"]
        history = autoscaler["qlrm_history"] if autoscaler else []
        self.query_one(Sparkline).data = [float(v) for _t, v in history] or [0.0]
        self.fit_tables()

    def fit_tables(self) -> None:
        """Share the tables' rows by what each holds (``share_rows``): the workers table gets a
        fixed height, the jobs table (``1fr``) the rest, so the two always fill the same rows."""
        workers, jobs = self.query_one(WorkersTable), self.query_one(JobsTable)
        available = workers.outer_size.height + jobs.outer_size.height
        if available <= 0:
            return  # not laid out yet: the next poll or resize fits them
        needs = [max(MIN_TABLE_ROWS, t.rows_needed) for t in (workers, jobs)]
        workers.styles.height = share_rows(available, needs)[0]  # a layout only when it changed

    def on_resize(self) -> None:
        self.call_after_refresh(self.fit_tables)

    def selected_worker(self) -> str | None:
        jobs = self.query_one(JobsTable)
        if self.focused is jobs and jobs.cursor_key is not None:
            return JobsTable.worker_of(jobs.cursor_key)
        return self.query_one(WorkersTable).cursor_key

    def apply_filter(self, text: str) -> None:
        for table in self.query(LiveTable):
            table.filter = text
        self.fit_tables()

    def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        key = event.key
        worker = JobsTable.worker_of(key) if isinstance(event.table, JobsTable) else key
        self.app.open_worker(worker)  # type: ignore[attr-defined]


def _facts(rows: list[tuple[str, Any]]) -> Table:
    """Name and value pairs; a value is text or any renderable (a bar, a small table)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in rows:
        table.add_row(name, Text(value) if isinstance(value, str) else value)
    return table


class WorkerScreen(LiveScreen):
    """One worker: what it is, its probes, its engine's queues and speculation, its last lines."""

    LOG_LINES = 12

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def compose(self) -> ComposeResult:
        yield Static(f"worker {self.worker_id}", id="title")
        yield ConnectionLine("", id="connection")
        with VerticalScroll(id="body"):
            with Horizontal(id="columns"):
                yield Static("", id="facts")
                yield Static("", id="engine")
            yield Static("", id="probes")
            yield Label("recent log lines", classes="heading")
            yield RichLog(id="recent", wrap=True, markup=False, auto_scroll=True)
        yield Footer()

    def paths(self) -> list[str]:
        return [self._detail_path, self._log_path]

    @property
    def _detail_path(self) -> str:
        return routes.worker_path(self.worker_id)

    @property
    def _log_path(self) -> str:
        return routes.logs_path(self.worker_id, tail=self.LOG_LINES)

    def selected_worker(self) -> str | None:
        return self.worker_id

    def show(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        detail: WorkerDetail | FeedError | None = extras.get(self._detail_path)
        worker: WorkerView | None = next(
            (w for w in snap["workers"] if str(w["id"]) == self.worker_id), None
        )
        if isinstance(detail, dict):  # the worker as the snapshot has it, and more
            worker = detail
        title = self.query_one("#title", Static)
        if worker is None:
            title.update(
                Text.assemble(
                    (f"worker {self.worker_id}", "bold"), ": no longer in this deployment"
                )
            )
            return
        title.update(
            Text.assemble(
                (f"worker {self.worker_id}  ", "bold"),
                state_text(str(worker.get("state", "?"))),
                f"  {worker.get('provisioner', '-')}  {worker.get('url') or '-'}",
            )
        )
        self.query_one("#facts", Static).update(self._facts(worker))
        self.query_one("#engine", Static).update(self._engine(worker.get("engine")))
        self.query_one("#probes", Static).update(self._probes(worker, detail))
        self._log(extras.get(self._log_path))

    @staticmethod
    def _facts(w: WorkerView) -> Table:
        now = time.time()
        mem: Mapping[str, Any] = w.get("gpu_memory") or {}
        memory = memory_cell(mem)
        if mem.get("source"):
            memory.append(f" (read by {mem['source']})", style="dim")
        rows: list[tuple[str, Any]] = [
            ("reason", cell_text(w.get("reason"))),
            ("model", cell_text(w.get("model"))),
            ("command", cell_text(w.get("command"))),
            ("pid", cell_text(w.get("pid"))),
            ("created", f"{ago(w.get('created_at'), now)} ago"),
            ("ready", f"{ago(w.get('ready_at'), now)} ago" if w.get("ready_at") else "never"),
            ("in flight", cell_text(w.get("in_flight"))),
            ("served", cell_text(w.get("served"))),
            ("failures", cell_text(w.get("failures"))),
            ("p50 ms", ms_text(w.get("latency_p50_ms"))),
            ("memory", memory),
        ]
        if w.get("ended_at"):
            rows.append(("ended", f"{ago(w.get('ended_at'), now)} ago"))
        return _facts(rows)

    @staticmethod
    def _engine(engine: EngineView | None) -> Any:
        if not isinstance(engine, dict):
            return Text("not flockctl's engine: no queues or speculation to show", style="dim")
        queues = engine.get("queue_lengths") or []
        most = max([int(q) for q in queues if isinstance(q, int)] or [1]) or 1
        levels = Table.grid(padding=(0, 1))
        for level, length in enumerate(queues):
            n = int(length) if isinstance(length, int) else 0
            bar = "█" * round(10 * n / most) if n else ""
            levels.add_row(f"L{level}", Text(bar, style="bold"), str(n))
        kv = engine.get("kv") or {}
        rows: list[tuple[str, Any]] = [
            ("model", cell_text(engine.get("model"))),
            ("scheduler", cell_text(engine.get("scheduler"))),
            (
                "jobs",
                f"{cell_text(engine.get('running'))} running, {cell_text(engine.get('waiting'))}"
                f" waiting, {cell_text(engine.get('swapped'))} swapped",
            ),
            ("queues", levels if queues else "-"),
            ("kv tokens", _of(kv.get("used_tokens"), kv.get("budget_tokens"))),
            ("swaps", f"{cell_text(kv.get('swap_outs'))} out, {cell_text(kv.get('swap_ins'))} in"),
            ("preemptions", _preemptions(engine)),
        ]
        spec = engine.get("speculation")
        if isinstance(spec, dict):
            rate = spec.get("acceptance_rate")
            rows += [
                (
                    "speculation",
                    f"{spec.get('mode', 'on')}, {'active' if spec.get('active', True) else 'off'}"
                    + (f": {spec['reason']}" if spec.get("reason") else ""),
                ),
                ("accepted", "-" if rate is None else f"{rate:.0%} of drafted tokens"),
                ("tokens/step", spec_text(spec)),
                ("per position", cell_text(spec.get("num_accepted_tokens_per_pos"))),
            ]
        else:
            rows.append(("speculation", "off (no draft model)"))
        return _facts(rows)

    @staticmethod
    def _probes(worker: WorkerView, detail: WorkerDetail | FeedError | None) -> Text:
        history = detail.get("probe_history") if isinstance(detail, dict) else None
        out = Text.assemble(("probes  ", "bold"))
        if not history:
            last = worker.get("last_probe")
            out.append(f"last: {cell_text(last)}" if last else "none yet")
            return out
        for probe in history:
            ok = bool(probe.get("ok"))
            out.append("✓" if ok else "✗", style="green" if ok else "red bold")
        last = history[-1]
        ms = last.get("ms")
        out.append(
            f"  last {'ok' if last.get('ok') else 'FAILED'}"
            f"{'' if ms is None else f' in {ms:g} ms'}: {last.get('detail') or '-'}"
        )
        failed = [p for p in history if not p.get("ok")]
        if failed:
            out.append(f"\n        last failure: {failed[-1].get('detail') or '-'}")
        return out

    def _log(self, logs: Any) -> None:
        view = self.query_one("#recent", RichLog)
        view.clear()
        if isinstance(logs, FeedError):
            view.write(Text(str(logs), style="dim"))
        elif isinstance(logs, dict):
            for line in logs.get("lines") or []:
                view.write(Text(str(line)))


def _preemptions(engine: EngineView) -> str:
    """``5 (4 descheduled, 1 swapped, 0 recomputed)``: the total, then each kind."""
    kinds = engine.get("preemptions_total")
    total = cell_text(preemptions(engine))
    if not isinstance(kinds, dict) or not kinds:
        return total
    return f"{total} ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})"


def _of(used: Any, total: Any) -> str:
    if not isinstance(used, int) or not isinstance(total, int):
        return "-"
    return f"{used}/{total}"


class LogsScreen(LiveScreen):
    """A log that follows: the daemon's or a worker's, fetched by offset on every poll."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "toggle('follow')", "Follow", id="logs.follow"),
        Binding("w", "toggle('wrap')", "Wrap", id="logs.wrap"),
        Binding("s", "toggle('stamps')", "Timestamps", id="logs.timestamps"),
    ]
    TAIL = 500
    KEEP = 10_000

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.log_offset: int | None = None
        self.lines: deque[tuple[float, str]] = deque(maxlen=self.KEEP)
        self.follow = True
        self.wrap = False
        self.stamps = False
        self.needle = ""
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="title")
        yield ConnectionLine("", id="connection")
        yield RichLog(id="log", wrap=False, markup=False, auto_scroll=True, max_lines=self.KEEP)
        yield filter_box()
        yield Footer()

    def on_mount(self) -> None:
        self._title()
        super().on_mount()

    def paths(self) -> list[str]:
        if self.log_offset is None:
            return [routes.logs_path(self.target, tail=self.TAIL)]
        return [routes.logs_path(self.target, offset=self.log_offset)]

    def selected_worker(self) -> str | None:
        return None if self.target == routes.DAEMON_LOG else self.target

    def show(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        for path in self.paths():
            got = extras.get(path)
            if isinstance(got, FeedError):
                self.error = str(got)
                self._title()
            elif isinstance(got, dict):
                self.error = None
                self.take(cast(LogChunk, got))  # the daemon's answer to the logs path

    def take(self, answer: LogChunk) -> None:
        """Add what one fetch of the log returned."""
        if answer.get("reset"):
            self.lines.clear()
            self._redraw()
        if isinstance(answer.get("offset"), int):
            self.log_offset = answer["offset"]
        now = time.time()
        view = self.query_one("#log", RichLog)
        for line in answer.get("lines") or []:
            entry = (now, str(line))
            self.lines.append(entry)
            if self._passes(entry[1]):
                view.write(self._line_text(entry))
        self._title()

    def _passes(self, line: str) -> bool:
        return not self.needle or self.needle.casefold() in line.casefold()

    def _line_text(self, entry: tuple[float, str]) -> Text:
        at, line = entry
        text = Text(line)
        if self.needle:
            text.highlight_words([self.needle], "reverse", case_sensitive=False)
        if self.stamps:
            text = Text.assemble((time.strftime("%H:%M:%S ", time.localtime(at)), "dim"), text)
        return text

    def _redraw(self) -> None:
        view = self.query_one("#log", RichLog)
        view.clear()
        view.wrap = self.wrap
        view.auto_scroll = self.follow
        for entry in self.lines:
            if self._passes(entry[1]):
                view.write(self._line_text(entry))
        if self.follow:
            view.scroll_end(animate=False)

    def _title(self) -> None:
        shown = sum(1 for _at, line in self.lines if self._passes(line))
        parts = [
            "following" if self.follow else "not following (f follows)",
            f"wrap {'on' if self.wrap else 'off'}",
            f"timestamps {'on' if self.stamps else 'off'}",
            f"{shown} of {len(self.lines)} lines" if self.needle else f"{len(self.lines)} lines",
        ]
        if self.needle:
            parts.append(f"filter {self.needle!r}")
        title = Text.assemble((f"logs: {self.target}", "bold"), "  " + " · ".join(parts))
        if self.error:
            title.append(f"\n✗ {self.error}", style="bold")
        self.query_one("#title", Static).update(title)

    async def action_toggle(self, what: str) -> None:
        setattr(self, what, not getattr(self, what))
        self._redraw()
        self._title()

    def apply_filter(self, text: str) -> None:
        self.needle = text
        self._redraw()
        self._title()
