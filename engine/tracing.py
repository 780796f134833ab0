"""A finished job as a trace span and an access-log line, made on the API side.

The model loop only appends ``(event, time, detail)`` to ``job.events`` (a list append per
admission, preemption, swap, first token and finish) and, when tracing or the access log is on,
hands the finished job to the event loop (``JobObserver.finished``; on the model loop that is one
``call_soon_threadsafe`` per job). Everything OpenTelemetry does happens there, after the job's
last token was delivered, so tracing never slows an iteration. A job the sampler leaves out
(with parent-based sampling: one the balancer left out) costs only the SDK's sampling decision:
its attributes and events are built for a span that records, never for one that does not.

The span continues the caller's W3C ``traceparent`` (the balancer sends one), read by
``TraceContextMiddleware`` into ``TRACEPARENT`` while the request's route runs, and kept on the
job by ``Engine.submit``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from flockctl.engine.job import FinishReason, Job

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from flockctl.telemetry import Telemetry

#: The ``traceparent`` header of the request being handled (None: it had none).
TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flockctl_traceparent", default=None
)
access_log = logging.getLogger("flockctl.engine.access")
SPAN_NAME = "flockctl.engine.job"


class TraceContextMiddleware:
    """Puts a request's ``traceparent`` header in ``TRACEPARENT`` for its routes (pure ASGI:
    nothing is buffered, streaming answers pass through)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for key, value in scope["headers"]:
                if key == b"traceparent":
                    token = TRACEPARENT.set(value.decode("latin-1"))
                    try:
                        await self.app(scope, receive, send)
                    finally:
                        TRACEPARENT.reset(token)
                    return
        await self.app(scope, receive, send)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), if well formed."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()


def _ms(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 3) if start is not None and end is not None else None


def access_record(job: Job) -> dict[str, Any]:
    """The access log's line for one finished job."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "job": job.id,
        "trace_id": trace_id_of(job.traceparent),
        "status": (job.finish_reason or FinishReason.ABORT).value,
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": len(job.output_ids),
        "queue_ms": _ms(job.arrival, job.first_scheduled),
        "ttft_ms": _ms(job.arrival, job.first_token),
        "e2e_ms": _ms(job.arrival, job.finished),
        "preemptions": job.preemption_count,
        "level": job.level,
    }


class JobObserver:
    """What the engine does with each finished job beyond its answer: an access-log line
    (``--access-log``) and a span (``--otel-collector-endpoint``). Runs on the event loop."""

    def __init__(self, model_name: str, telemetry: Telemetry | None, log_access: bool):
        self.model_name = model_name
        self.telemetry = telemetry
        self.log_access = log_access
        self._tracer = telemetry.tracer("flockctl.engine") if telemetry else None
        self._propagator: Any = None
        if telemetry is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()

    @property
    def active(self) -> bool:
        return self.log_access or self.telemetry is not None

    def finished(self, job: Job) -> None:
        if self.log_access:
            access_log.info(json.dumps(access_record(job), separators=(",", ":")))
        if self._tracer is not None:
            self._span(job)

    def _span(self, job: Job) -> None:
        from opentelemetry.trace import SpanKind

        # the loop's clock is monotonic; spans want wall-clock nanoseconds
        offset = time.time_ns() - time.monotonic_ns()

        def wall(t: float) -> int:
            return int(t * 1e9) + offset

        parent = None
        if job.traceparent:
            parent = self._propagator.extract({"traceparent": job.traceparent})
        end = job.finished if job.finished is not None else time.monotonic()
        span = self._tracer.start_span(  # type: ignore[union-attr]
            SPAN_NAME, context=parent, kind=SpanKind.SERVER, start_time=wall(job.arrival)
        )
        if not span.is_recording():
            return  # left out by the sampler (the balancer's decision, when parent based)
        span.set_attributes(span_attributes(job, self.model_name))
        for name, at, detail in job.events:
            attributes = _event_attributes(name, detail)
            span.add_event(name, attributes, timestamp=wall(at))
        span.end(end_time=wall(end))


def _event_attributes(name: str, detail: Any) -> dict[str, Any]:
    if detail is None:
        return {}
    key = {"admitted": "level", "preempted": "kind", "finished": "reason"}.get(name, "detail")
    return {key: detail}


def span_attributes(job: Job, model_name: str) -> dict[str, Any]:
    """The job span's attributes: tokens (GenAI's names), MLFQ levels, preemptions, timing and
    speculation (per step: mean and total accepted drafted tokens)."""
    attributes: dict[str, Any] = {
        "gen_ai.request.model": model_name,
        "gen_ai.usage.input_tokens": len(job.prompt_ids),
        "gen_ai.usage.output_tokens": len(job.output_ids),
        "flockctl.job.id": job.id,
        "flockctl.job.finish_reason": (job.finish_reason or FinishReason.ABORT).value,
        "flockctl.job.level.finish": job.level,
        "flockctl.job.preemptions": job.preemption_count,
        "flockctl.job.swaps": job.swaps,
        "flockctl.job.iterations": job.iterations,
    }
    if job.level_at_admission is not None:
        attributes["flockctl.job.level.admission"] = job.level_at_admission
    for key, start, end in (
        ("queue_ms", job.arrival, job.first_scheduled),
        ("ttft_ms", job.arrival, job.first_token),
    ):
        value = _ms(start, end)
        if value is not None:
            attributes[f"flockctl.job.{key}"] = value
    spec = job.spec
    if spec is not None and spec.steps:
        attributes["flockctl.spec.steps"] = spec.steps
        attributes["flockctl.spec.accepted_tokens"] = spec.accepted_tokens
        attributes["flockctl.spec.accepted_per_step"] = round(spec.accepted_tokens / spec.steps, 4)
    return attributes
