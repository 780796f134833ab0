"""The daemon's request log: one JSON line per request in ``requests.jsonl`` (state directory).

It answers "why was this request slow": which workers it went to, what each attempt got, how
long it waited for a worker, its time to first byte and its tokens. Writing it must never slow a
request, so the request path only appends a ``RequestRecord`` (a slotted object, no formatting)
to a bounded in-memory queue; a writer thread turns records into JSON and writes them a few
times a second. When the queue is full (the disk stalls, the writer is stuck) records are
dropped and counted (``dropped``, and ``flockctl_request_log_dropped`` in ``/metrics``): a
request never waits for the log.

The file is rotated like the standard library's ``RotatingFileHandler``: past ``max_bytes`` it
becomes ``requests.jsonl.1`` (``.1`` becomes ``.2``, and so on), and ``keep`` files are kept in
all, the live one included.

Tokens come from the worker's answer, read only from its last bytes (``TAIL_BYTES``), which the
relay already holds: OpenAI's ``usage`` object ends a non-streamed answer and, with
``stream_options.include_usage``, is the last event of a stream. The writer thread, not the
request, searches those bytes; the request path only keeps a slice of them. Measured on this
2-core machine: keeping the last 2 KiB took 0.2 us, finding the usage in them 3-4 us whatever the
body's size, where ``json.loads`` took 9 us for a 3.6 KB completion and 29 us for a 25 KB one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

from flockctl.request_log_reader import Record, RequestFilter
from flockctl.state import REQUEST_LOG_FILES

log = logging.getLogger("flockctl.request_log")

#: Size at which the live file is rotated, and how many files are kept in all.
MAX_BYTES = 64 << 20
KEEP_FILES = REQUEST_LOG_FILES
#: Records waiting for the writer; more are dropped (and counted), never waited for.
MAX_PENDING = 10_000
#: How often the writer thread wakes to write what waits.
FLUSH_SECONDS = 0.2
#: The last bytes of an answer kept to find its token usage in.
TAIL_BYTES = 2048

_USAGE = re.compile(rb'"usage"\s*:\s*\{([^{}]*)\}')
_TOKENS = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
#: An OpenAI response id (``cmpl-...``, ``chatcmpl-...``): with flockctl's engine it names the
#: job, so ``GET /jobs/{id}`` through the balancer shows its timeline.
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"((?:chat)?cmpl-[A-Za-z0-9_.:-]{1,120})"')
_USER_VALUE = re.compile(rb'"user"\s*:\s*("(?:[^"\\]|\\.){0,256}")')
#: Bytes of a request body kept from its ``"user"`` key on, for the writer to read the value in.
USER_BYTES = 600
#: Records the daemon keeps in memory for ``GET /-/requests`` (the dashboard reads them there).
RECENT = 2000


def user_bytes(body: bytes) -> bytes | None:
    """Where a JSON body has a ``"user"`` key, the bytes from it on (a few hundred); None where it
    has none. On the request path when the body was not parsed: a byte search, no JSON."""
    at = body.find(b'"user"')
    for _ in range(64):  # a chat body says "user" as a role many times before the key, if any
        if at < 0:
            return None
        rest = body[at + 6 : at + 38].lstrip()
        if rest[:1] == b":" and (at == 0 or body[at - 1] != 0x5C):  # a key, not in a string
            return body[at : at + USER_BYTES]
        at = body.find(b'"user"', at + 6)
    return None


def user_of(head: bytes) -> str | None:
    """The string value of the ``"user"`` key at the start of ``head`` (see ``user_bytes``)."""
    found = _USER_VALUE.match(head)
    if found is None:
        return None
    try:
        value = json.loads(found.group(1))
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def usage_of(tail: bytes) -> tuple[int | None, int | None]:
    """Prompt and completion tokens from the last ``usage`` object in an answer's last bytes."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        found = _USAGE.match(tail, at)
        if found is not None:
            counts = {name: int(value) for name, value in _TOKENS.findall(found.group(1))}
            return counts.get(b"prompt_tokens"), counts.get(b"completion_tokens")
        at = tail.rfind(b'"usage"', 0, at)  # a "usage": null before the last event
    return None, None


