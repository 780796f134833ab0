"""Faults at the balancer: hung and stopped workers, stalled streams, poison requests, and the
retry budget that keeps retries from multiplying the load on failing workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from conftest import failing_worker, fake_worker_command, until
from fake_worker import build_app
from typer.testing import CliRunner

from flockctl.cli import app as cli_app
from flockctl.server.proxy import Balancer
from flockctl.server.retry_budget import RetryBudget
from flockctl.server.workers import Worker, WorkerState

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HEALTH_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: "
SSE_HEAD = CHUNKED + b"text/event-stream\r\n\r\n"
JSON_HEAD = CHUNKED + b"application/json\r\n\r\n"


def balancer_of(d) -> Balancer:
    app = d.server.config.app
    assert isinstance(app, Balancer)
    return app


def worker_at(d, url: str) -> Worker:
    (worker,) = [w for w in d.deployment.pool if w.url == url]
    return worker


def out_of_rotation(d) -> list[str | None]:
    """The reasons of every move to NOT_READY from now on (a worker the prober brings straight
    back would be missed by polling its state)."""
    reasons: list[str | None] = []

    def seen(worker: Worker, _old: WorkerState) -> None:
        if worker.state == WorkerState.NOT_READY:
            reasons.append(worker.reason)

    d.deployment.pool.on_transition(seen)
    return reasons


# -- the retry budget, on its own clock -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_allows_a_share_of_the_requests_of_its_window():
    clock = Clock()
    budget = RetryBudget(percent=0.2, window=10, min_per_second=0, clock=clock)
    for _ in range(50):
        budget.request()
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]
    # Requests later in the window make room for more retries.
    clock.now += 5
    for _ in range(5):
        budget.request()
    assert budget.try_retry() is True
    assert budget.try_retry() is False
    # Once the first requests leave the window, their share goes with them: 5 requests and one
    # retry are left in it, and 5 requests allow one retry.
    clock.now += 5
    assert budget.try_retry() is False
    assert (budget.requests, budget.retries) == (5, 1)
    clock.now += 10
    assert budget.try_retry() is False  # no requests, no floor: no retries
    assert (budget.requests, budget.retries) == (0, 0)


def test_retry_budget_floor_keeps_retries_possible_when_requests_are_few():
    clock = Clock()
    budget = RetryBudget(percent=0.2, window=10, min_per_second=3, clock=clock)
    budget.request()
    # 20% of one request is nothing, but 3 a second over 10 s is 30 retries.
    assert [budget.try_retry() for _ in range(31)] == [True] * 30 + [False]
    clock.now += 9.5  # still the same window: nothing left
    assert budget.try_retry() is False
    clock.now += 1  # the second that held them is gone
    assert budget.try_retry() is True
    # Under load the share rules: 500 requests allow 100 retries in the window.
    for _ in range(500):
        budget.request()
    allowed = 0
    while budget.try_retry():
        allowed += 1
    assert allowed + 1 == 100  # one retry was already counted in this window
    assert "20% of the requests of the last 10s, or 3 a second" in budget.describe()


def test_retry_budget_forgets_everything_after_a_long_pause():
    clock = Clock()
    budget = RetryBudget(percent=0.2, window=10, min_per_second=0, clock=clock)
    for _ in range(10):
        budget.request()
    assert budget.try_retry() and budget.try_retry() and not budget.try_retry()
    clock.now += 3600
    budget.request()
    assert (budget.requests, budget.retries) == (1, 0)


def test_retry_budget_refuses_nonsense():
    with pytest.raises(ValueError, match="window must be at least 1 second"):
        RetryBudget(window=0)
    with pytest.raises(ValueError, match="percent must be 0 or more"):
        RetryBudget(percent=-0.1)


# -- workers that misbehave ----------------------------------------------------------------------


@dataclass
class Stop:
    """A worker's switch: once ``stopped``, it takes requests and never answers (what a stopped
    process looks like from outside), its health checks included, until ``release`` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False
    #: Inference requests that arrived while stopped.
    hits: int = 0


def stoppable(worker_id: str) -> tuple[web.Application, Stop]:
    stop = Stop()

    @web.middleware
    async def freeze(request: web.Request, handler):
        if stop.stopped:
            if request.method == "POST":
                stop.hits += 1
            await stop.release.wait()
        return await handler(request)

    app = build_app(worker_id, 4, 0.0, None)
    app.middlewares.append(freeze)
    return app, stop


RawWorker = Callable[[bytes], Awaitable[tuple[str, asyncio.Event]]]


@pytest.fixture
async def raw_worker() -> AsyncIterator[RawWorker]:
    """A TCP worker that passes its health checks and answers any other request with the bytes
    given, then sends nothing more; the event is set when the balancer closes the connection."""
    servers: list[asyncio.AbstractServer] = []

    async def start(answer: bytes) -> tuple[str, asyncio.Event]:
        closed = asyncio.Event()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /health "):
                    writer.write(HEALTH_OK)
                    return
                writer.write(answer)
                await reader.read()  # the request's body, then the end of the connection
                closed.set()
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", closed

    yield start
    for server in servers:
        server.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- a worker that stops answering ---------------------------------------------------------------


