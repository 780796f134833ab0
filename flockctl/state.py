"""Where a deployment keeps its files, and how its daemon is recognised as alive.

Layout of one deployment's state directory (``FLOCKCTL_HOME/<name>`` if ``FLOCKCTL_HOME`` is
set, else ``$XDG_STATE_HOME/flockctl/<name>``, else the platform's state directory:
``~/.local/state/flockctl/<name>`` on Linux; see ``flockctl.paths``)::

    config.json     the resolved deployment config the daemon runs with (mode 0600)
    daemon.json     pid, process start time, endpoint, admin token, version (mode 0600)
    daemon.log      the daemon's log
    requests.jsonl  one JSON line per request the balancer served (rotated: .1, .2, .3 older)
    workers.json    live local workers, so a restarted daemon can re-adopt them
    workers/<id>.log

Nothing is ever killed by name: a pid is only trusted when its process start time matches the
one recorded, so a recycled pid is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from flockctl import paths
from flockctl.net import client_url

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def valid_name(name: str) -> bool:
    """A deployment name becomes a directory name: letters, digits, ``_ . -``, at most 63."""
    return bool(NAME_RE.match(name))


def state_root() -> Path:
    """The directory that holds one sub-directory per deployment (``flockctl.paths``)."""
    return paths.state_dir()


def state_dir(name: str) -> Path:
    """The state directory of deployment ``name`` (not created)."""
    return state_root() / name


#: The balancer's request log in a state directory; rotated copies are ``requests.jsonl.N``.
REQUEST_LOG = "requests.jsonl"
#: How many request log files are kept, the live one included.
REQUEST_LOG_FILES = 4


def request_log_files(directory: Path) -> list[Path]:
    """The request log files of a deployment that exist, oldest first (the live one last)."""
    live = directory / REQUEST_LOG
    candidates = [live.with_name(f"{REQUEST_LOG}.{n}") for n in range(REQUEST_LOG_FILES - 1, 0, -1)]
    return [p for p in [*candidates, live] if p.is_file()]


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: Start times at or above this are times of day (seconds since 1970: September 2001 on); below
#: it, seconds since boot. Records written before start times were taken since boot hold times of
#: day, and are still compared as such.
TIME_OF_DAY_FLOOR = 1e9


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, as recorded to recognise it again; None when there is no
    such live process.

    On Linux: seconds since boot, from ``/proc/<pid>/stat`` (the kernel's count, which no change
    of the clock moves). psutil's ``create_time`` adds to it the boot time that the kernel works
    out afresh from the time of day at each read, so stepping the clock (NTP, a virtual
    machine's clock catching up) moved every process's start time with it: a live worker or
    daemon then looked gone, and was left running unseen while another took its place.
    Elsewhere: psutil's ``create_time`` (a time of day the kernel stored when it started)."""
    if sys.platform.startswith("linux"):
        return _since_boot(pid)
    return _time_of_day(pid)


def _since_boot(pid: int) -> float | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # after the command, which may hold spaces
    if fields[0] == b"Z":  # a zombie: exited, not yet reaped
        return None
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks since boot


def _time_of_day(pid: int) -> float | None:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_same_process(pid: int | None, start_time: float | None) -> bool:
    """True when ``pid`` is alive and is the very process recorded with ``start_time`` (from
    :func:`process_start_time`, or a time of day in a record written before it took them
    since boot)."""
    if not pid or start_time is None:
        return False
    actual = process_start_time(pid)
    if actual is not None and actual < TIME_OF_DAY_FLOOR <= start_time:
        actual = _time_of_day(pid)
    return actual is not None and abs(actual - start_time) < 0.5


@dataclass
class DaemonRecord:
    """The contents of ``daemon.json``: how to find and talk to a running daemon."""

    pid: int
    start_time: float
    host: str
    port: int
    token: str
    version: str
    name: str

    @property
    def endpoint(self) -> str:
        return client_url(self.host, self.port)

    def alive(self) -> bool:
        return is_same_process(self.pid, self.start_time)

    def save(self, directory: Path) -> None:
        write_json_atomic(directory / "daemon.json", asdict(self))

    @classmethod
    def load(cls, directory: Path) -> DaemonRecord | None:
        data = read_json(directory / "daemon.json")
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def running_daemon(name: str) -> DaemonRecord | None:
    """The record of the live daemon of deployment ``name``, or None."""
    record = DaemonRecord.load(state_dir(name))
    if record is None or not record.alive():
        return None
    return record


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file (without newlines), reading only its end."""
    if n <= 0:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            block = 8192
            data = b""
            pos = end
            while pos > 0 and data.count(b"\n") <= n:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-n:]


@dataclass
class LogChunk:
    """Complete lines read from a log, and the byte offset to read on from."""

    lines: list[str]
    offset: int
    reset: bool = False


#: The most lines, and bytes, one read returns: a follower catching up polls again.
MAX_LOG_LINES = 5000
MAX_LOG_BYTES = 8 << 20


def read_log(path: Path, tail: int = 200, offset: int | None = None) -> LogChunk:
    """Read a log that is being appended to, for a reader that follows it by polling.

    Without ``offset``: the last ``tail`` complete lines. With it: the complete lines written
    since that byte offset (at most ``MAX_LOG_LINES``). Either way the returned offset is just
    past the last complete line, so a line still being written comes whole on the next read. A
    file now shorter than ``offset`` was truncated or rotated: it is read from its start and
    ``reset`` says so. A missing file reads as empty.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset is None:
                return _read_tail(f, size, tail)
            reset = size < offset
            start = 0 if reset else offset
            f.seek(start)
            data = f.read(MAX_LOG_BYTES)
    except FileNotFoundError:
        return LogChunk([], 0, offset is not None and offset > 0)
    cut = _nth_newline(data, MAX_LOG_LINES)
    if cut < 0 and len(data) == MAX_LOG_BYTES:
        cut = len(data) - 1  # one line longer than a whole read: hand it out in pieces
    complete = data[: cut + 1]
    return LogChunk(_split(complete), start + len(complete), reset)


def _read_tail(f: BinaryIO, size: int, tail: int) -> LogChunk:
    """The last ``tail`` complete lines, reading backwards from the end in blocks."""
    pos, data = size, b""
    while pos > 0 and data.count(b"\n") <= tail and size - pos < MAX_LOG_BYTES:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    complete = data[: data.rfind(b"\n") + 1]
    lines = _split(complete)
    if pos > 0 and lines:
        lines = lines[1:]  # the first piece may have started before what was read
    return LogChunk(lines[-tail:] if tail > 0 else [], pos + len(complete))


def _nth_newline(data: bytes, n: int) -> int:
    """The index of the ``n``-th newline in ``data``, else of its last one, else -1."""
    index = -1
    for _ in range(n):
        found = data.find(b"\n", index + 1)
        if found < 0:
            break
        index = found
    return index


def _split(complete: bytes) -> list[str]:
    return [line.decode("utf-8", errors="replace") for line in complete.split(b"\n")[:-1]]
