"""The balancer's traces reach a real OTLP/HTTP collector: a span per request under the client's
trace, a child span per attempt whose traceparent the worker receives, metrics beside them; and a
collector that is down or never answers changes nothing for requests."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import free_port, until, until_sync
from fake_worker import build_app
from otlp_receiver import GrpcOtlpReceiver, OtlpReceiver, otlp_receiver

from flockctl.state import REQUEST_LOG

CHAT = "/v1/chat/completions"
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3


@pytest.fixture(autouse=True)
def quick_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans and metrics leave within a fraction of a second, and a dead collector fails fast."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)


def recording_worker(status: int, seen: list[str]) -> web.Application:
    """A worker answering ``status`` to chat requests, keeping each request's traceparent."""

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        if status != 200:
            return web.json_response({"error": {"message": "busy"}}, status=status)
        usage = {"prompt_tokens": 2, "completion_tokens": 1}
        return web.json_response({"choices": [{"message": {"content": "x"}}], "usage": usage})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post(CHAT, chat)
    return app


def logged(directory: Any) -> list[dict[str, Any]]:
    path = directory / REQUEST_LOG
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


async def test_a_retried_request_is_one_trace_with_a_span_per_attempt(daemon, upstream, http):
    bad_seen: list[str] = []
    good_seen: list[str] = []
    bad = await upstream(recording_worker(503, bad_seen))
    good = await upstream(recording_worker(200, good_seen))
    with otlp_receiver() as otlp:
        d = await daemon(
            endpoints=[bad.url, good.url],
            policy="round-robin",
            otel_collector_endpoint=otlp.endpoint,
        )
        await d.wait_ready(2)
        sent: list[tuple[str, str]] = []
        for n in range(2):  # round robin tries the failing worker first for one of them
            trace_id, parent = f"{n + 1:032x}", f"{n + 1:016x}"
            sent.append((trace_id, parent))
            headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
            async with http.post(f"{d.url}{CHAT}", json={}, headers=headers) as resp:
                assert resp.status == 200
        records = await until(
            lambda: len(logged(d.deployment.state_dir)) == 2 and logged(d.deployment.state_dir),
            "two request log lines",
        )
        retried = next(r for r in records if len(r["attempts"]) == 2)
        trace_id = retried["trace_id"]
        parent = dict(sent)[trace_id]  # the log names the client's trace
        spans = await until(
            lambda: len(otlp.spans_in(trace_id)) >= 3 and otlp.spans_in(trace_id),
            "the retried request's three spans",
        )
        (root,) = [s for s in spans if s.kind == SPAN_KIND_SERVER]
        assert root.service == "flockctl-balancer"
        assert root.name == f"POST {CHAT}"
        assert root.parent_span_id == parent  # continued from the client's traceparent
        assert root.attributes["flockctl.attempts"] == 2
        assert root.attributes["http.response.status_code"] == 200
        assert root.attributes["flockctl.worker"] == retried["worker"]
        assert root.attributes["http.route"] == CHAT
        assert "flockctl.queue_ms" in root.attributes
        attempts = sorted((s for s in spans if s.kind == SPAN_KIND_CLIENT), key=lambda s: s.name)
        assert [s.name for s in attempts] == ["attempt 1", "attempt 2"]
        assert all(s.parent_span_id == root.span_id for s in attempts)
        assert attempts[0].attributes["http.response.status_code"] == 503
        assert attempts[1].attributes["http.response.status_code"] == 200
        # Each worker got the traceparent of the attempt that reached it, not the client's.
        assert f"00-{trace_id}-{attempts[0].span_id}-01" in bad_seen
        assert f"00-{trace_id}-{attempts[1].span_id}-01" in good_seen
        # The daemon's metrics go to the collector too.
        await until(
            lambda: otlp.metrics_named("flockctl_requests", "flockctl-balancer"),
            "the balancer's request counter over OTLP",
        )


async def test_a_request_without_traceparent_starts_a_trace(daemon, upstream, http):
    seen: list[str] = []
    up = await upstream(recording_worker(200, seen))
    with otlp_receiver() as otlp:
        d = await daemon(endpoints=[up.url], otel_collector_endpoint=otlp.endpoint)
        await d.wait_ready(1)
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
        (record,) = await until(lambda: logged(d.deployment.state_dir), "the log line")
        spans = await until(
            lambda: (
                len(otlp.spans_in(record["trace_id"])) == 2 and otlp.spans_in(record["trace_id"])
            ),
            "the request's spans",
        )
        (root,) = [s for s in spans if s.kind == SPAN_KIND_SERVER]
        assert root.parent_span_id == ""
        assert seen[0].split("-")[1] == record["trace_id"]


