"""The balancer's traces: a span per relayed request, a child span per attempt on a worker.

With ``--otel-collector-endpoint`` set (``flockctl.telemetry`` sets up the exporters), the
balancer continues the client's W3C ``traceparent`` (or starts a trace) with a server span named
after the method and path (``service.name`` ``flockctl-balancer``), opens a client span for each
attempt on a worker, and sends the worker the attempt span's ``traceparent`` in place of the
client's, so an engine's job span hangs under the attempt that reached it. A job lookup
(``GET /jobs/{id}``, each worker asked an attempt) and the balancer's own model list are traced
the same way. The request log line carries the same trace id.

Without an endpoint nothing here is imported or called: the relay checks one attribute. With
one, the sampling decision (``OTEL_TRACES_SAMPLER``) is taken before any span exists: for the
SDK's own samplers (always on or off, trace id ratio, parent based over those) it is the
comparison the SDK makes, done here on the trace id and the client's sampled flag
(``Sampling``). A request left out gets no span at all, only ids (drawn as the SDK draws them)
and a ``traceparent`` with the sampled flag off for its worker, so the engine leaves it out too
and its logs still carry the trace id. A sampled request goes through the SDK as before, under
the trace id the decision was taken on, so the SDK, the engine and any other service using the
same ratio agree on it. Another sampler is asked through the SDK for every request.

Measured in one process on 2 shared cores (CPU of all threads, exporting to a real collector):
an unsampled request costs these hooks 1.8 us (2.6 us with the client's ``traceparent``), where
the SDK's unsampled span cost 5.8 us (11 us); a sampled one costs about 110 us, most of it the
SDK's two spans and their export, so at 10% sampling a request costs 15 us on average (20 us
before). Sampled spans also live in the export queue for seconds, which makes the garbage
collector's full passes more frequent. The OpenTelemetry modules are imported only when
``BalancerTracing`` is made.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flockctl import telemetry

if TYPE_CHECKING:
    from flockctl.server.request_log import Attempt, RequestRecord
    from flockctl.telemetry import PrometheusRegistry, Telemetry

SERVICE_NAME = "flockctl-balancer"
#: A W3C ``traceparent`` as the SDK's propagator accepts it (version, trace id, span id, flags).
_TRACEPARENT = re.compile(
    rb"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_MAX_TRACEPARENT = 512
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
#: The trace id bits a ratio sampler compares (the SDK's ``TraceIdRatioBased.TRACE_ID_LIMIT``).
_LOW_BITS = (1 << 64) - 1
_ALL = 1 << 64  # a bound no trace id reaches: always sampled
_SAMPLED = 0x01
_RANDOM_TRACE_ID = 0x02  # W3C trace context level 2: the trace id is random


def start_tracing(
    endpoint: str | None, registry: PrometheusRegistry | None = None
) -> BalancerTracing | None:
    """Traces and metrics (``registry``'s, what ``/metrics`` shows) sent to ``endpoint``, or to
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; None, having imported nothing, when neither is set."""
    sent = telemetry.setup(SERVICE_NAME, endpoint, registry=registry)
    return None if sent is None else BalancerTracing(sent.tracer_provider, sent)


@dataclass(frozen=True)
class Sampling:
    """A sampler's decision as bounds on the trace id's low 64 bits: a trace is sampled when
    they are below the bound for its case (no parent, a sampled parent, an unsampled one).
    ``TraceIdRatioBased`` compares the same bits with the same bound, always-on is a bound
    nothing reaches, always-off is 0."""

    root: int
    parent_sampled: int
    parent_unsampled: int

    @classmethod
    def of(cls, sampler: Any) -> Sampling | None:
        """The bounds of one of the SDK's samplers; None for any other sampler (or a subclass
        that decides its own way), which is then asked itself."""
        from opentelemetry.sdk.trace import sampling

        kind = type(sampler)
        if kind.should_sample is sampling.ParentBased.should_sample:
            parts = [
                _bound(getattr(sampler, name, None))
                for name in ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled")
            ]
            if None in parts:
                return None
            return cls(*parts)  # type: ignore[arg-type]
        bound = _bound(sampler)
        return None if bound is None else cls(bound, bound, bound)

    def sampled(self, trace_id: int, flags: int | None) -> bool:
        """Whether a trace is sampled; ``flags`` are the client's trace flags, None without a
        parent."""
        if flags is None:
            bound = self.root
        elif flags & _SAMPLED:
            bound = self.parent_sampled
        else:
            bound = self.parent_unsampled
        return trace_id & _LOW_BITS < bound


def _bound(sampler: Any) -> int | None:
    from opentelemetry.sdk.trace import sampling

    should_sample = getattr(type(sampler), "should_sample", None)
    if should_sample is sampling.TraceIdRatioBased.should_sample:
        return int(sampler.bound)
    if should_sample is sampling.StaticSampler.should_sample:
        decision = getattr(sampler, "_decision", None)
        if decision is sampling.Decision.RECORD_AND_SAMPLE:
            return _ALL
        if decision is sampling.Decision.DROP:
            return 0
    return None  # RECORD_ONLY, or a sampler of its own


def _parse(traceparent: bytes) -> tuple[int, int] | None:
    """The trace id and flags of a ``traceparent`` the SDK's propagator takes; None for one it
    ignores (then the request starts a trace of its own)."""
    if len(traceparent) > _MAX_TRACEPARENT:
        return None
    found = _TRACEPARENT.match(traceparent)
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or version == b"ff":
        return None
    if version == b"00" and rest:
        return None
    return int(trace_id, 16), int(flags, 16)


class _Ids:
    """Trace and span ids as the SDK's ``RandomIdGenerator`` draws them (``getrandbits`` of a
    generator seeded from ``os.urandom``), with one trace id set ahead: the one the sampling
    decision was taken on, which the SDK then gives the span it makes."""

    def __init__(self) -> None:
        self._random = random.Random(os.urandom(32))
        self.getrandbits = self._random.getrandbits
        #: The trace id the next root span gets (set just before the SDK makes it).
        self.next_trace_id = 0

    def trace_id(self) -> int:
        value = self.getrandbits(128)
        while not value:
            value = self.getrandbits(128)
        return value

    def span_id(self) -> int:
        value = self.getrandbits(64)
        while not value:
            value = self.getrandbits(64)
        return value

    # The SDK's IdGenerator interface, for the tracer's own use.
    def generate_trace_id(self) -> int:
        value, self.next_trace_id = self.next_trace_id, 0
        return value or self.trace_id()

    def generate_span_id(self) -> int:
        return self.span_id()

    def is_trace_id_random(self) -> bool:
        return True


class Unsampled:
    """What an unsampled request carries in place of a span: the header lines for its worker."""

    __slots__ = ("lines",)

    def __init__(self, lines: bytes) -> None:
        self.lines = lines

    def is_recording(self) -> bool:
        return False

    def end(self) -> None:
        pass


class BalancerTracing:
    """Starts and ends the balancer's spans; one per daemon, made from a tracer provider."""

    def __init__(self, tracer_provider: Any, sent: Telemetry | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._tracer = tracer_provider.get_tracer("flockctl.server")
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._ids = _Ids()
        #: The sampler's decision taken here, or None: the SDK is asked for every request.
        self.sampling: Sampling | None = None
        sampler = getattr(self._tracer, "sampler", None)
        if hasattr(self._tracer, "id_generator") and sampler is not None:
            self.sampling = Sampling.of(sampler)
            if self.sampling is not None:
                self._tracer.id_generator = self._ids
        #: The exporters behind the provider, when ``start_tracing`` made them.
        self.telemetry = sent

    def shutdown(self) -> None:
        """Send what is queued (bounded: a collector that never answers cannot hold it up)."""
        if self.telemetry is not None:
            self.telemetry.shutdown()

    def start(self, rec: RequestRecord, scope: dict[str, Any] | Any) -> None:
        """Decide whether the request is sampled, and open its span if it is (under the
        client's trace when it sent a ``traceparent``)."""
        traceparent = tracestate = None
        if rec.trace_id is not None:  # the relay saw a traceparent header
            for k, v in scope["headers"]:
                if k == b"traceparent":
                    traceparent = v
                elif k == b"tracestate":
                    tracestate = v if tracestate is None else tracestate + b"," + v
        sampling = self.sampling
        if sampling is None:
            self._start_span(rec, traceparent, tracestate)
            return
        parent = _parse(traceparent) if traceparent is not None else None
        if parent is None:
            trace_id, flags = self._ids.trace_id(), None
        else:
            trace_id, flags = parent
        if sampling.sampled(trace_id, flags):
            if parent is None:
                self._ids.next_trace_id = trace_id
                traceparent = tracestate = None
            self._start_span(rec, traceparent, tracestate)
            self._ids.next_trace_id = 0  # taken by the span, or by none (a disabled tracer)
            return
        # Left out: no span, only the ids its worker and the log need.
        kept = _RANDOM_TRACE_ID if flags is None else flags & _RANDOM_TRACE_ID
        lines = b"traceparent: 00-%032x-%016x-%02x\r\n" % (trace_id, self._ids.span_id(), kept)
        if tracestate is not None and parent is not None:
            lines += b"tracestate: " + tracestate + b"\r\n"
        rec.span = Unsampled(lines)
        rec.trace_id = f"{trace_id:032x}"

    def _start_span(
        self, rec: RequestRecord, traceparent: bytes | None, tracestate: bytes | None
    ) -> None:
        parent = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent.decode("latin-1")}
            if tracestate is not None:
                carrier["tracestate"] = tracestate.decode("latin-1")
            parent = self._propagator.extract(carrier)
        span = self._tracer.start_span(
            f"{rec.method} {rec.path}", context=parent, kind=self._server
        )
        rec.span = span
        context = span.get_span_context()
        rec.trace_id = f"{context.trace_id:032x}"

    def attempt(self, rec: RequestRecord, attempt: Attempt) -> bytes:
        """Open an attempt's span; returns the header lines that carry it to the worker.

        A request the sampler left out gets no attempt spans (nothing would record them): the
        worker is sent the request's own ids, unsampled, so it leaves its spans out too.
        """
        span = rec.span
        if span.__class__ is Unsampled:
            return span.lines
        if span.is_recording():
            parent = self._trace.set_span_in_context(span)
            span = self._tracer.start_span(
                f"attempt {len(rec.attempts)}", context=parent, kind=self._client
            )
            attempt.span = span
        context = span.get_span_context()
        line = b"traceparent: 00-%032x-%016x-%02x\r\n" % (
            context.trace_id,
            context.span_id,
            context.trace_flags,
        )
        state = context.trace_state
        if state:
            line += b"tracestate: " + state.to_header().encode("latin-1") + b"\r\n"
        return line

    def end_attempt(self, attempt: Attempt) -> None:
        span = attempt.span
        if span is None:
            return
        if span.is_recording():
            # one set_attributes call: the SDK takes its lock and checks each value per call
            attributes: dict[str, Any] = {"flockctl.worker": attempt.worker}
            if attempt.status is not None:
                attributes["http.response.status_code"] = attempt.status
            if attempt.error is not None:
                attributes["error.type"] = attempt.error.split(":", 1)[0]
            span.set_attributes(attributes)
            if attempt.error is not None:
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, attempt.error))
            elif attempt.status is not None and attempt.status >= 500:
                span.set_status(self._error)
        span.end()

    def finish(self, rec: RequestRecord) -> None:
        """End the request's span with what the request met."""
        span = rec.span
        if span.__class__ is Unsampled:
            return
        if span.is_recording():
            attributes: dict[str, Any] = {
                "http.request.method": rec.method,
                "http.route": rec.path,
                "http.response.status_code": rec.status,
                "flockctl.attempts": len(rec.attempts),
                "flockctl.queue_ms": round(rec.queue * 1000, 3),
                "http.request.body.size": rec.bytes_in,
                "http.response.body.size": rec.bytes_out,
            }
            if rec.model is not None:
                attributes["gen_ai.request.model"] = rec.model
            if rec.worker is not None:
                attributes["flockctl.worker"] = rec.worker
            if rec.ttfb is not None:
                attributes["flockctl.ttfb_ms"] = round(rec.ttfb * 1000, 3)
            span.set_attributes(attributes)
            if rec.status >= 500:
                span.set_status(self._error)
        span.end()
