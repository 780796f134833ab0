"""``flockctl logs requests``: the balancer's request log (``requests.jsonl`` and its rotated
files), as a table or JSON lines, filtered by status and latency, and followed with ``-f``."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from flockctl.console import emit_json, fail
from flockctl.exitcodes import ExitCode
from flockctl.state import REQUEST_LOG, request_log_files

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

Record = dict[str, Any]
_STATUS = re.compile(r"[1-5](?:xx|\d\d)")


def matcher(status: list[str] | None, slow: float | None) -> Callable[[Record], bool]:
    """A filter for request log records; a status that is not ``NNN`` or ``Nxx`` is a usage
    error naming the flag."""
    exact: set[int] = set()
    classes: set[int] = set()
    for given in status or []:
        text = given.strip().lower()
        if not _STATUS.fullmatch(text):
            fail(
                f"--status {given!r}: give a status such as 503, or a class such as 5xx",
                ExitCode.USAGE,
            )
        if text.endswith("xx"):
            classes.add(int(text[0]))
        else:
            exact.add(int(text))

    def match(record: Record) -> bool:
        code = record.get("status")
        if (exact or classes) and not (
            isinstance(code, int) and (code in exact or code // 100 in classes)
        ):
            return False
        latency = record.get("latency_ms")
        return slow is None or (isinstance(latency, int | float) and latency >= slow)

    return match


def _records(lines: Iterator[bytes]) -> Iterator[Record]:
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash, or not the log's
        if isinstance(record, dict):
            yield record


def last_matching(directory: Path, tail: int, match: Callable[[Record], bool]) -> list[Record]:
    """The last ``tail`` matching records across the rotated files, oldest first."""
    found: deque[Record] = deque()
    for path in reversed(request_log_files(directory)):  # newest file first
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            continue
        for record in _records(reversed(lines)):
            if len(found) >= tail:
                return list(found)
            if match(record):
                found.appendleft(record)
    return list(found)


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
            for record in _follow(directory / REQUEST_LOG):
                if not match(record):
                    continue
                if as_json:
                    emit_json(record)
                else:
                    print(row_line(record), flush=True)
        except KeyboardInterrupt:
            return


def _follow(path: Path) -> Iterator[Record]:
    """Records appended to ``path``; when it is rotated away, the new live file from its start."""
    handle = None
    inode = None
    buffer = b""
    from_start = not path.exists()  # a log that comes into being is read whole
    while True:
        if handle is None:
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                from_start = True
                time.sleep(0.25)
                continue
            inode = os.fstat(handle.fileno()).st_ino
            if not from_start:
                handle.seek(0, os.SEEK_END)
            buffer = b""
        chunk = handle.read()
        if chunk:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            yield from _records(iter(complete))
            continue
        try:
            rotated = os.stat(path).st_ino != inode
        except FileNotFoundError:
            rotated = True
        if rotated:  # what is left in the old file was read above
            handle.close()
            handle, from_start = None, True
            continue
        time.sleep(0.25)


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.0f}"


def _cells(record: Record) -> list[str]:
    attempts = record.get("attempts") or []
    tried = ",".join(str(a.get("worker")) for a in attempts) if len(attempts) > 1 else ""
    prompt, completion = record.get("prompt_tokens"), record.get("completion_tokens")
    tokens = "-" if prompt is None and completion is None else f"{prompt or 0}/{completion or 0}"
    time_text = str(record.get("time", ""))
    return [
        time_text[11:23] if len(time_text) >= 23 else time_text,
        str(record.get("status", "")),
        str(record.get("method", "")),
        str(record.get("path", "")),
        str(record.get("model") or "-"),
        str(record.get("worker") or "-"),
        f"{len(attempts)}{f' ({tried})' if tried else ''}",
        _ms(record.get("queue_ms")),
        _ms(record.get("ttfb_ms")),
        _ms(record.get("latency_ms")),
        tokens,
        str(record.get("request_id") or "-"),
    ]


HEADERS = [
    "time (UTC)",
    "status",
    "method",
    "path",
    "model",
    "worker",
    "attempts",
    "queue ms",
    "ttfb ms",
    "ms",
    "tokens in/out",
    "request id",
]


def row_line(record: Record) -> str:
    """One record as a line of text, for following the log."""
    return "  ".join(_cells(record))


def print_table(records: list[Record]) -> None:
    from rich.table import Table

    from flockctl.render import status_console

    table = Table(box=None, pad_edge=False)
    for header in HEADERS:
        numeric = header.endswith("ms") or header == "status"
        table.add_column(header, justify="right" if numeric else "left", no_wrap=True)
    for record in records:
        table.add_row(*_cells(record))
    status_console().print(table)