def response_id_of(tail: bytes) -> str | None:
    """The last OpenAI response id in an answer's last bytes (every event of a stream carries it;
    a whole answer, when it is short enough to fit in them)."""
    at = tail.rfind(b'"id"')
    while at >= 0:
        found = _RESPONSE_ID.match(tail, at)
        if found is not None:
            return found.group(1).decode()
        at = tail.rfind(b'"id"', 0, at)
    return None


class Attempt:
    """One try of a request on one worker: the status it answered, or the error it met."""

    __slots__ = ("error", "ms", "span", "status", "worker")

    def __init__(self, worker: str) -> None:
        self.worker = worker
        #: The attempt's trace span, when tracing is on.
        self.span: Any = None
        self.status: int | None = None
        self.error: str | None = None
        self.ms = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker, "ms": round(self.ms, 3)}
        if self.status is not None:
            out["status"] = self.status
        if self.error is not None:
            out["error"] = self.error
        return out


class RequestRecord:
    """What the balancer learned about one request, filled in as it goes; formatted later."""

    __slots__ = (
        "attempts",
        "begun",
        "bytes_in",
        "bytes_out",
        "client",
        "latency",
        "method",
        "model",
        "path",
        "queue",
        "request_id",
        "span",
        "started",
        "status",
        "tail",
        "trace_id",
        "ttfb",
        "user",
        "user_head",
        "worker",
    )

    def __init__(self, method: str, path: str, client: str | None, begun: float) -> None:
        self.started = time.time()
        #: ``time.perf_counter()`` when the request arrived: durations count from it.
        self.begun = begun
        self.method = method
        self.path = path
        self.client = client
        self.bytes_in = 0
        self.request_id: str | None = None
        self.trace_id: str | None = None
        self.model: str | None = None
        self.user: str | None = None
        #: The body's bytes from its ``"user"`` key on, when the body was not parsed.
        self.user_head: bytes | None = None
        self.worker: str | None = None
        self.status = 0
        self.attempts: list[Attempt] = []
        #: Seconds waiting for a worker (all attempts), to the first byte sent, in all.
        self.queue = 0.0
        self.ttfb: float | None = None
        self.latency = 0.0
        self.bytes_out = 0
        #: The answer's last bytes (up to ``TAIL_BYTES``), where its token usage is.
        self.tail = b""
        #: The request's trace span, when tracing is on (``flockctl.server.tracing``).
        self.span: Any = None

    def answered(self, body: bytes, size: int) -> None:
        """The answer's head (and, for a small answer, its whole body) went to the client."""
        self.ttfb = time.perf_counter() - self.begun
        self.bytes_out = size
        self.tail = body[-TAIL_BYTES:]

    def ended(self, before_last: bytes, last: bytes, size: int) -> None:
        """A streamed answer ended with ``last`` (``before_last`` the chunk before it)."""
        self.bytes_out = size
        tail = last[-TAIL_BYTES:]
        if len(tail) < TAIL_BYTES and before_last:
            tail = before_last[len(tail) - TAIL_BYTES :] + tail
        self.tail = tail

    def to_dict(self) -> dict[str, Any]:
        prompt, completion = usage_of(self.tail) if self.tail else (None, None)
        return {
            "time": _iso(self.started),
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "client": self.client,
            "user": self.user if self.user_head is None else user_of(self.user_head),
            "worker": self.worker,
            "status": self.status,
            "attempts": [a.to_dict() for a in self.attempts],
            "queue_ms": round(self.queue * 1000, 3),
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 3),
            "latency_ms": round(self.latency * 1000, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "response_id": response_id_of(self.tail) if self.tail else None,
        }


