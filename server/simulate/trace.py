"""Request traces: what arrives when, and how many tokens it reads and writes.

A trace is a list of ``TraceRequest`` sorted by arrival time, in seconds from the trace's start.
It is read from a file (the Azure LLM inference trace's CSV, BurstGPT's CSV, flockctl's own
``requests.jsonl``, or JSON lines ``{"t", "prompt_tokens", "output_tokens"}``) or drawn from a
synthetic arrival process (``poisson:RATE:SECONDS``, ``gamma:RATE:CV:SECONDS``,
``diurnal:PEAK:TROUGH:HOURS``) with a seeded generator, so the same seed gives the same trace.

A malformed line is a ``TraceError`` naming the file, the line and the column, since a trace of
a million lines with one bad row is otherwise hopeless to fix.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


class TraceError(ValueError):
    """A trace that cannot be read; the message names where (file, line, column) and why."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    #: Arrival, in seconds from the start of the trace.
    t: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    requests: list[TraceRequest]
    #: Seconds the trace covers: its synthetic length, else its last arrival.
    duration: float
    source: str


#: Token counts drawn for synthetic traces (means of exponential distributions), when not given.
PROMPT_TOKENS = 256
OUTPUT_TOKENS = 128


def load(path: Path) -> Trace:
    """Read a trace file, telling its format from its first line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a text file ({exc.reason})") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("{"):
        requests = list(_json_lines(path, lines))
    else:
        requests = list(_csv(path, lines))
    if not requests:
        raise TraceError(f"{path}: the trace holds no requests")
    requests.sort(key=lambda r: r.t)
    start = requests[0].t
    shifted = [TraceRequest(r.t - start, r.prompt_tokens, r.output_tokens) for r in requests]
    return Trace(shifted, shifted[-1].t, str(path))


# -- CSV: Azure (TIMESTAMP,ContextTokens,GeneratedTokens) and BurstGPT ---------------------------

#: Header names of the columns read, per format: time, prompt tokens, output tokens.
_CSV_FORMATS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
}


def _csv(path: Path, lines: list[str]) -> Iterator[TraceRequest]:
    rows = csv.reader(lines)
    try:
        header = next(rows)
    except StopIteration:
        return
    names = [h.strip() for h in header]
    for cols in _CSV_FORMATS.values():
        if all(c in names for c in cols):
            index = [names.index(c) for c in cols]
            break
    else:
        known = "; ".join(",".join(cols) for cols in _CSV_FORMATS.values())
        raise TraceError(
            f"{path}:1: unknown trace header {','.join(names)!r}; a CSV trace needs the"
            f" columns {known}, or give JSON lines with t, prompt_tokens, output_tokens"
        )
    for row in rows:
        line = rows.line_num
        if not row or all(not c.strip() for c in row):
            continue
        values = []
        for where, name in zip(index, (names[i] for i in index), strict=True):
            if where >= len(row):
                raise TraceError(
                    f"{path}:{line}:{where + 1}: column {name} is missing (the row has"
                    f" {len(row)} columns)"
                )
            values.append(row[where].strip())
        stamp, prompt, output = values
        t = _time(stamp, path, line, index[0], names[index[0]])
        yield TraceRequest(
            t,
            _count(prompt, path, line, index[1], names[index[1]]),
            _count(output, path, line, index[2], names[index[2]]),
        )


def _time(value: str, path: Path, line: int, col: int, name: str) -> float:
    """Seconds from a number or a date-time (Azure's ``2023-11-16 18:15:46.6805900``)."""
    try:
        return float(value)
    except ValueError:
        pass
    text = value.rstrip("Z")
    if "." in text:
        whole, frac = text.split(".", 1)
        text = f"{whole}.{frac[:6]}"
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise TraceError(
            f"{path}:{line}:{col + 1}: {name} {value!r} is neither seconds nor a date-time"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def _count(value: str, path: Path, line: int, col: int, name: str) -> int:
    try:
        n = int(float(value))
    except ValueError:
        raise TraceError(f"{path}:{line}:{col + 1}: {name} {value!r} is not a number") from None
    if n < 0:
        raise TraceError(f"{path}:{line}:{col + 1}: {name} {value!r} is negative")
    return n


# -- JSON lines: flockctl's requests.jsonl, or {"t", "prompt_tokens", "output_tokens"} ----------


def _json_lines(path: Path, lines: list[str]) -> Iterator[TraceRequest]:
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{line}:{exc.colno}: not JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise TraceError(f"{path}:{line}:1: a trace line must be a JSON object")
        request = _record(record, path, line, text)
        if request is not None:
            yield request


def _record(record: dict, path: Path, line: int, text: str) -> TraceRequest | None:
    def where(key: str) -> str:
        col = text.find(f'"{key}"')
        return f"{path}:{line}:{col + 1 if col >= 0 else 1}"

    if "t" in record:
        t = record["t"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise TraceError(f"{where('t')}: t must be seconds (a number), got {t!r}")
        output_key = "output_tokens"
    elif "time" in record:
        # flockctl's request log: an ISO time, and the tokens the worker's usage reported.
        try:
            t = _time(str(record["time"]), path, line, 0, "time")
        except TraceError:
            raise TraceError(
                f"{where('time')}: time {record['time']!r} is not a date-time"
            ) from None
        output_key = "completion_tokens"
        if record.get("prompt_tokens") is None or record.get(output_key) is None:
            return None  # not a generation, or a worker that reported no usage
    else:
        raise TraceError(
            f"{path}:{line}:1: a trace line needs t (seconds), prompt_tokens and output_tokens"
        )
    counts = []
    for key in ("prompt_tokens", output_key):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TraceError(f"{where(key)}: {key} must be a whole number >= 0, got {value!r}")
        counts.append(value)
    return TraceRequest(float(t), counts[0], counts[1])


# -- synthetic -----------------------------------------------------------------------------------


def synthetic(
    spec: str,
    seed: int = 0,
    prompt_tokens: int = PROMPT_TOKENS,
    output_tokens: int = OUTPUT_TOKENS,
) -> Trace:
    """A trace from ``poisson:RATE:SECONDS``, ``gamma:RATE:CV:SECONDS`` (bursty arrivals: the
    gaps' coefficient of variation is CV) or ``diurnal:PEAK:TROUGH:HOURS`` (a Poisson process
    whose rate follows a day, trough at midnight and peak at noon). Token counts are drawn from
    exponential distributions with the given means (at least one token each)."""
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []
    shapes = {"poisson": "RATE:SECONDS", "gamma": "RATE:CV:SECONDS", "diurnal": "PEAK:TROUGH:HOURS"}
    if kind not in shapes:
        raise TraceError(
            f"--synthetic {spec!r}: unknown process {kind!r}; use poisson:RATE:SECONDS,"
            " gamma:RATE:CV:SECONDS or diurnal:PEAK:TROUGH:HOURS"
        )
    if len(args) != shapes[kind].count(":") + 1:
        raise TraceError(f"--synthetic {spec!r}: {kind} takes {kind}:{shapes[kind]}")
    try:
        numbers = [float(a) for a in args]
    except ValueError:
        raise TraceError(f"--synthetic {spec!r}: {shapes[kind]} must be numbers") from None
    if any(n <= 0 or not math.isfinite(n) for n in numbers) and kind != "diurnal":
        raise TraceError(f"--synthetic {spec!r}: {shapes[kind]} must be above 0")
    rng = random.Random(seed)
    if kind == "poisson":
        rate, seconds = numbers
        times = _renewal(rng, rate, 1.0, seconds)
    elif kind == "gamma":
        rate, cv, seconds = numbers
        times = _renewal(rng, rate, cv, seconds)
    else:
        peak, trough, hours = numbers
        if not (0 <= trough <= peak and peak > 0 and hours > 0):
            raise TraceError(
                f"--synthetic {spec!r}: needs 0 <= TROUGH <= PEAK, PEAK > 0, HOURS > 0"
            )
        seconds = hours * 3600
        times = _diurnal(rng, peak, trough, seconds)
    requests = [
        TraceRequest(t, _tokens(rng, prompt_tokens), _tokens(rng, output_tokens)) for t in times
    ]
    return Trace(requests, seconds, f"synthetic {spec}")


def _tokens(rng: random.Random, mean: int) -> int:
    return max(1, round(rng.expovariate(1.0 / mean))) if mean > 0 else 0


def _renewal(rng: random.Random, rate: float, cv: float, seconds: float) -> list[float]:
    """Arrivals with gamma-distributed gaps of mean 1/rate and coefficient of variation cv
    (cv 1 is Poisson)."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    times = []
    t = rng.gammavariate(shape, scale)
    while t < seconds:
        times.append(t)
        t += rng.gammavariate(shape, scale)
    return times


def _diurnal(rng: random.Random, peak: float, trough: float, seconds: float) -> list[float]:
    """A Poisson process with rate ``trough + (peak - trough) * (1 - cos(2 pi t / day)) / 2``,
    drawn by thinning a process at the peak rate."""
    day = 86400.0
    times = []
    t = rng.expovariate(peak)
    while t < seconds:
        rate = trough + (peak - trough) * (1 - math.cos(2 * math.pi * t / day)) / 2
        if rng.random() * peak < rate:
            times.append(t)
        t += rng.expovariate(peak)
    return times


def describe(trace: Trace) -> str:
    n = len(trace.requests)
    rate = n / trace.duration if trace.duration > 0 else float("nan")
    return f"{trace.source}: {n} requests over {trace.duration:.0f}s ({rate:.2f} req/s)"


def write_jsonl(requests: Iterable[TraceRequest]) -> str:
    """The JSON-lines form of a trace (``{"t", "prompt_tokens", "output_tokens"}`` per line)."""
    return "".join(
        json.dumps({"t": r.t, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens})
        + "\n"
        for r in requests
    )