async def test_no_endpoint_no_tracing_and_the_clients_traceparent_passes(daemon, upstream, http):
    seen: list[str] = []
    up = await upstream(recording_worker(200, seen))
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    assert d.server.config.app.tracing is None
    client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with http.post(f"{d.url}{CHAT}", json={}, headers={"traceparent": client}) as resp:
        assert resp.status == 200
    assert seen == [client]


@pytest.mark.parametrize("collector", ["closed port", "never answers"])
async def test_a_collector_down_or_stuck_changes_nothing_for_requests(
    collector, daemon, upstream, http
):
    up = await upstream()
    hanging = OtlpReceiver(hang=True).start() if collector == "never answers" else None
    endpoint = hanging.endpoint if hanging else f"http://127.0.0.1:{free_port()}"
    try:
        d = await daemon(endpoints=[up.url], otel_collector_endpoint=endpoint)
        await d.wait_ready(1)
        tracing = d.server.config.app.tracing
        assert tracing is not None
        for _ in range(30):
            async with http.post(f"{d.url}{CHAT}", json={"max_tokens": 2}) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"] == "t0 t1"
        if hanging:
            # The exporter is stuck inside an export the collector never answers ...
            await until(lambda: hanging.requests >= 1, "the exporter to reach the collector")
        else:
            # ... or its exports fail, and the spans they held are counted as dropped.
            await until(lambda: tracing.telemetry.dropped_spans > 0, "spans counted as dropped")
        assert tracing.telemetry.exported_spans == 0
        # Requests went on all the while, and every one of them was logged.
        await until(lambda: len(logged(d.deployment.state_dir)) == 30, "30 log lines")
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
    finally:
        if hanging:
            hanging.close()


def test_the_endpoint_reaches_the_engines_command_line():
    from flockctl.server.config import DeploymentConfig

    cfg = DeploymentConfig(model="demo", otel_collector_endpoint="grpc://collector:4317")
    assert "--otel-collector-endpoint grpc://collector:4317" in (cfg.local_command() or "")
    # The user's own flag in --engine-args wins.
    own = DeploymentConfig(
        model="demo",
        otel_collector_endpoint="http://a:4318",
        engine_args=["--otel-collector-endpoint", "http://b:4318"],
    )
    assert (own.local_command() or "").count("--otel-collector-endpoint") == 1
    assert "http://b:4318" in (own.local_command() or "")
    assert "--otel-collector-endpoint" not in (DeploymentConfig(model="demo").local_command() or "")
    with pytest.raises(ValueError, match="otel_collector_endpoint"):
        DeploymentConfig(otel_collector_endpoint="collector:4318")


