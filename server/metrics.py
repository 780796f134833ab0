"""Prometheus metrics of the daemon, in a registry of its own (one per deployment object).

Counters and the latency histogram are updated on the request path; gauges that describe state
(in flight, queued, workers by state, qlrm, target) are read at scrape time, so they cost nothing
per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TypedDict

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flockctl.server.request_log import RequestLog
from flockctl.server.workers import WorkerState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GaugeState(TypedDict):
    """The state the gauges show, read from the deployment at scrape time."""

    in_flight: int
    queued: int
    #: Workers by ``WorkerState`` value; a state with none may be absent.
    workers: dict[str, int]
    qlrm: float | None
    target: int


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], GaugeState]):
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self._read()
        yield GaugeMetricFamily(
            "flockctl_requests_in_flight", "Requests being served by a worker", state["in_flight"]
        )
        yield GaugeMetricFamily(
            "flockctl_requests_queued", "Requests waiting for a worker", state["queued"]
        )
        workers = GaugeMetricFamily("flockctl_workers", "Workers by state", labels=["state"])
        counts = state["workers"]
        for s in WorkerState:
            workers.add_metric([s.value], counts.get(s.value, 0))
        yield workers
        qlrm = state["qlrm"]
        if qlrm is not None:
            yield GaugeMetricFamily(
                "flockctl_autoscaler_qlrm", "Queue-length running mean per live worker", qlrm
            )
        yield GaugeMetricFamily(
            "flockctl_autoscaler_target_workers", "Workers the autoscaler wants", state["target"]
        )


class _RequestLogCollector(Collector):
    """What the request log wrote and dropped, read at scrape time (its writer thread counts)."""

    def __init__(self, request_log: RequestLog) -> None:
        self._log = request_log

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "flockctl_request_log_written", "Request log lines written", self._log.written
        )
        yield CounterMetricFamily(
            "flockctl_request_log_dropped",
            "Request log lines dropped: the queue to the writer was full, or a write failed",
            self._log.dropped,
        )


class Metrics:
    def __init__(self, read_state: Callable[[], GaugeState]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "flockctl_requests",
            "Proxied requests by status code",
            ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flockctl_request_latency_seconds",
            "Time from request to last byte",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "flockctl_retries", "Attempts retried on another worker", registry=self.registry
        )
        self.retries_refused = Counter(
            "flockctl_retries_refused",
            "Failed attempts not retried because the retry budget was spent",
            registry=self.registry,
        )
        self.refusals = Counter(
            "flockctl_refused",
            "Requests and connections refused at the front door, by status code",
            ["code"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(read_state))
        self._by_code: dict[int, Counter] = {}
        self.total = 0
        self.failed = 0
        self.retried = 0
        self._totals: deque[tuple[float, int]] = deque(maxlen=32)

    def sample(self, now: float) -> None:
        """Remember the request total once a second or so, for ``rate``."""
        self._totals.append((now, self.total))

    def rate(self) -> float:
        """Requests per second over the samples kept (about the last 30 seconds)."""
        if len(self._totals) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._totals[0], self._totals[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def observe(self, status: int, seconds: float) -> None:
        child = self._by_code.get(status)
        if child is None:
            child = self._by_code[status] = self.requests.labels(code=str(status))
        child.inc()
        self.latency.observe(seconds)
        self.total += 1
        if status >= 500 or status == 499:
            self.failed += 1

    def retry(self) -> None:
        self.retries.inc()
        self.retried += 1

    def retry_refused(self) -> None:
        self.retries_refused.inc()

    def refused(self, status: int) -> None:
        """A request or connection answered at the front door (``http_protocol``)."""
        self.refusals.labels(code=str(status)).inc()

    def track_request_log(self, request_log: RequestLog) -> None:
        """Export what ``request_log`` wrote and dropped."""
        self.registry.register(_RequestLogCollector(request_log))

    def render(self) -> bytes:
        return generate_latest(self.registry)
