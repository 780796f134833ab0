"""The job profiler: what an iteration costs on this model and device, measured at start-up.

MLFQ needs two numbers before any job has run: the cost of one decode iteration (the base
quantum) and a prediction of a prompt's prefill time (for skip-join). Both come from timing real
forwards through the runner on dummy tokens; prefill time is fitted as ``a + b * tokens``.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.runner import Feed, Runner


@dataclass
class Profile:
    decode_seconds: float  # one decode iteration at the batch size measured
    decode_batch: int
    prefill_fixed: float  # a in a + b * tokens
    prefill_per_token: float  # b
    samples: list[tuple[int, float]] = field(default_factory=list)

    def predict_prefill(self, tokens: int) -> float:
        return self.prefill_fixed + self.prefill_per_token * tokens

    def to_dict(self) -> dict[str, object]:
        return {
            "decode_ms": round(self.decode_seconds * 1000, 3),
            "decode_batch": self.decode_batch,
            "prefill_ms_fixed": round(self.prefill_fixed * 1000, 3),
            "prefill_ms_per_token": round(self.prefill_per_token * 1000, 5),
            "prefill_samples_ms": [(n, round(t * 1000, 3)) for n, t in self.samples],
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def calibrate(runner: Runner, max_tokens: int, batch: int, token_id: int = 0) -> Profile:
    """Time prefills at a few lengths and decode iterations at ``batch`` jobs.

    Uses at most ``max_tokens`` KV positions in total, so it fits any budget it is given.
    """
    pool = runner.pool
    device = runner.device
    params = SamplingParams(max_tokens=1, temperature=0)

    def timed(jobs: list[Job], cached: int = 0) -> float:
        """One forward feeding every job its tokens past the first ``cached``."""
        for job in jobs:
            pool.reserve(job.id, job.total_tokens)
        _sync(device)
        start = time.perf_counter()
        feeds = [Feed.linear(job.tokens(cached), cached) for job in jobs]
        runner.run([job.id for job in jobs], feeds)
        _sync(device)
        return time.perf_counter() - start

    lengths = [n for n in (8, 32, 128, 512) if n * 2 <= max_tokens] or [max(1, max_tokens // 2)]
    samples: list[tuple[int, float]] = []
    for n in [lengths[0], *lengths]:  # the first is a warm-up
        best = float("inf")
        for _ in range(2):
            job = Job([token_id] * n, params)
            best = min(best, timed([job]))
            pool.release(job.id)
        samples.append((n, best))
    samples = samples[1:]

    batch = max(1, min(batch, max_tokens // 24))
    jobs = [Job([token_id] * 8, params) for _ in range(batch)]
    timed(jobs)
    steps = []
    for _ in range(6):
        for job in jobs:
            job.output_ids.append(token_id)
        steps.append(timed(jobs, cached=jobs[0].total_tokens - 1))
    for job in jobs:
        pool.release(job.id)
    decode = statistics.median(steps[1:])

    a, b = fit_line(samples)
    return Profile(decode, batch, a, b, samples)


def fit_line(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``seconds = a + b * tokens`` over ``(tokens, seconds)`` samples, neither
    negative; one sample (or one length only) gives its mean time and no slope."""
    xs = [n for n, _ in samples]
    ys = [t for _, t in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if not var:
        return my, 0.0
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var)
    return max(0.0, my - b * mx), b


class DecodePace:
    """What a decode iteration and a prefill cost as the engine runs now, beside the start-up
    profile.

    The start-up profile is one short measurement, and a busy host can make it wrong by an order
    of magnitude (a decode step timed at 324 ms at start-up ran at 54 ms under load). A moving
    average of real decode iterations gives the MLFQ's base quantum; the prefill forwards the
    engine runs are fitted as ``a + b * tokens`` over the last ``window`` of them, so skip-join
    compares a prompt's real prefill cost with the quanta, both measured in the same conditions.
    Until enough prefills of different lengths were seen, the start-up prefill model stands in,
    rescaled by how decode runs now compared with start-up.
    """

    def __init__(self, profile: Profile, window: int = 64, min_prefills: int = 8):
        self.profile = profile
        self.ewma: float | None = None  # seconds of a plain decode iteration, recently
        self.prefills: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.min_prefills = min_prefills
        self._fit: tuple[float, float] | None = None  # (a, b) over self.prefills

    def observe(self, seconds: float) -> float:
        """A plain decode iteration took ``seconds``; returns the moving average."""
        self.ewma = seconds if self.ewma is None else (0.9 * self.ewma + 0.1 * seconds)
        return self.ewma

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill forward fed ``tokens`` prompt tokens (all its jobs together) in
        ``seconds``."""
        if tokens < 1 or seconds <= 0:
            return
        self.prefills.append((tokens, seconds))
        lengths = {n for n, _ in self.prefills}
        if len(self.prefills) >= self.min_prefills and len(lengths) >= 2:
            self._fit = fit_line(self.prefills)

    @property
    def decode_seconds(self) -> float:
        """One decode iteration: as measured lately, else as profiled at start-up."""
        return self.ewma or self.profile.decode_seconds

    def predict_prefill(self, tokens: int) -> float:
        """Seconds of a prefill of ``tokens``: from the recent prefills once there are enough,
        else the start-up model rescaled by how decode iterations run now."""
        if self._fit is not None:
            a, b = self._fit
            return a + b * tokens
        predicted = self.profile.predict_prefill(tokens)
        if self.ewma is None or self.profile.decode_seconds <= 0:
            return predicted
        return predicted * self.ewma / self.profile.decode_seconds
