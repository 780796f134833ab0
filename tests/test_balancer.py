"""The balancer on real sockets: relaying, streaming, retries, queueing, keys, disconnects."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from conftest import failing_worker, until

CHAT = "/v1/chat/completions"


async def test_relays_status_headers_and_body_unchanged(daemon, upstream, http):
    up = await upstream(worker_id="u1")
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={"max_tokens": 3}) as resp:
        assert resp.status == 200
        assert resp.headers["x-worker-id"] == "u1"
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "t0 t1 t2"
    async with http.get(f"{d.url}/v1/models?x=1") as resp:
        assert (await resp.json())["data"][0]["id"] == "fake"
    # A status the upstream chose is kept (404 from the worker, not from the balancer).
    async with http.get(f"{d.url}/no/such/path") as resp:
        assert resp.status == 404
        assert await resp.text() == "404: Not Found"  # aiohttp's own page


async def test_streams_sse_bytes_through_as_they_come(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    same = {"stream": True, "fake_created": 1}
    direct = await (await http.post(f"{up.url}{CHAT}", json=same)).read()
    chunks: list[bytes] = []
    payload = {"stream": True, "fake_token_delay": 0.05, "max_tokens": 4}
    async with http.post(f"{d.url}{CHAT}", json=payload) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        first = await resp.content.readuntil(b"\n\n")
        # The first event arrives while the worker is still generating the rest.
        assert d.deployment.pool.in_flight == 1
        chunks.append(first)
        chunks.append(await resp.content.read())
    events = b"".join(chunks).split(b"\n\n")
    assert events[-2] == b"data: [DONE]"
    assert len([e for e in events if e.startswith(b"data: {")]) == 4
    full = await (await http.post(f"{d.url}{CHAT}", json=same)).read()
    assert full == direct  # byte for byte
    assert d.deployment.pool.in_flight == 0


async def test_least_connection_spreads_concurrent_requests(daemon, upstream, http):
    ups = [await upstream(worker_id=f"u{i}") for i in range(2)]
    d = await daemon(endpoints=[u.url for u in ups])
    await d.wait_ready(2)

    async def one() -> str:
        payload = {"fake_token_delay": 0.01, "max_tokens": 5}
        async with http.post(f"{d.url}{CHAT}", json=payload) as resp:
            assert resp.status == 200
            return resp.headers["x-worker-id"]

    served = await asyncio.gather(*(one() for _ in range(20)))
    assert sorted(set(served)) == ["u0", "u1"]
    assert abs(served.count("u0") - served.count("u1")) <= 4


async def test_5xx_before_first_byte_is_retried_on_another_worker(daemon, upstream, http):
    app, hits = failing_worker(503)
    bad = await upstream(app)
    good = await upstream(worker_id="good")
    d = await daemon(endpoints=[bad.url, good.url], policy="round-robin")
    await d.wait_ready(2)
    for _ in range(6):
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
            assert resp.headers["x-worker-id"] == "good"
    assert hits["n"] >= 2
    snap = d.deployment.snapshot()
    assert snap["requests"]["retried"] == hits["n"]
    assert snap["requests"]["failed"] == 0


async def test_last_attempt_5xx_is_passed_through(daemon, upstream, http):
    app, hits = failing_worker(500)
    bad = await upstream(app)
    d = await daemon(endpoints=[bad.url], max_attempts=2)
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["message"] == "boom 500"
    assert hits["n"] == 2


async def test_connect_error_is_retried_and_worker_is_probed(daemon, upstream, http):
    good = await upstream(worker_id="good")
    gone = await upstream(worker_id="gone")
    d = await daemon(endpoints=[gone.url, good.url], policy="round-robin")
    await d.wait_ready(2)
    await gone.runner.cleanup()  # the port now refuses connections
    for _ in range(4):
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
            assert resp.headers["x-worker-id"] == "good"
    # Probes (poked by the connect error) take the dead worker out of rotation.
    dead = next(w for w in d.deployment.pool if w.url == gone.url)
    await until(lambda: dead.state.value == "NOT_READY", "the dead worker NOT_READY")


async def test_nothing_is_retried_after_the_first_byte(daemon, upstream, http):
    app = web.Application()
    hits = {"n": 0}

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({})

    async def cut(request: web.Request) -> web.StreamResponse:
        hits["n"] += 1
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        request.transport.close()  # the worker dies mid-answer
        return resp

    app.router.add_get("/health", health)
    app.router.add_post(CHAT, cut)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={"stream": True}) as resp:
        assert resp.status == 200
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        try:
            await resp.content.read()
            cut_off = False
        except aiohttp.ClientPayloadError:
            cut_off = True
    assert cut_off
    assert hits["n"] == 1
    assert d.deployment.pool.in_flight == 0


async def test_client_disconnect_cancels_the_upstream_request(daemon, upstream, http):
    app = web.Application()
    cancelled = asyncio.Event()

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({})

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(1000):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.02)
        except (asyncio.CancelledError, ConnectionResetError):
            cancelled.set()
            raise
        return resp

    app.router.add_get("/health", health)
    app.router.add_post(CHAT, slow)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    resp = await http.post(f"{d.url}{CHAT}", json={"stream": True})
    await resp.content.readuntil(b"\n\n")
    assert d.deployment.pool.in_flight == 1
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(cancelled.wait(), 5)
    await until(lambda: d.deployment.pool.in_flight == 0, "the request to end")


async def test_no_ready_worker_waits_then_503(daemon, http):
    # A static endpoint where nothing listens never becomes READY.
    d = await daemon(endpoints=["http://127.0.0.1:9"], queue_timeout=0.3)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 503
        err = (await resp.json())["error"]
    assert "no worker could take the request within 0.3s" in err["message"]
    assert err["type"] == "service_unavailable"


async def test_full_queue_gives_429(daemon, http):
    d = await daemon(endpoints=["http://127.0.0.1:9"], queue_timeout=5, max_queue=1)
    waiting = asyncio.create_task(http.post(f"{d.url}{CHAT}", json={}))
    await until(lambda: d.deployment.pool.queued == 1, "a waiting request")
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 429
        assert "too many requests waiting" in (await resp.json())["error"]["message"]
    waiting.cancel()


async def test_queued_request_is_served_once_a_worker_is_ready(daemon, upstream, http, tmp_path):
    marker = tmp_path / "unhealthy"
    marker.touch()
    from fake_worker import build_app

    up = await upstream(build_app("late", 4, 0.0, marker))
    d = await daemon(endpoints=[up.url], queue_timeout=10)
    request = asyncio.create_task(http.post(f"{d.url}{CHAT}", json={}))
    await until(lambda: d.deployment.pool.queued == 1, "a waiting request")
    marker.unlink()  # the worker turns healthy: READY, and the waiter is served
    resp = await asyncio.wait_for(request, 10)
    assert resp.status == 200
    assert resp.headers["x-worker-id"] == "late"
    resp.release()


async def test_worker_capacity_queues_the_excess(daemon, upstream, http):
    # The worker holds every request until the test lets them go, so what waits where is a
    # state to wait for, not a moment to catch.
    release = asyncio.Event()
    at_worker = {"now": 0, "most": 0}

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({})

    async def chat(_r: web.Request) -> web.Response:
        at_worker["now"] += 1
        at_worker["most"] = max(at_worker["most"], at_worker["now"])
        await release.wait()
        at_worker["now"] -= 1
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post(CHAT, chat)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url], worker_capacity=2)
    await d.wait_ready(1)
    pool = d.deployment.pool

    async def one() -> int:
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            return resp.status

    requests = [asyncio.create_task(one()) for _ in range(6)]
    await until(
        lambda: at_worker["now"] == pool.in_flight == 2 and pool.queued == 4,
        "2 requests at the worker and 4 waiting in the balancer",
    )
    release.set()
    assert await asyncio.gather(*requests) == [200] * 6
    assert at_worker["most"] == 2


async def test_api_key_guards_proxied_routes_only(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url], api_key="sk-test")
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 401
        assert resp.headers["www-authenticate"] == "Bearer"
    headers = {"Authorization": "Bearer sk-test"}
    async with http.post(f"{d.url}{CHAT}", json={}, headers=headers) as resp:
        assert resp.status == 200
    async with http.get(f"{d.url}/health") as resp:
        assert resp.status == 200


async def test_admin_api_needs_the_token(daemon, http):
    d = await daemon(endpoints=["http://127.0.0.1:9"])
    for method, path in [
        ("GET", "/-/status"),
        ("POST", "/-/workers"),
        ("DELETE", "/-/workers/w1"),
        ("POST", "/-/shutdown"),
    ]:
        async with http.request(method, f"{d.url}{path}") as resp:
            assert resp.status == 401, path
            assert resp.content_type == "application/json"
            assert "Bearer" in (await resp.json())["error"]["message"]
        bad = {"Authorization": "Bearer wrong"}
        async with http.request(method, f"{d.url}{path}", headers=bad) as resp:
            assert resp.status == 401, path
    assert not d.server.should_exit


async def test_status_snapshot_schema(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        await resp.read()
    async with http.get(f"{d.url}/-/status", headers=d.admin) as resp:
        snap = await resp.json()
    assert snap["schema"] == 4
    assert snap["deployment"]["provisioner"] == "static"
    assert snap["deployment"]["endpoint"] == d.url
    (w,) = snap["workers"]
    assert w["state"] == "READY" and w["url"] == up.url and w["served"] == 1
    assert w["latency_p50_ms"] > 0
    assert w["pid"] is None
    assert snap["requests"]["total"] == 1
    auto = snap["autoscaler"]
    assert auto["policy"] == "fixed" and auto["target"] == 1
    assert auto["last_decision"]["reason"]


async def test_admin_add_and_remove_static_worker(daemon, upstream, http):
    a, b = await upstream(worker_id="a"), await upstream(worker_id="b")
    d = await daemon(endpoints=[a.url])
    await d.wait_ready(1)
    async with http.post(f"{d.url}/-/workers", headers=d.admin, json={"url": "ftp://x"}) as r:
        assert r.status == 422
    async with http.post(f"{d.url}/-/workers", headers=d.admin, json={"url": b.url}) as r:
        assert r.status == 201
        added = await r.json()
    await d.wait_ready(2)
    async with http.delete(f"{d.url}/-/workers/nope", headers=d.admin) as r:
        assert r.status == 404
        assert "nope" in (await r.json())["error"]["message"]
    async with http.delete(f"{d.url}/-/workers/{added['id']}", headers=d.admin) as r:
        assert r.status == 202
    await until(lambda: d.states()[added["id"]] == "TERMINATED", "the removed worker's end")
    for _ in range(4):
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.headers["x-worker-id"] == "a"


async def test_metrics_exposes_requests_workers_and_qlrm(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        await resp.read()
    async with http.get(f"{d.url}/metrics") as resp:
        text = await resp.text()
    assert 'flockctl_requests_total{code="200"} 1.0' in text
    assert "flockctl_request_latency_seconds_bucket" in text
    assert 'flockctl_workers{state="READY"} 1.0' in text
    assert "flockctl_requests_in_flight 0.0" in text
    assert "flockctl_retries_total 0.0" in text


async def test_shutdown_endpoint_stops_the_server(daemon, http):
    d = await daemon(endpoints=["http://127.0.0.1:9"])
    async with http.post(f"{d.url}/-/shutdown", headers=d.admin) as resp:
        assert resp.status == 202
        assert json.loads(await resp.text())["status"] == "shutting down"
    await asyncio.wait_for(d.task, 10)


async def test_api_key_guards_the_routes_the_balancer_answers_itself(daemon, upstream, http):
    """With an API key, ``/jobs/{id}`` needs it or the admin token (the dashboard's), and the
    worker asked never sees either credential."""
    seen: list[str | None] = []

    async def job(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"id": request.match_info["job_id"]})

    from fake_worker import build_app

    app = build_app("u", 16, 0.0, None)
    app.router.add_get("/jobs/{job_id}", job)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url], api_key="sk-test")
    await d.wait_ready(1)
    async with http.get(f"{d.url}/jobs/abc123xyz") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"
    assert seen == []
    for auth in ({"Authorization": "Bearer sk-test"}, d.admin):
        async with http.get(f"{d.url}/jobs/abc123xyz", headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["id"] == "abc123xyz"
    assert seen == [None, None]