async def test_a_hung_worker_is_retried_around_and_leaves_the_rotation_at_once(
    daemon, upstream, http
):
    hung_app, stop = stoppable("hung")
    hung = await upstream(hung_app)
    good = await upstream(worker_id="good")
    # Probes that wait long: only the balancer's own timeout can find the hung worker here.
    d = await daemon(
        endpoints=[hung.url, good.url],
        policy="round-robin",
        upstream_timeout=0.5,
        probe={"interval_seconds": 0.05, "timeout_seconds": 60},
    )
    await d.wait_ready(2)
    assert d.deployment.snapshot()["deployment"]["upstream_timeout"] == 0.5
    stop.stopped = True
    try:
        for _ in range(6):
            async with http.post(f"{d.url}{COMPLETIONS}", json={"max_tokens": 2}) as resp:
                assert resp.status == 200
                assert resp.headers["x-worker-id"] == "good"
                assert (await resp.json())["choices"][0]["text"] == "t0 t1"
        # Round robin sent it one of the first two requests; after that it was out of rotation.
        assert stop.hits == 1
        worker = worker_at(d, hung.url)
        assert worker.state == WorkerState.NOT_READY
        assert worker.reason == (
            "no byte from the worker within 0.5s (upstream timeout) on POST /v1/completions"
        )
        assert d.deployment.snapshot()["requests"]["retried"] == 1
    finally:
        stop.release.set()
    # It answers again: the prober brings it back.
    await until(lambda: worker.state == WorkerState.READY, "the worker back in rotation")


async def test_requests_running_on_a_worker_go_on_when_it_leaves_the_rotation(
    daemon, upstream, http
):
    app = web.Application()
    go_on, release = asyncio.Event(), asyncio.Event()

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def complete(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("hang"):
            await release.wait()
            return web.json_response({})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        while not go_on.is_set():  # bytes keep coming, well within the upstream timeout
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(go_on.wait(), 0.05)
            await resp.write(b": working\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app.router.add_get("/health", health)
    app.router.add_post(CHAT, complete)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url], upstream_timeout=1, max_attempts=1)
    await d.wait_ready(1)
    marked = out_of_rotation(d)
    try:
        stream = await http.post(f"{d.url}{CHAT}", json={"stream": True})
        assert await stream.content.readuntil(b"\n\n") == b"data: 1\n\n"
        async with http.post(f"{d.url}{CHAT}", json={"hang": True}) as resp:
            assert resp.status == 504
            err = (await resp.json())["error"]
        assert "no byte from the worker within 1s (upstream timeout)" in err["message"]
        assert marked == [
            "no byte from the worker within 1s (upstream timeout) on POST /v1/chat/completions"
        ]
        go_on.set()
        rest = await stream.content.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        stream.release()
    finally:
        release.set()


async def test_a_stream_that_stalls_ends_with_an_error_event(daemon, raw_worker, http):
    url, closed = await raw_worker(SSE_HEAD + chunk(b'data: {"n": 1}\n\n'))
    d = await daemon(endpoints=[url], upstream_timeout=0.5)
    await d.wait_ready(1)
    marked = out_of_rotation(d)
    async with http.post(f"{d.url}{CHAT}", json={"stream": True}) as resp:
        assert resp.status == 200
        body = await resp.read()  # the stream ends: no client timeout needed
    first, error, rest = body.split(b"\n\n")
    assert first == b'data: {"n": 1}'
    assert rest == b""
    kind, data = error.split(b"\n")
    assert kind == b"event: error"
    message = json.loads(data.removeprefix(b"data: "))["error"]["message"]
    assert message == (
        "the worker stopped answering: no byte from the worker within 0.5s (upstream timeout)"
    )
    await asyncio.wait_for(closed.wait(), 30)  # the upstream connection is closed, not kept
    # Out of rotation at once (and back after its next probe, which it passes).
    assert marked == [
        "no byte from the worker within 0.5s (upstream timeout) on POST /v1/chat/completions"
    ]


async def test_an_event_cut_in_the_middle_is_ended_before_the_error_event(daemon, raw_worker, http):
    url, _closed = await raw_worker(SSE_HEAD + chunk(b'data: {"n": 1}\n\ndata: {"n"'))
    d = await daemon(endpoints=[url], upstream_timeout=0.5)
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={"stream": True}) as resp:
        body = await resp.read()
    events = body.split(b"\n\n")
    assert events[:2] == [b'data: {"n": 1}', b'data: {"n"']
    assert events[2].startswith(b"event: error\ndata: {")
    assert events[3:] == [b""]


async def test_a_plain_answer_that_stalls_is_cut_short(daemon, raw_worker, http):
    url, closed = await raw_worker(JSON_HEAD + chunk(b'{"choices": ['))
    d = await daemon(endpoints=[url], upstream_timeout=0.5)
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 200
        # The body never ends cleanly, so the client cannot take half an answer for a whole one.
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await asyncio.wait_for(closed.wait(), 30)


