"""Prometheus metrics of one engine, named like vLLM's under a ``flockctl_`` prefix.

Dashboards and alerts written for vLLM (``vllm:num_requests_running``,
``vllm:time_to_first_token_seconds``, ...) carry over by swapping the prefix.

Two kinds of series, fed two ways, so that the model loop pays next to nothing:

- State (requests running/waiting/swapped, MLFQ queue lengths, KV and device memory, preemption
  totals) is read at scrape time from one ``stats()`` call, so every series of one scrape comes
  from the same moment and the loop never touches a gauge.
- Per-request figures (latency histograms, finish reasons, token totals) are fed once per finished
  job by ``observe_finished``, which the loop thread calls; prometheus_client's metrics take a lock
  per update, so that is thread-safe and costs a few microseconds.

The latency histograms carry vLLM's ``model_name`` label. With ``--otel-collector-endpoint`` the
same registry is sent over OTLP too (``flockctl.telemetry`` reads it at export time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flockctl.engine.job import FinishReason, Job, Preemption

# The text format every Prometheus version parses (the daemon's /metrics says the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so its dashboards' quantile panels read the same.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# vLLM's time-per-output-token buckets
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

StatsReader = Callable[[], Mapping[str, Any]]


def _gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, unit=unit)


class _StatsCollector(Collector):
    """Turns one ``/stats`` snapshot into gauges; missing parts are left out, never guessed."""

    def __init__(self, read: StatsReader):
        self._read = read

    def collect(self) -> Iterable[Metric]:
        stats = self._read()
        yield _gauge(
            "flockctl_num_requests_running",
            "Requests in the batch of the current iteration",
            stats.get("running", 0),
        )
        yield _gauge(
            "flockctl_num_requests_waiting",
            "Requests accepted but not in the current batch (never run, or preempted)",
            stats.get("waiting", 0),
        )
        yield _gauge(
            "flockctl_num_requests_swapped",
            "Preempted requests whose KV cache sits in host memory",
            stats.get("swapped", 0),
        )
        queues = GaugeMetricFamily(
            "flockctl_queue_length", "Unfinished requests per MLFQ level", labels=["level"]
        )
        for level, length in enumerate(stats.get("queue_lengths", ())):
            queues.add_metric([str(level)], length)
        yield queues

        preemptions = CounterMetricFamily(
            "flockctl_num_preemptions",
            "Times an unfinished request left the batch, by what happened to its KV cache",
            labels=["kind"],
        )
        totals = stats.get("preemptions_total", {})
        for kind in Preemption:
            preemptions.add_metric([kind.value], totals.get(kind.value, 0))
        yield preemptions

        kv = stats.get("kv")
        if kv:
            budget, used = kv.get("budget_tokens", 0), kv.get("used_tokens", 0)
            yield _gauge(
                "flockctl_kv_cache_usage_perc",
                "Fraction of the device KV budget in use (1 = full)",
                used / budget if budget else 0.0,
            )
            yield _gauge("flockctl_kv_cache_budget_tokens", "Device KV budget in tokens", budget)
            yield _gauge("flockctl_kv_cache_used_tokens", "Tokens cached on the device", used)
            yield _gauge(
                "flockctl_kv_cache_host_tokens",
                "Tokens of swapped-out KV cache held in host memory",
                kv.get("host_tokens", 0),
            )

        spec = stats.get("speculation")
        if spec:
            for key, doc in (
                ("num_drafts", "Speculative steps: token trees drafted and verified"),
                ("num_draft_tokens", "Tokens drafted by the speculative models (tree nodes)"),
                ("num_accepted_tokens", "Drafted tokens the served model accepted"),
            ):
                yield CounterMetricFamily(
                    f"flockctl_spec_decode_{key}", doc, value=spec.get(key, 0)
                )
            per_pos = CounterMetricFamily(
                "flockctl_spec_decode_num_accepted_tokens_per_pos",
                "Accepted drafted tokens by depth in the tree (0: the first after the root)",
                labels=["position"],
            )
            for position, count in enumerate(spec.get("num_accepted_tokens_per_pos", ())):
                per_pos.add_metric([str(position)], count)
            yield per_pos
            yield _gauge(
                "flockctl_spec_decode_active",
                "1 while the engine speculates (--spec auto turns it off when it does not pay)",
                1.0 if spec.get("active") else 0.0,
            )

        prefix = stats.get("prefix_cache")
        if prefix:
            # vLLM's names: hits over queries is the share of prompt tokens not computed
            yield CounterMetricFamily(
                "flockctl_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                value=prefix.get("queries", 0),
            )
            yield CounterMetricFamily(
                "flockctl_prefix_cache_hits",
                "Prompt tokens found in the prefix cache (their prefill was skipped)",
                value=prefix.get("hits", 0),
            )

        device = stats.get("device")
        if device:
            labels = ["device", "source"]
            values = [str(device.get("type", "")), str(device.get("source", ""))]
            for key, doc in (
                ("memory_used", "Memory in use on the engine's device"),
                ("memory_total", "Memory of the engine's device"),
            ):
                if device.get(key) is not None:
                    family = GaugeMetricFamily(
                        f"flockctl_device_{key}", doc, labels=labels, unit="bytes"
                    )
                    family.add_metric(values, device[key])
                    yield family


class EngineMetrics:
    """The engine's ``/metrics``: a registry of its own, so two engines in one process (tests)
    never share a series."""

    def __init__(self, stats: StatsReader, model_name: str = ""):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatsCollector(stats))
        r = self.registry
        self._success = Counter(
            "flockctl_request_success",
            "Finished requests by finish reason (abort: cancelled or client gone)",
            ["finished_reason"],
            registry=r,
        )
        # Every reason is exported from the start, so rate() works before the first abort.
        self._by_reason = {reason: self._success.labels(reason.value) for reason in FinishReason}
        self._prompt_tokens = Counter(
            "flockctl_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self._generation_tokens = Counter(
            "flockctl_generation_tokens", "Tokens generated for finished requests", registry=r
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            family = Histogram(name, doc, ["model_name"], buckets=buckets, registry=r)
            return family.labels(model_name)

        self._ttft = histogram(
            "flockctl_time_to_first_token_seconds",
            "From arrival to the first generated token",
            TTFT_BUCKETS,
        )
        self._tpot = histogram(
            "flockctl_time_per_output_token_seconds",
            "Mean time between output tokens of a request (its decode time over its tokens"
            " after the first)",
            TPOT_BUCKETS,
        )
        self._e2e = histogram(
            "flockctl_e2e_request_latency_seconds",
            "From arrival to the last token, for requests that were not aborted",
            LATENCY_BUCKETS,
        )
        self._queue = histogram(
            "flockctl_request_queue_time_seconds",
            "From arrival to the first iteration that ran the request",
            LATENCY_BUCKETS,
        )
        self._prefill = histogram(
            "flockctl_request_prefill_time_seconds",
            "From the first iteration that ran the request to its first token",
            LATENCY_BUCKETS,
        )
        self._decode = histogram(
            "flockctl_request_decode_time_seconds",
            "From the first token to the last",
            LATENCY_BUCKETS,
        )

    def observe_finished(self, job: Job) -> None:
        """Count a finished job. Called on the model-loop thread, once per job.

        Aborted jobs count as requests and tokens but stay out of the latency histograms: a client
        that hung up early would otherwise make the engine look faster than it is.
        """
        reason = job.finish_reason or FinishReason.ABORT
        self._by_reason[reason].inc()
        self._prompt_tokens.inc(len(job.prompt_ids))
        self._generation_tokens.inc(len(job.output_ids))
        if job.first_scheduled is not None:
            self._queue.observe(job.first_scheduled - job.arrival)
        if reason is FinishReason.ABORT:
            return
        first, end = job.first_token, job.finished
        if first is not None:
            self._ttft.observe(first - job.arrival)
            if job.first_scheduled is not None:
                self._prefill.observe(first - job.first_scheduled)
        if end is not None:
            self._e2e.observe(end - job.arrival)
            if first is not None:
                self._decode.observe(end - first)
                if len(job.output_ids) > 1:
                    self._tpot.observe((end - first) / (len(job.output_ids) - 1))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE
