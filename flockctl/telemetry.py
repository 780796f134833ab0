"""OpenTelemetry for the daemon and the engine: traces and metrics sent to a collector over OTLP.

Optional twice over. The libraries come with the ``otel`` extra (``pip install 'flockctl[otel]'``),
and nothing here imports them until ``setup`` is given an endpoint (the flag, or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``), so a process without one loads no OpenTelemetry module at all.

The endpoint says the protocol: ``http://host:4318`` (or https) speaks OTLP/HTTP protobuf,
``grpc://host:4317`` OTLP/gRPC, and so does any endpoint on port 4317, the gRPC port collectors
listen on. The SDK reads the other standard variables itself: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (they win over the service name given here),
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_SCHEDULE_DELAY`` and
``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_METRIC_EXPORT_INTERVAL``.

Exporting never blocks a request: a finished span goes into the batch processor's bounded queue
and a background thread sends it. When the queue is full (a collector down or slow) the oldest
span is dropped, and so are the spans of an export that failed; both are counted
(``Telemetry.dropped_spans``, and the ``flockctl_otel_spans_dropped`` counter sent with the
metrics) so that a gap in the traces shows.

Metrics: the process's Prometheus registry (what its ``/metrics`` shows) is read when a metrics
export is due and sent along, converted to OTLP, so the same instruments reach the collector
without a second set of counters on the hot path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

OTLP_HTTP = "http/protobuf"
OTLP_GRPC = "grpc"
GRPC_PORT = 4317
#: How long ``shutdown`` waits for the last spans and metrics to leave, by default.
SHUTDOWN_TIMEOUT_S = 2.0
_SCOPE = "flockctl"


class TelemetryError(ValueError):
    """An endpoint flockctl cannot send to, or the ``otel`` extra is missing."""


class PrometheusRegistry(Protocol):
    """What is read of a ``prometheus_client.CollectorRegistry``."""

    def collect(self) -> Iterable[Any]: ...


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: ``base`` is a URL for OTLP/HTTP, ``host:port`` for OTLP/gRPC."""

    protocol: str
    base: str
    insecure: bool = True

    def http_url(self, signal: str) -> str:
        """The OTLP/HTTP path of one signal (``traces`` or ``metrics``)."""
        return f"{self.base.rstrip('/')}/v1/{signal}"


def parse_endpoint(text: str, protocol: str | None = None) -> Endpoint:
    """Read ``http://host:4318``, ``https://...``, ``grpc://host:4317`` (``grpcs://`` with TLS).

    An http(s) endpoint on port 4317 speaks gRPC too, and so does any endpoint when ``protocol``
    (``OTEL_EXPORTER_OTLP_PROTOCOL``) says ``grpc``.
    """
    url = urlsplit(text.strip())
    if url.scheme not in ("http", "https", "grpc", "grpcs") or not url.hostname:
        raise TelemetryError(
            f"otel collector endpoint {text!r} is not a URL flockctl can send to: use "
            "http://host:4318 for OTLP/HTTP or grpc://host:4317 for OTLP/gRPC"
        )
    try:
        port = url.port
    except ValueError as e:
        raise TelemetryError(f"otel collector endpoint {text!r}: {e}") from None
    grpc = url.scheme in ("grpc", "grpcs") or port == GRPC_PORT or protocol == OTLP_GRPC
    if grpc:
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return Endpoint(
            OTLP_GRPC,
            f"{host}:{port or GRPC_PORT}",
            insecure=url.scheme in ("http", "grpc"),
        )
    return Endpoint(OTLP_HTTP, f"{url.scheme}://{url.netloc}{url.path}".rstrip("/"))


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The flag's endpoint, else ``OTEL_EXPORTER_OTLP_ENDPOINT``; None when neither is set or
    ``OTEL_SDK_DISABLED`` is true."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


