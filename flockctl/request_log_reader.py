"""Reading the daemon's request log: its records, which of them a filter keeps, and following it.

``flockctl logs requests`` reads the files in the state directory; the daemon answers
``GET /-/requests`` from the records it keeps in memory, with the same filter; the dashboard's
requests screen types that filter as one line (``5xx >500ms worker:w1 text``). One filter, so
each says the same about which requests match.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flockctl.state import request_log_files

#: One request log line, decoded.
Record = dict[str, Any]

_STATUS = re.compile(r"[1-5](?:xx|\d\d)")
_SLOW = re.compile(r"(?:>=?|slow:)(\d+(?:\.\d+)?)(?:ms)?")


def parse_statuses(given: Iterable[str]) -> tuple[frozenset[int], frozenset[int]]:
    """Exact statuses and status classes (``5xx`` is 5) from ``503``/``5xx`` words; a word that
    is neither raises ValueError naming it."""
    exact: set[int] = set()
    classes: set[int] = set()
    for word in given:
        text = word.strip().lower()
        if not _STATUS.fullmatch(text):
            raise ValueError(f"{word!r}: give a status such as 503, or a class such as 5xx")
        if text.endswith("xx"):
            classes.add(int(text[0]))
        else:
            exact.add(int(text))
    return frozenset(exact), frozenset(classes)


@dataclass(frozen=True)
class RequestFilter:
    """Which request log records to keep: every condition given must hold."""

    #: Exact statuses (503) and status classes (5 for 5xx); a record matches either.
    statuses: frozenset[int] = field(default_factory=frozenset)
    classes: frozenset[int] = field(default_factory=frozenset)
    #: At least this many milliseconds from arrival to the answer's end.
    slow_ms: float | None = None
    #: The worker that answered, or any worker one of its attempts went to.
    worker: str | None = None
    #: Text anywhere in the record's JSON line (case-insensitive).
    text: str = ""

    @classmethod
    def parse(cls, line: str) -> RequestFilter:
        """The dashboard's one-line filter: ``503``/``5xx`` words, ``>500ms`` (or ``slow:500``),
        ``worker:w1``, and any other words as text. ValueError names a word it cannot take."""
        words: list[str] = []
        statuses: list[str] = []
        slow: float | None = None
        worker: str | None = None
        for word in line.split():
            lower = word.lower()
            if _STATUS.fullmatch(lower) or re.fullmatch(r"\dxx", lower):
                statuses.append(word)
            elif (found := _SLOW.fullmatch(lower)) is not None:
                slow = float(found.group(1))
            elif lower.startswith("worker:"):
                worker = word.split(":", 1)[1] or None
                if worker is None:
                    raise ValueError("worker: give a worker id, such as worker:w1")
            else:
                words.append(word)
        exact, classes = parse_statuses(statuses)
        return cls(exact, classes, slow, worker, " ".join(words))

    def __bool__(self) -> bool:
        given = (self.statuses, self.classes, self.slow_ms is not None, self.worker, self.text)
        return any(given)

    def describe(self) -> str:
        """The filter as the dashboard's line takes it back (empty when it keeps everything)."""
        parts = sorted(str(s) for s in self.statuses) + [f"{c}xx" for c in sorted(self.classes)]
        if self.slow_ms is not None:
            parts.append(f">{self.slow_ms:g}ms")
        if self.worker:
            parts.append(f"worker:{self.worker}")
        if self.text:
            parts.append(self.text)
        return " ".join(parts)

    def matches(self, record: Record, line: str | None = None) -> bool:
        """Whether ``record`` passes; ``line`` is its JSON text when the caller has it (the text
        condition searches it, else the record is formatted again)."""
        if self.statuses or self.classes:
            code = record.get("status")
            if not isinstance(code, int) or not (
                code in self.statuses or code // 100 in self.classes
            ):
                return False
        if self.slow_ms is not None:
            latency = record.get("latency_ms")
            if not isinstance(latency, int | float) or latency < self.slow_ms:
                return False
        if self.worker and not (
            record.get("worker") == self.worker
            or any(a.get("worker") == self.worker for a in attempts_of(record))
        ):
            return False
        if self.text:
            haystack = line if line is not None else json.dumps(record, ensure_ascii=False)
            if self.text.casefold() not in haystack.casefold():
                return False
        return True


def attempts_of(record: Record) -> list[dict[str, Any]]:
    """A record's attempts, each a mapping (a malformed entry is left out)."""
    attempts = record.get("attempts")
    if not isinstance(attempts, list):
        return []
    return [a for a in attempts if isinstance(a, dict)]


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.0f}"


def cells(record: Record) -> list[str]:
    """A record as the cells of a table row, under ``HEADERS``: the CLI's table and the
    dashboard's requests screen show the same."""
    attempts = attempts_of(record)
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


#: The columns of ``cells``.
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


def records(lines: Iterable[bytes]) -> Iterator[Record]:
    """The records among ``lines``; a line cut by a crash, or not the log's, is skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
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
        for record in records(reversed(lines)):
            if len(found) >= tail:
                return list(found)
            if match(record):
                found.appendleft(record)
    return list(found)


def follow(path: Path, pause: float = 0.25) -> Iterator[Record]:
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
                time.sleep(pause)
                continue
            inode = os.fstat(handle.fileno()).st_ino
            if not from_start:
                handle.seek(0, os.SEEK_END)
            buffer = b""
        chunk = handle.read()
        if chunk:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            yield from records(complete)
            continue
        try:
            rotated = os.stat(path).st_ino != inode
        except FileNotFoundError:
            rotated = True
        if rotated:  # what is left in the old file was read above
            handle.close()
            handle, from_start = None, True
            continue
        time.sleep(pause)