# -- retries -------------------------------------------------------------------------------------


async def test_a_poison_request_reaches_two_workers_at_most(daemon, upstream, http):
    workers = [failing_worker(500) for _ in range(3)]
    ups = [await upstream(app) for app, _ in workers]
    d = await daemon(endpoints=[u.url for u in ups], max_attempts=3)
    await d.wait_ready(3)
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["message"] == "boom 500"  # the second 500, as is
    hits = [h["n"] for _, h in workers]
    assert sorted(hits) == [0, 1, 1]
    snap = d.deployment.snapshot()
    assert snap["requests"]["retried"] == 1
    # A 500 is the request's doing as much as the worker's: nobody leaves the rotation.
    assert snap["ready_workers"] == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_an_unavailable_worker_is_retried_around(daemon, upstream, http, status):
    bad_app, hits = failing_worker(status)
    bad = await upstream(bad_app)
    good = await upstream(worker_id="good")
    d = await daemon(endpoints=[bad.url, good.url])
    await d.wait_ready(2)
    # Least connection prefers the worker that served fewer: the failing one, after the first.
    for _ in range(3):
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
            assert resp.headers["x-worker-id"] == "good"
    assert hits["n"] >= 2
    assert d.deployment.snapshot()["requests"]["retried"] == hits["n"]


async def test_a_spent_retry_budget_relays_the_failure_and_counts_it(daemon, upstream, http):
    bad_app, hits = failing_worker(503)
    bad = await upstream(bad_app)
    good = await upstream(worker_id="good")
    d = await daemon(endpoints=[bad.url, good.url])
    await d.wait_ready(2)
    # A budget with no floor and a clock that stands still: one request allows no retry.
    balancer_of(d).retry_budget = RetryBudget(min_per_second=0, clock=lambda: 0.0)
    # Least connection prefers the worker that served fewer: the failing one, by the second.
    for _ in range(2):
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            answer = (resp.status, await resp.json())
        if hits["n"]:
            break
    assert hits["n"] == 1
    assert answer == (503, {"error": {"message": "boom 503"}})  # the worker's own, not retried
    async with http.get(f"{d.url}/metrics") as resp:
        text = await resp.text()
    assert "flockctl_retries_refused_total 1.0" in text
    assert "flockctl_retries_total 0.0" in text


async def test_a_refused_connection_without_budget_is_a_502_that_says_why(daemon, upstream, http):
    gone = await upstream(worker_id="gone")
    d = await daemon(endpoints=[gone.url], probe={"interval_seconds": 0.05, "timeout_seconds": 60})
    await d.wait_ready(1)
    balancer_of(d).retry_budget = RetryBudget(min_per_second=0, clock=lambda: 0.0)
    await gone.runner.cleanup()  # the port now refuses connections
    async with http.post(f"{d.url}{CHAT}", json={}) as resp:
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
    worker = worker_at(d, gone.url)
    assert message.startswith(f"worker {worker.id} failed: cannot connect to {gone.url}")
    assert message.endswith(
        "not retried: the retry budget is spent (retries are at most 20% of the requests of the"
        " last 10s, or 0 a second)"
    )
    assert worker.state == WorkerState.NOT_READY
    assert worker.reason is not None and worker.reason.endswith(f"on POST {CHAT}")


def test_upstream_timeout_flag_reaches_the_plan():
    def up(*args: str):
        base = ["up", "--endpoint", "http://127.0.0.1:9", "--dry-run", "--json"]
        return CliRunner().invoke(cli_app, [*base, *args])

    result = up("--upstream-timeout", "7.5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["balancer"]["upstream_timeout"] == 7.5
    bad = up("--upstream-timeout", "0")
    assert bad.exit_code == 2
    assert "--upstream-timeout" in bad.output


# -- a real worker process, stopped --------------------------------------------------------------


@pytest.mark.e2e
async def test_a_stopped_worker_process_costs_no_request(daemon, http):
    d = await daemon(
        worker_command=fake_worker_command(),
        autoscaler="fixed",
        replicas=2,
        max_workers=2,
        upstream_timeout=1,
        probe={"interval_seconds": 0.05, "timeout_seconds": 60},
    )
    await d.wait_ready(2, timeout=60)
    stopped = d.deployment.pool.get("w1")
    assert stopped is not None and stopped.pid is not None
    os.kill(stopped.pid, signal.SIGSTOP)
    try:

        async def one(i: int) -> int:
            payload = {"max_tokens": 3, "prompt": f"request {i}"}
            async with http.post(f"{d.url}{COMPLETIONS}", json=payload) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(20)))
        assert statuses == [200] * 20
        assert stopped.state == WorkerState.NOT_READY
        assert "(upstream timeout) on POST /v1/completions" in (stopped.reason or "")
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    await until(lambda: stopped.state == WorkerState.READY, "the worker back in rotation")
