"""OpenTelemetry: which exporter an endpoint gets, what reaches a real OTLP receiver (the engine's
job spans under the caller's trace, the /metrics histograms), that a collector down or stuck
changes nothing for requests, and that nothing of OpenTelemetry loads without an endpoint."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from conftest import TINY, free_socket, until
from otlp_receiver import OtlpReceiver
from prometheus_client import CollectorRegistry, Counter, Histogram

from flockctl import telemetry
from flockctl.telemetry import OTLP_GRPC, OTLP_HTTP, TelemetryError, parse_endpoint

if TYPE_CHECKING:
    from flockctl.engine.engine import Engine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture(autouse=True)
def quick_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* from the environment running the tests, and exports every few tens of ms."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture
def setup() -> Iterator[Callable[..., telemetry.Telemetry | None]]:
    """``telemetry.setup``, shutting down whatever it started."""
    started: list[telemetry.Telemetry] = []

    def make(*args: object, **kwargs: object) -> telemetry.Telemetry | None:
        t = telemetry.setup(*args, **kwargs)  # type: ignore[arg-type]
        if t is not None:
            started.append(t)
        return t

    yield make
    for t in started:
        t.shutdown(0.5)


def closed_port() -> int:
    with free_socket() as s:  # bound, never listening: connections are refused
        return s.getsockname()[1]


# -- endpoints and exporters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "protocol", "base"),
    [
        ("http://collector:4318", OTLP_HTTP, "http://collector:4318"),
        ("https://collector.example:443/otlp/", OTLP_HTTP, "https://collector.example:443/otlp"),
        ("grpc://collector:4317", OTLP_GRPC, "collector:4317"),
        ("grpc://collector", OTLP_GRPC, "collector:4317"),
        ("http://collector:4317", OTLP_GRPC, "collector:4317"),  # the gRPC port says gRPC
        ("grpc://[::1]:5317", OTLP_GRPC, "[::1]:5317"),
    ],
)
def test_the_endpoint_says_the_protocol(endpoint: str, protocol: str, base: str) -> None:
    where = parse_endpoint(endpoint)
    assert (where.protocol, where.base) == (protocol, base)


def test_otlp_http_signals_have_their_own_paths() -> None:
    assert parse_endpoint("http://c:4318/").http_url("traces") == "http://c:4318/v1/traces"


@pytest.mark.parametrize("endpoint", ["collector:4317", "ftp://c:21", "http://", "http://c:x"])
def test_an_endpoint_flockctl_cannot_use_is_named(endpoint: str) -> None:
    with pytest.raises(TelemetryError, match="otel collector endpoint"):
        parse_endpoint(endpoint)


def test_no_endpoint_no_telemetry(setup: Callable[..., telemetry.Telemetry | None]) -> None:
    assert setup("flockctl-engine", None) is None


def test_setup_builds_the_exporter_the_endpoint_asks_for(
    setup: Callable[..., telemetry.Telemetry | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    grpc = setup("x", "grpc://127.0.0.1:4317")
    http = setup("x", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    forced = setup("x", "http://127.0.0.1:4318")
    assert grpc is not None and http is not None and forced is not None
    assert "proto.grpc" in type(grpc.span_exporter).__module__
    assert "proto.http" in type(http.span_exporter).__module__
    assert "proto.grpc" in type(forced.span_exporter).__module__


def test_the_standard_environment_is_honoured(
    setup: Callable[..., telemetry.Telemetry | None],
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-engine")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    t = setup("flockctl-engine", None)
    assert t is not None
    assert t.endpoint.base == receiver.endpoint
    assert t.service_name == "my-engine"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert setup("flockctl-engine", None) is None


async def test_spans_and_the_prometheus_registry_reach_the_collector(
    setup: Callable[..., telemetry.Telemetry | None], receiver: OtlpReceiver
) -> None:
    registry = CollectorRegistry()
    Counter("flockctl_things", "things", ["kind"], registry=registry).labels("a").inc(3)
    latency = Histogram("flockctl_wait_seconds", "w", ["model_name"], buckets=(0.1, 1.0),
                        registry=registry)  # fmt: skip
    latency.labels("m").observe(0.5)
    latency.labels("m").observe(5.0)
    t = setup("svc", receiver.endpoint, registry=registry)
    assert t is not None
    with t.tracer().start_as_current_span("work") as span:
        span.add_event("halfway", {"n": 1})
    [work] = await until(lambda: receiver.spans_named("work", "svc"), "the span")
    assert work.event_names() == ["halfway"]
    histograms = await until(lambda: receiver.metrics_named("flockctl_wait_seconds"), "metrics")
    point = histograms[-1].points[0]
    assert (point.attributes, point.count, point.sum) == ({"model_name": "m"}, 2, 5.5)
    assert (point.explicit_bounds, point.bucket_counts) == ([0.1, 1.0], [0, 1, 1])
    [things] = receiver.metrics_named("flockctl_things")[-1:]
    assert (things.kind, things.points[0].value) == ("sum", 3.0)
    assert t.exported_spans == 1 and t.dropped_spans == 0


async def test_spans_a_collector_never_takes_are_counted_as_dropped(
    setup: Callable[..., telemetry.Telemetry | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    with OtlpReceiver(hang=True) as stuck:
        t = setup("svc", stuck.endpoint)
        assert t is not None
        for n in range(20):  # ending a span never waits for the collector
            with t.tracer().start_as_current_span(f"s{n}"):
                pass
        # at most one batch in flight (stuck) and one queue full; the rest were dropped
        await until(lambda: t.dropped_spans >= 12, "the dropped spans counted")
        assert t.exported_spans == 0
    refused = setup("svc", f"http://127.0.0.1:{closed_port()}")
    assert refused is not None
    with refused.tracer().start_as_current_span("lost"):
        pass
    await until(lambda: refused.dropped_spans == 1, "a failed export counted as dropped")


@pytest.mark.e2e
def test_without_an_endpoint_no_opentelemetry_module_loads() -> None:
    code = (
        "import json, os, sys\n"
        "os.environ.pop('OTEL_EXPORTER_OTLP_ENDPOINT', None)\n"
        "from flockctl import telemetry\n"
        "assert telemetry.setup('flockctl-engine', None) is None\n"
        "otel = [m for m in sys.modules if m.startswith(('opentelemetry', 'grpc'))]\n"
        "print(json.dumps(sorted(otel)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


# -- the engine ------------------------------------------------------------------------------------


@asynccontextmanager
async def traced_engine(
    tiny: Path, endpoint: str | None, *, access_log: bool = False
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    from flockctl.engine.api import create_app
    from flockctl.engine.config import EngineConfig
    from flockctl.engine.loader import load_engine

    config = EngineConfig(
        model=str(tiny),
        served_model_name=TINY,
        device="cpu",
        max_batch_size=4,
        otel_collector_endpoint=endpoint,
        access_log=access_log,
    )
    engine = load_engine(config, progress=False)
    try:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            yield engine, client
    finally:
        engine.close()


COMPLETION = {"model": TINY, "prompt": "hello there", "max_tokens": 6, "temperature": 0,
              "ignore_eos": True}  # fmt: skip


async def test_an_engine_job_span_continues_the_callers_trace(
    tiny: Path, receiver: OtlpReceiver
) -> None:
    async with traced_engine(tiny, receiver.endpoint) as (_, client):
        r = await client.post(
            "/v1/completions", json=COMPLETION, headers={"traceparent": TRACEPARENT}
        )
        assert r.status_code == 200, r.text
        [span] = await until(lambda: receiver.spans_in(TRACE_ID), "the job's span")
        ttft = await until(
            lambda: [
                m
                for m in receiver.metrics_named("flockctl_time_to_first_token_seconds")
                if m.service == "flockctl-engine" and m.points and m.points[0].count
            ],
            "the job in the latency histograms over OTLP",
        )
    assert span.service == "flockctl-engine"
    assert span.parent_span_id == PARENT_ID
    assert span.event_names() == ["admitted", "scheduled", "first_token", "finished"]
    assert span.events[-1].attributes == {"reason": "length"}
    assert span.events[0].attributes["level"] == span.attributes["flockctl.job.level.admission"]
    assert span.start_ns <= span.events[0].time_ns <= span.events[-1].time_ns <= span.end_ns
    usage = r.json()["usage"]
    assert span.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert span.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert span.attributes["gen_ai.request.model"] == TINY
    assert "flockctl.job.level.finish" in span.attributes
    assert ttft[-1].points[0].attributes == {"model_name": TINY}


@pytest.mark.parametrize("collector", ["refused", "stuck"])
async def test_a_collector_down_or_stuck_changes_nothing_for_requests(
    tiny: Path, collector: str
) -> None:
    with OtlpReceiver(hang=True) as stuck:
        endpoint = stuck.endpoint if collector == "stuck" else f"http://127.0.0.1:{closed_port()}"
        async with traced_engine(tiny, endpoint) as (engine, client):
            for _ in range(3):
                r = await client.post(
                    "/v1/completions", json=COMPLETION, headers={"traceparent": TRACEPARENT}
                )
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 6
            if collector == "stuck":
                await until(lambda: stuck.requests >= 1, "the collector to be sent something")
            else:
                await until(lambda: engine.telemetry.dropped_spans == 3, "the lost spans counted")


async def test_the_access_log_has_a_line_per_job(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flockctl.engine.access")
    async with traced_engine(tiny, None, access_log=True) as (engine, client):
        assert engine.telemetry is None
        r = await client.post(
            "/v1/completions", json=COMPLETION, headers={"traceparent": TRACEPARENT}
        )
        job_id = r.json()["id"]
        lines = await until(
            lambda: [x for x in caplog.records if x.name == "flockctl.engine.access"],
            "the access log line",
        )
    [line] = [json.loads(x.getMessage()) for x in lines]
    assert job_id.endswith(line["job"])
    assert line["trace_id"] == TRACE_ID
    assert (line["status"], line["completion_tokens"], line["preemptions"]) == ("length", 6, 0)
    assert 0 <= line["queue_ms"] <= line["ttft_ms"] <= line["e2e_ms"]


async def test_latency_histograms_per_model_on_metrics(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200
    text = (await client.get("/metrics")).text
    for name in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
    ):
        count = next(
            line for line in text.splitlines()
            if line.startswith(f'flockctl_{name}_count{{model_name="{TINY}"}}')
        )  # fmt: skip
        assert float(count.split()[-1]) >= 1, name


def test_the_loop_puts_preemptions_and_swaps_on_the_timeline() -> None:
    from flockctl.engine.batcher import Plan
    from flockctl.engine.job import Job, JobState, SamplingParams
    from flockctl.engine.loop import _record_plan

    swapped, dropped, descheduled, back = (Job([1, 2], SamplingParams()) for _ in range(4))
    swapped.state = JobState.SWAPPED
    dropped.state = descheduled.state = JobState.PREEMPTED
    plan = Plan(
        preempted=[swapped, dropped, descheduled],
        swapped_out=[swapped],
        dropped=[dropped],
        swapped_in=[back],
    )
    _record_plan(plan, 7.0)
    assert swapped.events == [("swapped_out", 7.0, None), ("preempted", 7.0, "swapped")]
    assert dropped.events == [("preempted", 7.0, "recomputed")]
    assert descheduled.events == [("preempted", 7.0, "descheduled")]
    assert back.events == [("swapped_in", 7.0, None)]
