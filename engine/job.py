"""A job: one generation request as the scheduler, the KV manager and the API see it.

Pure data with no torch in it, so the scheduler can be tested without a model.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


class JobState(str, enum.Enum):
    WAITING = "waiting"  # accepted, never run (no KV yet)
    RUNNING = "running"  # in the batch of the current iteration
    PREEMPTED = "preempted"  # ran before, left out of the batch; KV still on the device
    SWAPPED = "swapped"  # preempted and its KV moved to host memory
    FINISHED = "finished"


class Preemption(str, enum.Enum):
    """Why an unfinished job left the batch; each kind is counted per job and in total."""

    DESCHEDULED = "descheduled"  # a higher-priority job took its place; KV stays on the device
    SWAPPED = "swapped"  # its KV was moved to host memory to make room
    RECOMPUTED = "recomputed"  # its KV was dropped; it is rebuilt from the tokens when it runs


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled (client gone, engine shutting down)


class InvalidRequest(ValueError):
    """A request the engine cannot run; the message names the problem (the API answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequest(
                f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens"
            )
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", "stop")
        if any(lone_surrogate_at(s) is not None for s in self.stop):
            # Kept on the job and shown by /jobs and /stats: it must encode, or those would fail.
            raise InvalidRequest(
                "stop strings must be Unicode text; one holds a lone UTF-16 surrogate", "stop"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def lone_surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (what JSON's ``"\\ud800"`` decodes to, and
    UTF-8 cannot encode), or None for real text. Encoding is the test: it runs at C speed."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:  # a surrogate is the one thing UTF-8 refuses
        return exc.start
    return None


@dataclass
class JobSpec:
    """Speculation counters of one job (shown in ``/jobs/{id}`` and ``/stats``)."""

    steps: int = 0  # speculative steps (one verification each)
    draft_tokens: int = 0  # tree nodes proposed
    accepted_tokens: int = 0  # drafted tokens the LLM accepted
    emitted_ewma: float | None = None  # recent tokens per step (accepted + 1)
    skipped: int = 0  # iterations in a row it decoded without speculating
    enabled: bool = True
    draft_cached: list[int] = field(default_factory=list)  # per SSM, tokens in its cache

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "steps": self.steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": (
                round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else None
            ),
            "mean_accepted_length": (
                round(1 + self.accepted_tokens / self.steps, 4) if self.steps else None
            ),
        }


_ids = itertools.count(1)


def next_job_id() -> str:
    return f"job-{next(_ids)}"


@dataclass(eq=False)
class Job:
    """Mutable scheduling state of one request. Times are ``time.monotonic()`` seconds."""

    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=next_job_id)
    arrival: float = field(default_factory=time.monotonic)
    state: JobState = JobState.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    # MLFQ
    level: int = 0
    queue_seq: int = 0  # order within a level (set when it enters the level)
    service_at_level: float = 0.0  # seconds of iterations attributed to it at its level
    last_run: float = 0.0  # arrival counts as last run (starvation clock)
    predicted_prefill: float = 0.0

    # KV: tokens whose keys/values are cached (on the device or on the host when SWAPPED)
    cached_tokens: int = 0

    # counters and timing
    preemptions: dict[Preemption, int] = field(default_factory=lambda: dict.fromkeys(Preemption, 0))
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    iterations: int = 0
    swaps: int = 0  # times its KV went to host memory
    spec: JobSpec | None = None  # speculation counters, when the engine has SSMs

    def __post_init__(self) -> None:
        self.last_run = self.arrival

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def preemption_count(self) -> int:
        return sum(self.preemptions.values())

    @property
    def needs_prefill(self) -> bool:
        """Tokens not yet in the cache beyond the one fed this step (a fresh or recomputed job)."""
        return self.cached_tokens < self.total_tokens - 1

    def summary(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "id": self.id,
            "state": self.state.value,
            "level": self.level,
            "preemptions": self.preemption_count,
            "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": len(self.output_ids),
            "age": round(now - self.arrival, 3),
            "speculation": self.spec.summary() if self.spec else None,
        }

    def detail(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        end = self.finished if self.finished is not None else now
        started = self.first_scheduled
        return {
            **self.summary(now),
            "preemptions_by_kind": {k.value: v for k, v in self.preemptions.items()},
            "finish_reason": self.finish_reason.value if self.finish_reason else None,
            "service_at_level": round(self.service_at_level, 6),
            "cached_tokens": self.cached_tokens,
            "iterations": self.iterations,
            "queue_time": round((started if started is not None else now) - self.arrival, 6),
            "time_to_first_token": (
                round(self.first_token - self.arrival, 6) if self.first_token else None
            ),
            "execution_time": round(end - started, 6) if started is not None else 0.0,
            "completion_time": round(end - self.arrival, 6) if self.finished else None,
            "params": {
                "max_tokens": self.params.max_tokens,
                "temperature": self.params.temperature,
                "top_p": self.params.top_p,
                "top_k": self.params.top_k,
                "seed": self.params.seed,
                "stop": list(self.params.stop),
            },
        }
