"""The service model of a worker: how fast it prefills and decodes, how it batches, what it costs.

``EngineModel`` turns a ``ServiceModel`` into time on an asyncio loop: the simulator runs it on a
loop in simulated time, and the test suite's fake OpenAI worker runs the very same class on a
real loop, so a real deployment and the simulator serve requests by one model.

The engine is modelled as continuous batching with up to ``max_batch_size`` jobs in the batch and
the rest waiting in order. A job joining the batch is prefilled first (``prompt_tokens /
prefill_tokens_per_s`` seconds, one job at a time, and decoding pauses meanwhile, as in an engine
that runs a prefill iteration between decode iterations); its first token comes out when its
prefill ends. Then every job in the batch decodes at ``decode_tokens_per_s * batching(b)`` tokens
per second, ``b`` the number of jobs decoding: the batching curve is the per-job speed as the
batch grows (1 at batch 1). Between two changes of the batch every job advances at the same rate,
so the model needs one timer per worker, not one per token.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Per-job decode speed against batch size, relative to batch 1: flockctl's engine measured about
#: 250 tokens/s at batch 1 and about 950 tokens/s in all at batch 8 on a 2-core CPU (a factor of
#: 0.475 per job); 2 and 4 are interpolated on total throughput (450 and 700 tokens/s).
DEFAULT_BATCHING: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 0.9), (4, 0.7), (8, 0.475))


class ServiceModelError(ValueError):
    """A service model that cannot be used; the message names the field (and the file)."""


@dataclass(frozen=True)
class ServiceModel:
    prefill_tokens_per_s: float = 2000.0
    #: Tokens per second one job decodes at batch 1.
    decode_tokens_per_s: float = 50.0
    max_batch_size: int = 8
    #: (batch size, per-job decode speed relative to batch 1), by batch size; past the last
    #: point the batch's total throughput stays flat.
    batching: tuple[tuple[int, float], ...] = DEFAULT_BATCHING
    #: Requests a worker takes at once (what flockctl's engine reports: batch plus waiting
    #: room); None: twice the batch.
    capacity: int | None = None
    #: Seconds from launch to READY, of which ``provision_s`` (None: half) is PROVISIONING (the
    #: machine) and the rest STARTING (loading the model).
    cold_start_s: float = 60.0
    provision_s: float | None = None
    cost_per_hour: float = 1.0
    #: Workers run on spot machines at this price per hour when set, and are preempted at
    #: ``preemptions_per_hour`` (a Poisson process per worker).
    spot_price_per_hour: float | None = None
    preemptions_per_hour: float = 0.0
    #: Where the figures came from (``flockctl engine profile`` writes the machine and model).
    measured: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ServiceModelError(f"{name} must be above 0, got {getattr(self, name)!r}")
        if self.max_batch_size < 1:
            raise ServiceModelError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.capacity is not None and self.capacity < 1:
            raise ServiceModelError(f"capacity must be at least 1, got {self.capacity}")
        for name in ("cold_start_s", "cost_per_hour", "preemptions_per_hour"):
            if getattr(self, name) < 0:
                raise ServiceModelError(f"{name} must be 0 or more, got {getattr(self, name)!r}")
        if self.provision_s is not None and not 0 <= self.provision_s <= self.cold_start_s:
            raise ServiceModelError(
                f"provision_s must be within [0, cold_start_s {self.cold_start_s:g}],"
                f" got {self.provision_s!r}"
            )
        points = self.batching
        if (
            not points
            or points[0][0] != 1
            or any(b2 <= b1 for (b1, _), (b2, _) in itertools.pairwise(points))
        ):
            raise ServiceModelError(
                "batching must start at batch 1 and list batch sizes in increasing order"
            )
        if any(not 0 < f <= 1.5 for _, f in points):
            raise ServiceModelError("batching factors must be above 0 (1 at batch 1)")

    @property
    def worker_capacity(self) -> int:
        return self.capacity if self.capacity is not None else 2 * self.max_batch_size

    @property
    def provisioning_s(self) -> float:
        return self.cold_start_s / 2 if self.provision_s is None else self.provision_s

    @property
    def price_per_hour(self) -> float:
        return self.cost_per_hour if self.spot_price_per_hour is None else self.spot_price_per_hour

    def factor(self, batch: int) -> float:
        """Per-job decode speed at ``batch`` jobs, relative to batch 1."""
        points = self.batching
        if batch <= 1:
            return points[0][1]
        for (b0, f0), (b1, f1) in itertools.pairwise(points):
            if batch <= b1:
                return f0 + (f1 - f0) * (batch - b0) / (b1 - b0)
        last_b, last_f = points[-1]
        return last_f * last_b / batch

    def decode_rate(self, batch: int) -> float:
        """Tokens per second each of ``batch`` decoding jobs advances at."""
        return self.decode_tokens_per_s * self.factor(batch)

    def alone(self, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        """(time to first token, end-to-end time) of one job on an idle worker."""
        ttft = prompt_tokens / self.prefill_tokens_per_s
        return ttft, ttft + max(output_tokens - 1, 0) / self.decode_rate(1)

    def replace(self, **changes: Any) -> ServiceModel:
        values = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        values["batching"] = tuple(tuple(p) for p in values["batching"])
        return ServiceModel(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batching"] = [list(p) for p in self.batching]
        return out


def load_service_model(path: Path) -> ServiceModel:
    """Read a service model file (JSON, as ``flockctl engine profile`` writes it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServiceModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ServiceModelError(f"{path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ServiceModelError(f"{path}: a service model is a JSON object")
    known = set(ServiceModel.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ServiceModelError(
            f"{path}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    if "batching" in data:
        try:
            data["batching"] = tuple((int(b), float(f)) for b, f in data["batching"])
        except (TypeError, ValueError):
            raise ServiceModelError(
                f"{path}: batching must be a list of [batch size, factor] pairs"
            ) from None
    try:
        return ServiceModel(**data)
    except ServiceModelError as exc:
        raise ServiceModelError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise ServiceModelError(f"{path}: {exc}") from None


class WorkerLost(Exception):
    """The worker went away (its spot machine was preempted) with the job on it."""


class Job:
    __slots__ = ("done", "finish", "first", "output_tokens", "prompt_tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_tokens: int, output_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.first: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.finish = 0.0


class EngineModel:
    """One worker's engine under a ``ServiceModel``, on the loop it was made on."""

    def __init__(self, model: ServiceModel, loop: asyncio.AbstractEventLoop) -> None:
        self.model = model
        self.loop = loop
        self._waiting: deque[Job] = deque()
        self._prefill: deque[Job] = deque()
        #: Jobs decoding, by the progress at which they finish.
        self._decoding: list[tuple[float, int, Job]] = []
        self._seq = 0
        #: Tokens each decoding job has advanced since the worker started (all advance alike).
        self._progress = 0.0
        self._stamp = loop.time()
        self._prefill_end: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Decode rate per job by batch size, as computed (the curve is read on every change).
        self._rates: dict[int, float] = {}

    def _rate(self, batch: int) -> float:
        rate = self._rates.get(batch)
        if rate is None:
            rate = self._rates[batch] = self.model.decode_rate(batch)
        return rate

    @property
    def jobs(self) -> int:
        return len(self._waiting) + len(self._prefill) + len(self._decoding)

    def submit(self, prompt_tokens: int, output_tokens: int) -> Job:
        job = Job(self.loop, prompt_tokens, output_tokens)
        self._advance(self.loop.time())
        self._waiting.append(job)
        self._step()
        return job

    def lose(self) -> None:
        """The worker is gone: every job on it fails."""
        if self._timer is not None:
            self._timer.cancel()
        jobs = [*self._waiting, *self._prefill, *(j for _, _, j in self._decoding)]
        self._waiting.clear()
        self._prefill.clear()
        self._decoding.clear()
        for job in jobs:
            for fut in (job.first, job.done):
                if not fut.done():
                    fut.set_exception(WorkerLost())
                    fut.exception()  # a job whose request stopped waiting is not an error

    def _advance(self, now: float) -> None:
        if self._prefill_end is None and self._decoding:
            self._progress += self._rate(len(self._decoding)) * (now - self._stamp)
        self._stamp = now

    def _on_timer(self) -> None:
        self._timer = None
        self._advance(self.loop.time())
        self._step()

    def _step(self) -> None:
        now = self.loop.time()
        if self._prefill_end is not None and now >= self._prefill_end:
            job = self._prefill.popleft()
            self._prefill_end = None
            job.first.set_result(None)
            decode = job.output_tokens - 1
            if decode <= 0:
                job.done.set_result(None)
            else:
                self._seq += 1
                heapq.heappush(self._decoding, (self._progress + decode, self._seq, job))
        slack = 1e-9 * max(1.0, self._progress)
        while self._decoding and self._decoding[0][0] <= self._progress + slack:
            heapq.heappop(self._decoding)[2].done.set_result(None)
        batch = len(self._prefill) + len(self._decoding)
        while self._waiting and batch < self.model.max_batch_size:
            self._prefill.append(self._waiting.popleft())
            batch += 1
        if self._prefill_end is None and self._prefill:
            self._prefill_end = (
                now + self._prefill[0].prompt_tokens / self.model.prefill_tokens_per_s
            )
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._prefill_end is not None:
            when = self._prefill_end
        elif self._decoding:
            left = self._decoding[0][0] - self._progress
            when = now + max(left, 0.0) / self._rate(len(self._decoding))
        else:
            return
        if math.isfinite(when):
            self._timer = self.loop.call_at(when, self._on_timer)
