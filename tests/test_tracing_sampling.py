"""The balancer takes the sampling decision before any span exists: the same decision the SDK's
samplers take on the same trace id, so the engine (and anything else with the same ratio) agrees;
an unsampled request makes no SDK span and still hands its worker a traceparent, unsampled."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from flockctl.server.request_log import Attempt, RequestRecord
from flockctl.server.tracing import BalancerTracing, Sampling

PARENT_SPAN = "b7ad6b7169203331"

SAMPLERS = {
    "always_on": sampling.ALWAYS_ON,
    "always_off": sampling.ALWAYS_OFF,
    "traceidratio 0.3": sampling.TraceIdRatioBased(0.3),
    "parentbased_always_on": sampling.DEFAULT_ON,
    "parentbased_always_off": sampling.DEFAULT_OFF,
    "parentbased_traceidratio 0.1": sampling.ParentBasedTraceIdRatio(0.1),
    "parentbased over a ratio, parents ignored": sampling.ParentBased(
        sampling.TraceIdRatioBased(0.5),
        remote_parent_sampled=sampling.TraceIdRatioBased(0.5),
        remote_parent_not_sampled=sampling.ALWAYS_ON,
    ),
}


def sdk_decides(sampler: Any, trace_id: int, flags: int | None) -> bool:
    context = None
    if flags is not None:
        parent = SpanContext(trace_id, 1, is_remote=True, trace_flags=TraceFlags(flags))
        context = set_span_in_context(NonRecordingSpan(parent), Context())
    return sampler.should_sample(context, trace_id, "x").decision.is_sampled()


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_decision_is_the_sdks_on_the_same_trace_id(name):
    sampler = SAMPLERS[name]
    rule = Sampling.of(sampler)
    assert rule is not None
    draw = random.Random(7)
    for _ in range(2000):
        trace_id = draw.getrandbits(128) or 1
        for flags in (None, 0x00, 0x01, 0x02, 0x03):
            assert rule.sampled(trace_id, flags) == sdk_decides(sampler, trace_id, flags)


class OwnSampler(sampling.Sampler):
    """A sampler of the user's own: only the SDK can ask it."""

    def __init__(self) -> None:
        self.asked = 0

    def should_sample(self, parent_context, trace_id, name, *args: Any, **kw: Any):
        self.asked += 1
        return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE)

    def get_description(self) -> str:
        return "own"


class RatioOfMyOwn(sampling.TraceIdRatioBased):
    def should_sample(self, *args: Any, **kw: Any):
        return sampling.SamplingResult(sampling.Decision.DROP)


def test_samplers_that_decide_their_own_way_are_asked_through_the_sdk():
    assert Sampling.of(OwnSampler()) is None
    assert Sampling.of(RatioOfMyOwn(1.0)) is None
    assert Sampling.of(sampling.StaticSampler(sampling.Decision.RECORD_ONLY)) is None
    assert Sampling.of(sampling.ParentBased(OwnSampler())) is None
    own = OwnSampler()
    tracing, exported = balancer(own)
    assert tracing.sampling is None
    run(tracing, [])
    assert own.asked == 2  # the request's span and its attempt's
    assert len(exported.get_finished_spans()) == 2