class SpanCounts:
    """Spans taken, sent and dropped. Updated under a lock from request threads and the export
    thread; read by ``/metrics``."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.ended = 0
        self.handed = 0  # popped from the queue: exported, failed or evicted
        self.exported = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def on_end(self) -> None:
        with self._lock:
            if self.ended - self.handed >= self.queue_size:
                # the batch processor evicts its oldest span to take this one
                self.dropped += 1
                self.handed += 1
            self.ended += 1

    def on_export(self, count: int, ok: bool) -> None:
        with self._lock:
            self.handed += count
            if ok:
                self.exported += count
            else:
                self.dropped += count


class Telemetry:
    """A configured tracer and meter provider pair, and the counts of what they sent."""

    def __init__(
        self,
        service_name: str,
        endpoint: Endpoint,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        counts: SpanCounts,
        span_exporter: Any = None,
    ):
        self.service_name = service_name
        self.endpoint = endpoint
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.counts = counts
        self.span_exporter = span_exporter  # the OTLP exporter the spans go through
        self._closed = False

    def tracer(self, name: str = _SCOPE) -> Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str = _SCOPE) -> Meter:
        return self.meter_provider.get_meter(name)

    @property
    def dropped_spans(self) -> int:
        """Spans that never reached the collector: evicted from a full queue or in a failed
        export."""
        return self.counts.dropped

    @property
    def exported_spans(self) -> int:
        return self.counts.exported

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Send what is queued and stop, waiting at most ``timeout_s`` (a collector that never
        answers must not hold up a process that is stopping). True when everything finished."""
        if self._closed:
            return True
        self._closed = True

        def close() -> None:
            try:
                self.tracer_provider.shutdown()
            finally:
                self.meter_provider.shutdown(timeout_millis=timeout_s * 1000)

        thread = threading.Thread(target=close, name="flockctl-otel-shutdown", daemon=True)
        thread.start()
        thread.join(timeout_s)
        return not thread.is_alive()


def setup(
    service_name: str,
    endpoint: str | None,
    *,
    registry: PrometheusRegistry | None = None,
) -> Telemetry | None:
    """Start exporting traces and metrics for one process, or return None when no endpoint is
    set (then nothing of OpenTelemetry is imported). ``registry``'s metrics are sent with each
    metrics export. Raises ``TelemetryError`` for an endpoint it cannot use or a missing extra.
    """
    endpoint = resolve_endpoint(endpoint)
    if endpoint is None:
        return None
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    where = parse_endpoint(endpoint, protocol)
    try:
        return _build(service_name, where, registry)
    except ImportError as e:
        raise TelemetryError(
            f"sending to {endpoint} needs OpenTelemetry ({e.name} is missing): "
            "pip install 'flockctl[otel]'"
        ) from None


def _build(service_name: str, where: Endpoint, registry: PrometheusRegistry | None) -> Telemetry:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from flockctl import __version__

    attributes: dict[str, str] = {"service.version": __version__}
    named_by_env = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named_by_env:
        attributes["service.name"] = service_name
    resource = Resource.create(attributes)
    span_exporter, metric_exporter = _exporters(where)

    counts = SpanCounts(_queue_size())
    # batch size, delay and export timeout from OTEL_BSP_*
    processor = BatchSpanProcessor(
        _counting_exporter(span_exporter, counts), max_queue_size=counts.queue_size
    )
    # sampler from OTEL_TRACES_SAMPLER; no exit hook: shutdown() is bounded, the SDK's is not
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer_provider.add_span_processor(_counting_processor(processor, counts))

    reader = PeriodicExportingMetricReader(_bridge_exporter(metric_exporter, registry))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[reader], shutdown_on_exit=False
    )
    telemetry = Telemetry(
        resource.attributes.get("service.name", service_name),  # type: ignore[arg-type]
        where,
        tracer_provider,
        meter_provider,
        counts,
        span_exporter,
    )
    _register_span_counters(telemetry)
    return telemetry