def _iso(timestamp: float) -> str:
    """UTC, ISO 8601 with milliseconds: sorts as text and parses anywhere."""
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class RequestLog:
    """The bounded queue of records and the thread that writes them to ``path``."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = MAX_BYTES,
        keep: int = KEEP_FILES,
        max_pending: int = MAX_PENDING,
        flush_seconds: float = FLUSH_SECONDS,
        recent: int = RECENT,
    ) -> None:
        if keep < 1:
            raise ValueError("keep: at least the live file is kept")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.max_pending = max_pending
        self.flush_seconds = flush_seconds
        #: Records dropped because the queue was full (counted on the request path).
        self.overflowed = 0
        #: Records lost to a write error (counted by the writer thread).
        self.failed = 0
        self.written = 0
        self._pending: deque[RequestRecord] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: BinaryIO | None = None
        self._size = 0
        #: The last ``recent`` records as written, numbered from 1 in order (``GET /-/requests``).
        #: The writer thread appends, the event loop reads: each under ``_recent_lock``.
        self._recent: deque[tuple[int, Record, str]] = deque(maxlen=recent)
        self._recent_lock = threading.Lock()
        self._seq = 0
        #: Generated request ids: a random prefix per daemon run and a counter.
        self._prefix = secrets.token_hex(4)
        self._count = 0

    def add(self, record: RequestRecord) -> None:
        """Queue ``record`` for writing; dropped and counted when the queue is full."""
        if len(self._pending) >= self.max_pending:
            self.overflowed += 1
            return
        if record.request_id is None:
            self._count += 1
            record.request_id = f"{self._prefix}-{self._count}"
        self._pending.append(record)

    @property
    def dropped(self) -> int:
        """Records never written: the queue was full, or the file could not be written."""
        return self.overflowed + self.failed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def recent(
        self, keep: RequestFilter, *, after: int | None = None, limit: int = 100
    ) -> tuple[list[Record], int, bool]:
        """The last ``limit`` records ``keep`` matches, numbered after ``after``, oldest first
        (each with its number as ``seq``); the newest number; and whether ``after`` is from
        another daemon run (beyond the newest number), so the caller starts again."""
        with self._recent_lock:
            kept = list(self._recent)
            last = self._seq
        reset = after is not None and after > last
        if reset:
            after = None
        found: list[Record] = []
        for seq, fields, text in reversed(kept):
            if len(found) >= limit or (after is not None and seq <= after):
                break
            if keep.matches(fields, text):
                found.append({**fields, "seq": seq})
        found.reverse()
        return found, last, reset

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what waits and stop the writer (waiting at most ``timeout`` for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._lock.acquire(timeout=timeout):
            try:
                if self._file is not None:
                    self._file.close()
                    self._file = None
            finally:
                self._lock.release()

    def flush(self) -> None:
        """Write every queued record now (the writer thread does this on its own)."""
        with self._lock:
            self._drain()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()
        self.flush()

    def _drain(self) -> None:
        pending = self._pending
        if not pending:
            return
        lines: list[bytes] = []
        formatted: list[tuple[Record, str]] = []
        while pending:
            record = pending.popleft()
            try:
                fields = record.to_dict()
                text = json.dumps(fields, ensure_ascii=False)
            except (TypeError, ValueError) as exc:  # never expected: log it, keep the rest
                log.warning("request log: cannot format a record: %s", exc)
                continue
            lines.append(text.encode() + b"\n")
            formatted.append((fields, text))
        with self._recent_lock:
            for fields, text in formatted:
                self._seq += 1
                self._recent.append((self._seq, fields, text))
        try:
            for line in lines:
                self._write(line)
            if self._file is not None:
                self._file.flush()
        except OSError as exc:
            self.failed += len(lines)
            log.warning("request log %s: cannot write: %s", self.path, exc)
            if self._file is not None:
                # closing flushes what the failed write left buffered, and fails the same way
                # (the descriptor is closed all the same): the writer must outlive it
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    def _write(self, line: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open between writes
            self._size = os.fstat(self._file.fileno()).st_size
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(line)
        self._size += len(line)
        self.written += 1

    def _rotate(self) -> None:
        """``requests.jsonl`` -> ``.1`` -> ``.2`` ...; the oldest beyond ``keep`` is removed."""
        assert self._file is not None
        self._file.close()
        for n in range(self.keep - 1, 0, -1):
            source = rotated(self.path, n - 1)
            if source.exists():
                os.replace(source, rotated(self.path, n))
        if self.keep == 1:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0


def rotated(path: Path, n: int) -> Path:
    """The ``n``-th rotated file of ``path`` (0 is the live file itself)."""
    return path if n == 0 else path.with_name(f"{path.name}.{n}")
