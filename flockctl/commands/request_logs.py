"""``flockctl logs requests``: the balancer's request log (``requests.jsonl`` and its rotated
files), as a table or JSON lines, filtered by status and latency, and followed with ``-f``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from flockctl.console import emit_json, fail
from flockctl.exitcodes import ExitCode
from flockctl.request_log_reader import (
    HEADERS,
    Record,
    RequestFilter,
    cells,
    last_matching,
    parse_statuses,
)
from flockctl.request_log_reader import follow as follow_log
from flockctl.state import REQUEST_LOG

StatusOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--status",
        help="Requests log only: those with this status, 5xx, 4xx ... or 429 (repeatable).",
        show_default=False,
    ),
]
SlowOpt = Annotated[
    float | None,
    typer.Option(
        "--slow",
        help="Requests log only: those that took at least this many ms.",
        min=0,
        show_default=False,
    ),
]


def matcher(status: list[str] | None, slow: float | None) -> Callable[[Record], bool]:
    """A filter for request log records; a status that is not ``NNN`` or ``Nxx`` is a usage
    error naming the flag."""
    try:
        exact, classes = parse_statuses(status or [])
    except ValueError as exc:
        fail(f"--status {exc}", ExitCode.USAGE)
    return RequestFilter(exact, classes, slow).matches


def request_logs(
    directory: Path,
    *,
    follow: bool,
    tail: int,
    as_json: bool,
    status: list[str] | None,
    slow: float | None,
) -> None:
    match = matcher(status, slow)
    records = last_matching(directory, tail, match) if tail else []
    if as_json:
        for record in records:
            emit_json(record)
    elif records:
        print_table(records)
    elif not follow:
        print(
            f"flockctl: no requests logged{' that match' if status or slow else ''}"
            f" in {directory / REQUEST_LOG}",
            file=sys.stderr,
        )
    if follow:
        try:
            for record in follow_log(directory / REQUEST_LOG):
                if not match(record):
                    continue
                if as_json:
                    emit_json(record)
                else:
                    print(row_line(record), flush=True)
        except KeyboardInterrupt:
            return


def row_line(record: Record) -> str:
    """One record as a line of text, for following the log."""
    return "  ".join(cells(record))


def print_table(records: list[Record]) -> None:
    from rich.table import Table

    from flockctl.render import status_console

    table = Table(box=None, pad_edge=False)
    for header in HEADERS:
        numeric = header.endswith("ms") or header == "status"
        table.add_column(header, justify="right" if numeric else "left", no_wrap=True)
    for record in records:
        table.add_row(*cells(record))
    status_console().print(table)
