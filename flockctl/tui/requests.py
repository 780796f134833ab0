"""The requests screen (``r``): the daemon's request log as it grows, filtered; ``enter`` on a
request opens its attempts and, for flockctl's engine, the job's timeline.

Records come from ``GET /-/requests``, fetched after the newest one shown, so following costs one
small answer per poll. The filter (``/``) is one line, as ``RequestFilter.parse`` reads it:
``5xx >500ms worker:w1 text``; the daemon applies it, so the screen shows the newest matches even
when they are rare.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Footer, Input, Label, Static

from flockctl import admin_routes as routes
from flockctl.request_log_reader import HEADERS, Record, RequestFilter, attempts_of, cells
from flockctl.schema import StatusSnapshot
from flockctl.tui.feed import FeedError
from flockctl.tui.screens import ConnectionLine, LiveScreen
from flockctl.tui.widgets import Cell, LiveTable

FILTER_HINT = "filter: 5xx 503 >500ms worker:w1 text (enter applies, esc clears)"


def status_text(status: Any) -> Text:
    """A status as a word that reads without colour, styled by its class."""
    code = status if isinstance(status, int) else 0
    style = "bold red" if code >= 500 or code == 0 else "yellow" if code >= 400 else ""
    return Text(str(status), style=style)


class RequestsTable(LiveTable):
    """One row per request, oldest at the top; the row key is the record's number."""

    COLUMNS = tuple(h.upper() for h in HEADERS)
    RIGHT = frozenset({"STATUS", "QUEUE MS", "TTFB MS", "MS"})

    def show(self, records: dict[str, Record]) -> None:
        following = self.row_count == 0 or self.cursor >= self.row_count - 1
        rows: dict[str, list[Cell]] = {}
        for key, record in records.items():
            row: list[Cell] = list(cells(record))
            row[1] = status_text(record.get("status"))
            rows[key] = row
        self.sync(rows)
        if following:  # the cursor on the newest row stays on it; scrolled once laid out
            self.move_cursor(self.row_count - 1)
            self.call_after_refresh(lambda: self.move_cursor(self.row_count - 1))