def _exporters(where: Endpoint) -> tuple[Any, Any]:
    if where.protocol == OTLP_GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return (
            OTLPSpanExporter(endpoint=where.base, insecure=where.insecure),
            OTLPMetricExporter(endpoint=where.base, insecure=where.insecure),
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return (
        HTTPSpanExporter(endpoint=where.http_url("traces")),
        HTTPMetricExporter(endpoint=where.http_url("metrics")),
    )


def _queue_size() -> int:
    """The batch processor's queue bound: ``OTEL_BSP_MAX_QUEUE_SIZE``, else the SDK's 2048."""
    try:
        return max(1, int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048")))
    except ValueError:
        return 2048


def _counting_exporter(exporter: Any, counts: SpanCounts) -> Any:
    """``exporter``, counting the spans each export sent or lost."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            try:
                result = exporter.export(spans)
            except Exception:
                log.warning("exporting %d spans failed", len(spans), exc_info=True)
                result = SpanExportResult.FAILURE
            counts.on_export(len(spans), result is SpanExportResult.SUCCESS)
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return exporter.force_flush(timeout_millis)

    return CountingExporter()


def _counting_processor(processor: Any, counts: SpanCounts) -> Any:
    """``processor``, counting the sampled spans it is given (to see its queue overflow)."""
    from opentelemetry.sdk.trace import SpanProcessor

    class CountingProcessor(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            processor.on_start(span, parent_context)

        def on_end(self, span: Any) -> None:
            if span.context is not None and span.context.trace_flags.sampled:
                counts.on_end()
            processor.on_end(span)

        def shutdown(self) -> None:
            processor.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return processor.force_flush(timeout_millis)

    return CountingProcessor()


def _register_span_counters(telemetry: Telemetry) -> None:
    from opentelemetry.metrics import CallbackOptions, Observation

    meter = telemetry.meter()
    counts = telemetry.counts

    def dropped(options: CallbackOptions) -> list[Observation]:
        return [Observation(counts.dropped)]

    def exported(options: CallbackOptions) -> list[Observation]:
        return [Observation(counts.exported)]

    meter.create_observable_counter(
        "flockctl_otel_spans_dropped",
        [dropped],
        description="Spans that never reached the collector (queue full or export failed)",
    )
    meter.create_observable_counter(
        "flockctl_otel_spans_exported", [exported], description="Spans the collector accepted"
    )


def _bridge_exporter(exporter: Any, registry: PrometheusRegistry | None) -> Any:
    """``exporter`` sending ``registry``'s metrics (read at export time) with the SDK's own."""
    if registry is None:
        return exporter
    source = registry  # not None: what the exporter class below reads
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricsData, ResourceMetrics
    from opentelemetry.sdk.metrics.export import ScopeMetrics as SDKScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    scope = InstrumentationScope("flockctl.prometheus")
    started = time.time_ns()

    class BridgeExporter(MetricExporter):
        def __init__(self) -> None:
            super().__init__(
                preferred_temporality=exporter._preferred_temporality,
                preferred_aggregation=exporter._preferred_aggregation,
            )

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            try:
                bridged = prometheus_to_otlp(source, started, time.time_ns())
            except Exception:
                log.warning("reading the Prometheus registry for OTLP failed", exc_info=True)
                bridged = []
            if bridged and metrics_data.resource_metrics:
                first, *rest = metrics_data.resource_metrics
                first = ResourceMetrics(
                    first.resource,
                    [*first.scope_metrics, SDKScopeMetrics(scope, bridged, "")],
                    first.schema_url,
                )
                metrics_data = MetricsData([first, *rest])
            return exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return exporter.force_flush(timeout_millis=timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            exporter.shutdown(timeout_millis=timeout_millis, **kwargs)

    return BridgeExporter()


def prometheus_to_otlp(registry: PrometheusRegistry, start_ns: int, now_ns: int) -> list[Any]:
    """Counters, gauges and histograms of a Prometheus registry as OpenTelemetry SDK metrics
    (cumulative, as Prometheus keeps them). Other kinds are left out."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        NumberDataPoint,
        Sum,
    )

    cumulative = AggregationTemporality.CUMULATIVE
    out: list[Any] = []
    for family in registry.collect():
        if family.type in ("counter", "gauge"):
            points = [
                NumberDataPoint(dict(s.labels), start_ns, now_ns, s.value)
                for s in family.samples
                if not s.name.endswith("_created")
            ]
            if family.type == "counter":
                data: Any = Sum(points, cumulative, is_monotonic=True)
            else:
                data = Gauge(points)
        elif family.type == "histogram":
            data = Histogram(
                _histogram_points(family, start_ns, now_ns, HistogramDataPoint), cumulative
            )
        else:
            continue
        out.append(Metric(family.name, family.documentation, family.unit or "", data))
    return out


def _histogram_points(family: Any, start_ns: int, now_ns: int, point: Any) -> list[Any]:
    """Prometheus keeps cumulative ``le`` buckets per label set; OTLP wants counts per bucket."""
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in family.samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        one = series.setdefault(tuple(sorted(labels.items())), {"buckets": [], "sum": 0.0})
        if s.name.endswith("_bucket"):
            one["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            one["sum"] = s.value
        elif s.name.endswith("_count"):
            one["count"] = s.value
    points = []
    for key, one in series.items():
        buckets = sorted(one["buckets"])
        bounds = [le for le, _ in buckets if le != float("inf")]
        counts, below = [], 0.0
        for _, cumulative in buckets:
            counts.append(int(cumulative - below))
            below = cumulative
        count = int(one.get("count", below))
        points.append(
            point(dict(key), start_ns, now_ns, count, one["sum"], counts, bounds, None, None)
        )
    return points