async def test_spans_and_metrics_reach_a_grpc_collector(daemon, upstream, http):
    seen: list[str] = []
    up = await upstream(recording_worker(200, seen))
    with GrpcOtlpReceiver() as otlp:
        d = await daemon(endpoints=[up.url], otel_collector_endpoint=otlp.endpoint)
        await d.wait_ready(1)
        trace_id, parent = "a" * 32, "b" * 16
        headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
        async with http.post(f"{d.url}{CHAT}", json={}, headers=headers) as resp:
            assert resp.status == 200
        spans = await until(
            lambda: len(otlp.spans_in(trace_id)) == 2 and otlp.spans_in(trace_id),
            "the request's two spans over OTLP/gRPC",
        )
        (root,) = [s for s in spans if s.kind == SPAN_KIND_SERVER]
        (attempt,) = [s for s in spans if s.kind == SPAN_KIND_CLIENT]
        assert (root.service, root.parent_span_id) == ("flockctl-balancer", parent)
        assert attempt.parent_span_id == root.span_id
        assert seen == [f"00-{trace_id}-{attempt.span_id}-01"]
        await until(
            lambda: otlp.metrics_named("flockctl_requests", "flockctl-balancer"),
            "the balancer's request counter over OTLP/gRPC",
        )


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_engines_job_span_is_a_child_of_the_balancers_attempt(protocol, tiny):
    from cli_driver import flockctl

    from flockctl.state import state_dir

    port = free_port()
    trace_id, parent = "5" * 32, "6" * 16
    receiver = OtlpReceiver() if protocol == "http" else GrpcOtlpReceiver()
    with receiver as otlp:
        up = flockctl(
            "up", "--port", str(port), "--model", str(tiny),
            "--engine-args", "--device cpu --max-batch-size 2",
            "--min-workers", "1", "--max-workers", "1", "--probe-interval", "0.2",
            "--otel-collector-endpoint", otlp.endpoint,
        )  # fmt: skip
        assert up.code == 0, up.err
        try:

            def ready() -> bool:
                snap = flockctl("status", "--json").json()
                return any(w["state"] == "READY" for w in snap["workers"])

            until_sync(ready, "a READY engine worker", 120)
            # ignore_eos: the engine samples (its seed drawn at start), and an end-of-sequence
            # drawn early would end the completion short of 4 tokens
            body = {"model": str(tiny), "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
            headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
            resp = httpx.post(
                f"http://127.0.0.1:{port}/v1/completions", json=body, headers=headers, timeout=60
            )
            assert resp.status_code == 200, resp.text

            def three() -> list[Any]:
                spans = otlp.spans_in(trace_id)
                services = {s.service for s in spans}
                return spans if {"flockctl-balancer", "flockctl-engine"} <= services else []

            spans = until_sync(three, "spans from both services under the client's trace", 60)
            balancer = [s for s in spans if s.service == "flockctl-balancer"]
            (root,) = [s for s in balancer if s.kind == SPAN_KIND_SERVER]
            (attempt,) = [s for s in spans if s.name == "attempt 1"]
            (job,) = [s for s in spans if s.service == "flockctl-engine"]
            assert root.parent_span_id == parent
            assert attempt.parent_span_id == root.span_id
            assert job.parent_span_id == attempt.span_id
            lines = until_sync(
                lambda: logged(state_dir("default")), "the request's line in the request log"
            )
            assert lines[-1]["trace_id"] == trace_id
            assert lines[-1]["completion_tokens"] == 4 == resp.json()["usage"]["completion_tokens"]
        finally:
            flockctl("down", "--timeout", "30")


async def test_job_lookups_and_the_model_list_are_traced(daemon, upstream, http):
    seen: list[str] = []

    async def job(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        return web.json_response({"id": request.match_info["id"]})

    holding = build_app("wa", 4, 0.0, None, model="alpha")
    holding.router.add_get("/jobs/{id}", job)
    alpha = await upstream(holding)
    beta = await upstream(build_app("wb", 4, 0.0, None, model="beta"))
    with otlp_receiver() as otlp:
        d = await daemon(endpoints=[alpha.url, beta.url], otel_collector_endpoint=otlp.endpoint)
        await until(lambda: d.deployment.pool.routes_by_model, "both workers' models known")
        ids = {w.url: w.id for w in d.deployment.pool}
        job_trace, models_trace, parent = "7" * 32, "8" * 32, "9" * 16
        headers = {"traceparent": f"00-{job_trace}-{parent}-01"}
        async with http.get(f"{d.url}/jobs/cmpl-abcdef-7", headers=headers) as resp:
            assert resp.status == 200
        headers = {"traceparent": f"00-{models_trace}-{parent}-01"}
        async with http.get(f"{d.url}/v1/models", headers=headers) as resp:
            assert resp.status == 200
        spans = await until(lambda: otlp.spans_in(job_trace), "the job lookup's spans")
        (root,) = [s for s in spans if s.kind == SPAN_KIND_SERVER]
        assert root.name == "GET /jobs/cmpl-abcdef-7" and root.parent_span_id == parent
        assert root.attributes["http.response.status_code"] == 200
        assert root.attributes["flockctl.worker"] == ids[alpha.url]
        asked = await until(
            lambda: (
                len(otlp.spans_in(job_trace)) == 1 + root.attributes["flockctl.attempts"]
                and [s for s in otlp.spans_in(job_trace) if s.kind == SPAN_KIND_CLIENT]
            ),
            "a span per worker asked",
        )
        assert all(s.parent_span_id == root.span_id for s in asked)
        (found,) = [s for s in asked if s.attributes["flockctl.worker"] == ids[alpha.url]]
        # the holder was sent its attempt's traceparent, not the client's
        assert seen == [f"00-{job_trace}-{found.span_id}-01"]
        (listed,) = await until(lambda: otlp.spans_in(models_trace), "the model list's span")
        assert listed.name == "GET /v1/models" and listed.parent_span_id == parent
        assert listed.attributes["http.response.status_code"] == 200
        assert listed.attributes["flockctl.attempts"] == 0
        records = await until(
            lambda: len(logged(d.deployment.state_dir)) == 2 and logged(d.deployment.state_dir),
            "both requests logged",
        )
        assert {r["trace_id"] for r in records} == {job_trace, models_trace}
