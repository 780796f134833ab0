"""A job: one generation request as the scheduler, the KV manager and the API see it.

Pure data with no torch in it, so the scheduler can be tested without a model.
"""

from __future__ import annotations

import enum
import math
import secrets
import string
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


#: Log-probabilities a token may come with: its own and up to this many alternatives (OpenAI's cap).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one job picks its tokens and when it ends.

    ``max_tokens`` 0 is allowed only with ``prompt_logprobs``: the job then scores its prompt
    and generates nothing (how evaluation harnesses ask for a text's log-likelihood).
    ``logprobs``: alternatives reported beside each generated token (None: no log-probabilities);
    ``prompt_logprobs`` the same for the prompt's tokens. ``logit_bias`` is a tuple of
    ``(token id, bias)`` so the params stay hashable.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            raise InvalidRequest(
                f"max_tokens must be at least 1 (0 only with echo and logprobs), got"
                f" {self.max_tokens}",
                "max_tokens",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}", name)
        if not 0 < self.repetition_penalty <= 2:
            raise InvalidRequest(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
                "repetition_penalty",
            )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                "min_tokens",
            )
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must not be negative", "stop_token_ids")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100 or math.isnan(bias):
                raise InvalidRequest(
                    f"logit_bias maps token ids to a bias in [-100, 100], got {token}: {bias}",
                    "logit_bias",
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", name)
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

    @property
    def adjusts_logits(self) -> bool:
        """Whether the model's logits change before sampling (penalties, bias, min_tokens)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1
            or self.logit_bias
            or self.min_tokens
        )

    @property
    def speculable(self) -> bool:
        """Whether a speculative step can give this job what an incremental one would.

        Penalties and ``min_tokens`` depend on the tokens before each position, which differ
        from node to node of a draft tree, and log-probabilities are reported per incremental
        step: such jobs decode incrementally (see also ``Speculator.can_speculate``).
        """
        return not (
            self.adjusts_logits or self.logprobs is not None or self.prompt_logprobs is not None
        )


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


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely alternatives at its position (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    # a greedy chain drafted ahead while the last one was verified (fused_spec), for the job
    # at ``ahead_at`` tokens: the next step's chain if the text has not moved on since
    ahead: list[int] = field(default_factory=list)
    ahead_at: int = -1

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


_ALPHABET = string.ascii_letters + string.digits
#: Characters of the instance token that begins every id this process gives out.
INSTANCE_CHARS = 6
#: Characters of an id after the instance token: 16 base-62 characters are 95 random bits.
ID_CHARS = 22


def random_chars(n: int) -> str:
    """``n`` random letters and digits from the OS's generator."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


#: This engine process's token, drawn when it starts. Every job id begins with it and the engine
#: reports it in /health and /stats, so a balancer in front of several engines can send a
#: per-job request (``GET /jobs/{id}``) to the one engine that holds that job, without a table.
INSTANCE = random_chars(INSTANCE_CHARS)


def next_job_id() -> str:
    """A job id unique across engines and restarts: the instance token and 16 random chars."""
    return INSTANCE + random_chars(ID_CHARS - INSTANCE_CHARS)


def instance_of(job_id: str) -> str:
    """The instance token of a job or response id (``cmpl-``/``chatcmpl-`` prefix allowed)."""
    return job_id.rpartition("-")[2][:INSTANCE_CHARS]


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
    user: str | None = None  # OpenAI's ``user``: who asked, as the client says, for /jobs

    # log-probabilities, when the params ask: one entry per output token, and per prompt token
    # (None for the first, which has nothing before it)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

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
    # W3C trace context of the request that made it (its span continues that trace)
    traceparent: str | None = None
    # The job's timeline, appended on the model loop (one tuple per event, nothing more):
    # (event, monotonic time, detail) with events admitted (detail: MLFQ level), scheduled,
    # preempted (kind), swapped_out, swapped_in, first_token, finished (reason).
    events: list[tuple[str, float, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last_run = self.arrival

    def record(self, event: str, now: float, detail: Any = None) -> None:
        self.events.append((event, now, detail))

    @property
    def level_at_admission(self) -> int | None:
        return next((d for e, _, d in self.events if e == "admitted"), None)

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int | None = None) -> list[int]:
        """The job's tokens (prompt, then output) at positions ``start`` to ``end`` (the last)."""
        prompt = len(self.prompt_ids)
        end = self.total_tokens if end is None else end
        if end <= prompt:
            return self.prompt_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt : end - prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt]

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
                "presence_penalty": self.params.presence_penalty,
                "frequency_penalty": self.params.frequency_penalty,
                "repetition_penalty": self.params.repetition_penalty,
                "min_tokens": self.params.min_tokens,
                "stop_token_ids": list(self.params.stop_token_ids),
                "logprobs": self.params.logprobs,
            },
            "user": self.user,
            "events": [
                {"event": e, "at": round(t - self.arrival, 6), "detail": d}
                for e, t, d in self.events
            ],
        }