def balancer(sampler: Any) -> tuple[BalancerTracing, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return BalancerTracing(provider), exported


def run(tracing: BalancerTracing, headers: list[tuple[bytes, bytes]]) -> tuple[RequestRecord, str]:
    """One request through the tracing hooks as the relay calls them; returns its record and the
    header lines its worker was sent."""
    rec = RequestRecord("POST", "/v1/completions", "127.0.0.1", time.perf_counter())
    if any(k == b"traceparent" for k, _ in headers):
        rec.trace_id = "as the relay read it"
    tracing.start(rec, {"headers": headers})
    attempt = Attempt("w1")
    rec.attempts.append(attempt)
    sent = tracing.attempt(rec, attempt).decode()
    attempt.status = rec.status = 200
    tracing.end_attempt(attempt)
    tracing.finish(rec)
    return rec, sent


def counting_spans(tracing: BalancerTracing) -> list[str]:
    made: list[str] = []
    tracer = tracing._tracer
    start_span = tracer.start_span

    def counted(name: str, *args: Any, **kw: Any) -> Any:
        made.append(name)
        return start_span(name, *args, **kw)

    tracer.start_span = counted
    return made


def test_an_unsampled_request_makes_no_span_and_its_worker_is_told():
    tracing, exported = balancer(sampling.ParentBasedTraceIdRatio(0.5))
    made = counting_spans(tracing)
    bound = tracing.sampling.root  # type: ignore[union-attr]
    for _ in range(400):
        rec, sent = run(tracing, [])
        trace_id = int(rec.trace_id or "", 16)
        sampled = trace_id & ((1 << 64) - 1) < bound
        _, in_header, span_id, flags = sent.split("\r\n")[0].split(": ")[1].split("-")
        assert in_header == rec.trace_id and len(span_id) == 16 and span_id != "0" * 16
        # level 2 trace context: the ids are random; sampled or not, as the ratio says
        assert int(flags, 16) == (0x03 if sampled else 0x02)
    spans = exported.get_finished_spans()
    roots = {s.context.trace_id for s in spans if s.parent is None}
    # every sampled request, and only those, went through the SDK: two spans each
    assert 100 < len(roots) < 300
    assert all(t & ((1 << 64) - 1) < bound for t in roots)
    assert len(made) == len(spans) == 2 * len(roots)


def test_a_clients_unsampled_trace_is_continued_without_spans():
    tracing, exported = balancer(sampling.ParentBasedTraceIdRatio(1.0))
    made = counting_spans(tracing)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    headers = [
        (b"traceparent", f"00-{trace_id}-{PARENT_SPAN}-00".encode()),
        (b"tracestate", b"vendor=a"),
        (b"tracestate", b"other=b"),
    ]
    rec, sent = run(tracing, headers)
    assert rec.trace_id == trace_id
    traceparent, tracestate, _ = sent.split("\r\n")
    _, in_header, span_id, flags = traceparent.split("-")
    assert (in_header, flags) == (trace_id, "00")
    assert span_id != PARENT_SPAN  # the balancer's own place in the trace
    assert tracestate == "tracestate: vendor=a,other=b"
    assert made == [] and exported.get_finished_spans() == ()
    # the same trace, sampled by the client: the balancer's spans, as before
    headers[0] = (b"traceparent", f"00-{trace_id}-{PARENT_SPAN}-01".encode())
    rec, sent = run(tracing, headers)
    root, attempt = sorted(exported.get_finished_spans(), key=lambda s: s.name)
    assert (root.name, attempt.name) == ("POST /v1/completions", "attempt 1")
    assert f"{root.context.trace_id:032x}" == trace_id == rec.trace_id
    assert f"{root.parent.span_id:016x}" == PARENT_SPAN
    assert sent.startswith(f"traceparent: 00-{trace_id}-{attempt.context.span_id:016x}-01\r\n")
    assert root.attributes["http.response.status_code"] == 200


@pytest.mark.parametrize(
    "traceparent",
    [
        b"00-" + b"0" * 32 + b"-b7ad6b7169203331-01",  # no trace id
        b"00-0af7651916cd43dd8448eb211c80319c-" + b"0" * 16 + b"-01",  # no span id
        b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # a forbidden version
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",  # version 00 has 4 parts
        b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
    ],
)
def test_a_traceparent_the_sdk_ignores_starts_a_trace(traceparent):
    tracing, _ = balancer(sampling.ParentBasedTraceIdRatio(0.0))
    rec, sent = run(tracing, [(b"traceparent", traceparent)])
    assert rec.trace_id is not None and rec.trace_id not in traceparent.decode().lower()
    assert sent.endswith("-02\r\n")  # a new, random, unsampled trace; no tracestate


def test_the_engine_builds_a_job_span_only_for_a_sampled_job(monkeypatch):
    from opentelemetry.sdk.metrics import MeterProvider

    from flockctl.engine import tracing as engine_tracing
    from flockctl.engine.job import FinishReason, Job, SamplingParams
    from flockctl.telemetry import Endpoint, SpanCounts, Telemetry

    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampling.ParentBasedTraceIdRatio(1.0))
    provider.add_span_processor(SimpleSpanProcessor(exported))
    sent = Telemetry(
        "flockctl-engine", Endpoint("grpc", "127.0.0.1:1"), provider, MeterProvider(), SpanCounts(8)
    )
    observer = engine_tracing.JobObserver("tiny", sent, log_access=False)
    built: list[str] = []
    attributes_of = engine_tracing.span_attributes

    def counted(job: Job, model_name: str) -> dict[str, Any]:
        built.append(job.id)
        return attributes_of(job, model_name)

    monkeypatch.setattr(engine_tracing, "span_attributes", counted)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    for flags in ("00", "01"):
        job = Job([1, 2, 3], SamplingParams(max_tokens=2))
        job.traceparent = f"00-{trace_id}-{PARENT_SPAN}-{flags}"
        job.output_ids = [4, 5]
        job.record("admitted", job.arrival, 0)
        job.finish_reason = FinishReason.LENGTH
        job.finished = job.arrival + 0.01
        job.record("finished", job.finished, "length")
        observer.finished(job)
    (span,) = exported.get_finished_spans()
    assert built == [job.id]  # the unsampled job's attributes were never built
    assert f"{span.parent.span_id:016x}" == PARENT_SPAN
    assert span.attributes["flockctl.job.id"] == job.id
    assert span.attributes["gen_ai.usage.output_tokens"] == 2
    assert [e.name for e in span.events] == ["admitted", "finished"]
