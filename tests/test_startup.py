"""A starting engine says what it is doing: its port answers 503 with the phase, the daemon shows
that phase as the worker's reason, and the demo build reports how far it got."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from conftest import free_socket, until

from flockctl.engine.demo.progress import BuildProgress, Phase
from flockctl.engine.startup import StartupPhase, StartupResponder


def fetch(url: str, data: bytes | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_responder_answers_503_with_the_phase_then_hands_the_socket_over() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    phase = StartupPhase()
    with StartupResponder(sock, phase):
        phase.set("building demo model: target 62%, about 40 s left")
        status, body = fetch(f"http://127.0.0.1:{port}/health")
        assert status == 503
        assert body["status"] == "starting"
        assert body["phase"] == "building demo model: target 62%, about 40 s left"
        assert body["error"]["code"] == 503 and "starting" in body["error"]["message"]
        status, body = fetch(f"http://127.0.0.1:{port}/v1/completions", data=b'{"prompt": "x"}')
        assert status == 503 and body["phase"].startswith("building demo model")
        phase.set("loading weights: demo on cpu")
        assert fetch(f"http://127.0.0.1:{port}/")[1]["phase"] == "loading weights: demo on cpu"

    # The socket still listens after the responder stops: the next server accepts on it.
    accepted: list[socket.socket] = []
    with sock, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        thread = threading.Thread(target=lambda: accepted.append(sock.accept()[0]))
        thread.start()
        thread.join(10)
        assert accepted, "the socket no longer accepts connections after the responder stopped"
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert accepted[0].recv(100).startswith(b"GET / ")
        accepted[0].close()


def test_build_progress_tells_percent_and_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    told: list[str] = []
    plan = [Phase("tokenizer", 2, 0), Phase("target", 10, 3), Phase("draft", 10, 1)]
    ticks = iter(range(1000))  # every reading of the clock is one second later

    def clock() -> float:
        return float(next(ticks))

    with BuildProgress(plan, mode="plain", report=told.append, clock=clock) as bar:
        bar.start("tokenizer")
        bar.advance()
        assert told[-1] == "building demo model: tokenizer 50%"
        bar.start("target")
        bar.advance()
        assert bar.left_seconds() is None  # the first step warms up; no rate yet
        for _ in range(4):
            bar.advance()
        # 5 of 10 target steps, one clock reading (a second) each, the last 4 timed: 12 units
        # in 4 s. Left: 5 more at cost 3 and 10 draft steps at cost 1, 25 units, about 8 s.
        assert bar.left_seconds() == pytest.approx(25 * 4 / 12)
        assert told[-1] == "building demo model: target 50%, about 10 s left"
        for _ in range(5):
            bar.advance()
        bar.start("draft")
        for _ in range(10):
            bar.advance()
        assert bar.left_seconds() == 0
        assert told[-1] == "building demo model: draft 100%"
    err = capsys.readouterr().err
    # Plain lines for a log file: the first and the last of each phase at least, no escapes.
    assert "building demo model: target 100%" in err
    assert "\x1b" not in err and "\r" not in err


async def test_daemon_shows_a_starting_workers_phase_as_its_reason(daemon, upstream) -> None:
    ready = False

    async def health(_request: web.Request) -> web.Response:
        if ready:
            return web.json_response({"status": "ok"})
        phase = {"status": "starting", "phase": "building demo model: target 62%, about 40 s left"}
        return web.json_response(phase, status=503)

    app = web.Application()
    app.router.add_get("/health", health)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url])
    [worker] = list(d.deployment.pool)
    await until(lambda: worker.reason, "the starting worker's reason")
    assert worker.state.value == "STARTING"
    assert worker.reason == "building demo model: target 62%, about 40 s left"
    ready = True
    await until(lambda: worker.state.value == "READY", "READY")
    assert worker.reason is None


async def test_a_worker_that_does_not_answer_yet_says_so(daemon) -> None:
    closed = free_socket()  # bound, never listening: connections are refused
    with closed:
        port = closed.getsockname()[1]
        d = await daemon(endpoints=[f"http://127.0.0.1:{port}"])
        [worker] = list(d.deployment.pool)
        await until(lambda: worker.reason, "the starting worker's reason")
    assert worker.reason == "starting; no answer on /health yet (connection refused)"
