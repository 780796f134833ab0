"""Real OTLP collectors for tests, on 127.0.0.1 in the test process: ``OtlpReceiver`` speaks
OTLP/HTTP (an HTTP server decoding ``/v1/traces`` and ``/v1/metrics`` protobuf bodies) and
``GrpcOtlpReceiver`` OTLP/gRPC (a grpcio server with the TraceService and MetricsService of
``opentelemetry-proto``). Both decode what they get into plain lists to assert on.

They run on threads of their own, so sync tests, async tests and processes started by tests (a
daemon, an engine) can all send to them. ``hang=True`` makes an HTTP collector that takes the
connection and never answers, to show that a stuck collector changes nothing for requests.

    with OtlpReceiver() as otlp:  # or GrpcOtlpReceiver()
        ... run something with --otel-collector-endpoint otlp.endpoint ...
        until_sync(lambda: otlp.spans_named("job"), "the job span")
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class Event:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    service: str
    scope: str
    name: str
    trace_id: str  # 32 hex digits, as in a traceparent header
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[Event]
    status_code: int
    resource: dict[str, Any] = field(default_factory=dict)

    def event_names(self) -> list[str]:
        return [e.name for e in self.events]


@dataclass(frozen=True)
class Point:
    attributes: dict[str, Any]
    value: float | None = None  # sums and gauges
    count: int | None = None  # histograms
    sum: float | None = None
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Metric:
    service: str
    scope: str
    name: str
    kind: str  # "sum", "gauge" or "histogram"
    points: list[Point]


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def decode_traces(body: bytes) -> list[Span]:
    return spans_of(trace_service_pb2.ExportTraceServiceRequest.FromString(body))


def spans_of(request: Any) -> list[Span]:
    """The spans of an ``ExportTraceServiceRequest``."""
    spans = []
    for rs in request.resource_spans:
        resource = attributes_of(rs.resource.attributes)
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    Span(
                        service=service,
                        scope=ss.scope.name,
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=attributes_of(s.attributes),
                        events=[
                            Event(e.name, e.time_unix_nano, attributes_of(e.attributes))
                            for e in s.events
                        ],
                        status_code=s.status.code,
                        resource=resource,
                    )
                )
    return spans


def decode_metrics(body: bytes) -> list[Metric]:
    return metrics_of(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))


def metrics_of(request: Any) -> list[Metric]:
    """The metrics of an ``ExportMetricsServiceRequest``."""
    metrics = []
    for rm in request.resource_metrics:
        service = str(attributes_of(rm.resource.attributes).get("service.name", ""))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                points: list[Point] = []
                if kind in ("sum", "gauge"):
                    for p in getattr(m, kind).data_points:
                        number = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        points.append(Point(attributes_of(p.attributes), value=number))
                elif kind == "histogram":
                    for p in m.histogram.data_points:
                        points.append(
                            Point(
                                attributes_of(p.attributes),
                                count=p.count,
                                sum=p.sum,
                                bucket_counts=list(p.bucket_counts),
                                explicit_bounds=list(p.explicit_bounds),
                            )
                        )
                metrics.append(Metric(service, sm.scope.name, m.name, kind or "", points))
    return metrics


class Collected:
    """What a receiver got, kept under a lock (the server's threads add, the test reads)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.metrics: list[Metric] = []
        self.requests = 0  # export requests received, answered or not
        self._lock = threading.Lock()

    def spans_named(self, name: str, service: str | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name and service in (None, s.service)]

    def spans_in(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def metrics_named(self, name: str, service: str | None = None) -> list[Metric]:
        with self._lock:
            return [m for m in self.metrics if m.name == name and service in (None, m.service)]


class OtlpReceiver(Collected):
    """Collects what OTLP/HTTP exporters send it. ``endpoint`` is what to pass as
    ``--otel-collector-endpoint``."""

    def __init__(self, *, hang: bool = False):
        super().__init__()
        self.hang = hang
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver._lock:
                    receiver.requests += 1
                if receiver.hang:
                    receiver._release.wait()
                    return
                if self.path == "/v1/traces":
                    spans = decode_traces(body)
                    with receiver._lock:
                        receiver.spans.extend(spans)
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    metrics = decode_metrics(body)
                    with receiver._lock:
                        receiver.metrics.extend(metrics)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                data = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class GrpcOtlpReceiver(Collected):
    """Collects what OTLP/gRPC exporters send it: the TraceService and MetricsService of the
    OTLP protocol on a grpcio server. ``endpoint`` (``grpc://127.0.0.1:PORT``) is what to pass as
    ``--otel-collector-endpoint``."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                spans = spans_of(request)
                with receiver._lock:
                    receiver.requests += 1
                    receiver.spans.extend(spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                metrics = metrics_of(request)
                with receiver._lock:
                    receiver.requests += 1
                    receiver.metrics.extend(metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"grpc://127.0.0.1:{self.port}"

    def start(self) -> GrpcOtlpReceiver:
        self._server.start()
        return self

    def close(self) -> None:
        self._server.stop(grace=None).wait()

    def __enter__(self) -> GrpcOtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def otlp_receiver(*, hang: bool = False) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(hang=hang) as receiver:
        yield receiver