class RequestsScreen(LiveScreen):
    """The request log, followed."""

    #: Records shown at most; the oldest go first.
    KEEP = 1000
    #: Records asked for when the screen opens or the filter changes.
    FIRST = 200

    def __init__(self) -> None:
        super().__init__()
        self.records: OrderedDict[str, Record] = OrderedDict()
        self.last: int | None = None
        self.keep = RequestFilter()
        self.problem: str | None = None
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="title")
        yield ConnectionLine("", id="connection")
        yield RequestsTable(id="requests")
        box = Input(placeholder=FILTER_HINT, id="filter")
        box.display = False
        yield box
        yield Footer()

    def on_mount(self) -> None:
        self._title()
        super().on_mount()

    def paths(self) -> list[str]:
        keep = self.keep
        statuses = sorted(str(s) for s in keep.statuses) + [f"{c}xx" for c in keep.classes]
        return [
            routes.requests_path(
                after=self.last,
                limit=self.FIRST if self.last is None else routes.MAX_REQUESTS,
                status=statuses,
                slow=keep.slow_ms,
                worker=keep.worker,
                text=keep.text or None,
            )
        ]

    def show(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        got = extras.get(self.paths()[0])
        if isinstance(got, FeedError):
            self.error = str(got)
        elif isinstance(got, dict):
            self.error = None
            self.take(got)
        self._title()

    def take(self, answer: dict[str, Any]) -> None:
        """Add one ``GET /-/requests`` answer."""
        if answer.get("reset"):
            self.records.clear()
        for record in answer.get("records") or []:
            if isinstance(record, dict) and isinstance(record.get("seq"), int):
                self.records[str(record["seq"])] = record
        while len(self.records) > self.KEEP:
            self.records.popitem(last=False)
        if isinstance(answer.get("last"), int):
            self.last = answer["last"]
        self.query_one(RequestsTable).show(self.records)

    def apply_filter(self, text: str) -> None:
        try:
            keep = RequestFilter.parse(text)
        except ValueError as exc:
            self.problem = str(exc)
        else:
            self.problem = None
            if keep != self.keep:  # the daemon filters: ask it again from the newest
                self.keep, self.last = keep, None
                self.records.clear()
                self.query_one(RequestsTable).show(self.records)
                self.app.poll_now()  # type: ignore[attr-defined]
        self._title()

    def _title(self) -> None:
        parts = [f"{len(self.records)} requests", "following the newest"]
        if self.keep:
            parts.append(f"filter {self.keep.describe()!r}")
        title = Text.assemble(("requests", "bold"), "  " + " · ".join(parts))
        for problem in (self.problem, self.error):
            if problem:
                title.append(f"\n✗ {problem}", style="bold")
        self.query_one("#title", Static).update(title)

    def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        record = self.records.get(event.key)
        if record is not None:
            self.app.push_screen(RequestScreen(record))
            self.app.poll_now()  # type: ignore[attr-defined]


class RequestScreen(LiveScreen):
    """One request: what the log says, each attempt, and its engine job's timeline."""

    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record = record
        response_id = record.get("response_id")
        self.response_id = str(response_id) if response_id else None
        #: The job as its engine reported it, once finished (then it is not fetched again).
        self.job: dict[str, Any] | None = None
        self.job_error: str | None = None

    def compose(self) -> ComposeResult:
        title = f"request {self.record.get('request_id') or '-'}"
        yield Static(Text(title, style="bold"), id="title")
        yield ConnectionLine("", id="connection")
        with VerticalScroll(id="body"):
            yield Static(facts(self.record), id="facts")
            yield Label("attempts", classes="heading")
            yield Static(attempts_table(self.record), id="attempts")
            yield Label("engine job", classes="heading")
            yield Static(self._timeline(), id="timeline")
        yield Footer()

    def paths(self) -> list[str]:
        if self.response_id is None or self._finished():
            return []
        return [routes.job_path(self.response_id)]

    def _finished(self) -> bool:
        return self.job is not None and any(
            e.get("event") == "finished" for e in self.job.get("events") or []
        )

    def show(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        for path in self.paths():
            got = extras.get(path)
            if isinstance(got, FeedError):
                self.job_error = str(got)
            elif isinstance(got, dict):
                self.job, self.job_error = got, None
        self.query_one("#timeline", Static).update(self._timeline())

    def _timeline(self) -> Any:
        if self.response_id is None:
            return Text(
                "no response id in the log: not an answer from flockctl's engine, or an error",
                style="dim",
            )
        if self.job is None:
            if self.job_error:
                return Text(f"✗ {self.job_error}", style="dim")
            return Text(f"fetching /jobs/{self.response_id}…", style="dim")
        return timeline(self.job)


def _ms(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.1f}"


def _seconds_ms(value: Any) -> str:
    return _ms(value * 1000) if isinstance(value, int | float) else "-"


def facts(record: Record) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    prompt, completion = record.get("prompt_tokens"), record.get("completion_tokens")
    rows: list[tuple[str, Any]] = [
        ("time (UTC)", record.get("time")),
        ("status", status_text(record.get("status"))),
        ("request", f"{record.get('method', '-')} {record.get('path', '-')}"),
        ("model", record.get("model")),
        ("client", record.get("client")),
        ("worker", record.get("worker")),
        (
            "ms",
            f"queue {_ms(record.get('queue_ms'))}, first byte {_ms(record.get('ttfb_ms'))},"
            f" in all {_ms(record.get('latency_ms'))}",
        ),
        ("bytes", f"{record.get('bytes_in', '-')} in, {record.get('bytes_out', '-')} out"),
        (
            "tokens",
            f"{prompt if prompt is not None else '-'} prompt, "
            f"{completion if completion is not None else '-'} completion",
        ),
        ("trace id", record.get("trace_id")),
        ("response id", record.get("response_id")),
    ]
    for name, value in rows:
        shown = value if isinstance(value, Text) else Text("-" if value is None else str(value))
        table.add_row(name, shown)
    return table


def attempts_table(record: Record) -> Any:
    attempts = attempts_of(record)
    if not attempts:
        return Text("none: the balancer answered itself (no worker was tried)", style="dim")
    table = Table(box=None, pad_edge=False, padding=(0, 2), show_edge=False)
    for name, right in (("#", True), ("WORKER", False), ("ANSWER", False), ("MS", True)):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for n, attempt in enumerate(attempts, 1):
        error = attempt.get("error")
        answer = status_text(attempt.get("status")) if error is None else Text(f"✗ {error}")
        table.add_row(str(n), str(attempt.get("worker", "-")), answer, _ms(attempt.get("ms")))
    return table


def timeline(job: dict[str, Any]) -> Any:
    """The engine's events for the job, with the times from its arrival."""
    kinds = job.get("preemptions_by_kind") or {}
    preempted = ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n) or "none"
    summary = Text.assemble(
        (f"job {job.get('id', '-')}", "bold"),
        f"  {job.get('state', '-')}",
        f"  queue {_seconds_ms(job.get('queue_time'))} ms",
        f"  first token {_seconds_ms(job.get('time_to_first_token'))} ms",
        f"  preemptions {preempted}",
        f"  finish {job.get('finish_reason') or '-'}",
    )
    table = Table(box=None, pad_edge=False, padding=(0, 2), show_edge=False)
    table.add_column("EVENT", no_wrap=True)
    table.add_column("AT MS", justify="right", no_wrap=True)
    table.add_column("DETAIL")
    for event in job.get("events") or []:
        detail = event.get("detail")
        table.add_row(
            str(event.get("event", "-")),
            _seconds_ms(event.get("at")),
            "" if detail is None else str(detail),
        )
    grid = Table.grid()
    grid.add_row(summary)
    grid.add_row(table)
    return grid
