"""The balancer's traces: a span per relayed request, a child span per attempt on a worker.

With ``--otel-collector-endpoint`` set (``flockctl.telemetry`` sets up the exporters), the
balancer continues the client's W3C ``traceparent`` (or starts a trace) with a server span named
after the method and path (``service.name`` ``flockctl-balancer``), opens a client span for each
attempt on a worker, and sends the worker the attempt span's ``traceparent`` in place of the
client's, so an engine's job span hangs under the attempt that reached it. The request log
line carries the same trace id.

Without an endpoint nothing here is imported or called: the relay checks one attribute. With
one, an unsampled request (``OTEL_TRACES_SAMPLER``) still gets ids, so its worker can follow
the decision, but no attributes are built for it. The OpenTelemetry modules are imported only
when ``BalancerTracing`` is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flockctl import telemetry

if TYPE_CHECKING:
    from flockctl.server.request_log import Attempt, RequestRecord
    from flockctl.telemetry import PrometheusRegistry, Telemetry

SERVICE_NAME = "flockctl-balancer"


def start_tracing(
    endpoint: str | None, registry: PrometheusRegistry | None = None
) -> BalancerTracing | None:
    """Traces and metrics (``registry``'s, what ``/metrics`` shows) sent to ``endpoint``, or to
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; None, having imported nothing, when neither is set."""
    sent = telemetry.setup(SERVICE_NAME, endpoint, registry=registry)
    return None if sent is None else BalancerTracing(sent.tracer_provider, sent)


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
        #: The exporters behind the provider, when ``start_tracing`` made them.
        self.telemetry = sent

    def shutdown(self) -> None:
        """Send what is queued (bounded: a collector that never answers cannot hold it up)."""
        if self.telemetry is not None:
            self.telemetry.shutdown()

    def start(self, rec: RequestRecord, scope: dict[str, Any] | Any) -> None:
        """Open the request's span, under the client's trace when it sent a ``traceparent``."""
        parent = None
        if rec.trace_id is not None:  # the relay saw a traceparent header
            carrier = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in scope["headers"]
                if k in (b"traceparent", b"tracestate")
            }
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
        worker is sent the request span's own context, unsampled, so it leaves its spans out too
        and its logs still carry the trace id. That halves what tracing costs such a request.
        """
        if rec.span.is_recording():
            parent = self._trace.set_span_in_context(rec.span)
            span = self._tracer.start_span(
                f"attempt {len(rec.attempts)}", context=parent, kind=self._client
            )
            attempt.span = span
        else:
            span = rec.span
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
            span.set_attribute("flockctl.worker", attempt.worker)
            if attempt.status is not None:
                span.set_attribute("http.response.status_code", attempt.status)
                if attempt.status >= 500:
                    span.set_status(self._error)
            if attempt.error is not None:
                span.set_attribute("error.type", attempt.error.split(":", 1)[0])
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, attempt.error))
        span.end()

    def finish(self, rec: RequestRecord) -> None:
        """End the request's span with what the request met."""
        span = rec.span
        if span.is_recording():
            span.set_attributes(
                {
                    "http.request.method": rec.method,
                    "http.route": rec.path,
                    "http.response.status_code": rec.status,
                    "flockctl.attempts": len(rec.attempts),
                    "flockctl.queue_ms": round(rec.queue * 1000, 3),
                    "http.request.body.size": rec.bytes_in,
                    "http.response.body.size": rec.bytes_out,
                }
            )
            if rec.model is not None:
                span.set_attribute("gen_ai.request.model", rec.model)
            if rec.worker is not None:
                span.set_attribute("flockctl.worker", rec.worker)
            if rec.ttfb is not None:
                span.set_attribute("flockctl.ttfb_ms", round(rec.ttfb * 1000, 3))
            if rec.status >= 500:
                span.set_status(self._error)
        span.end()
