"""The request log: a line per request with its attempts, tokens and ids, rotation, drops when the
writer is stuck, front-door refusals, and ``flockctl logs requests`` reading it back."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from conftest import failing_worker, until
from fake_worker import build_app
from typer.testing import CliRunner

from flockctl.cli import app as cli
from flockctl.server.request_log import RequestLog, RequestRecord, usage_of
from flockctl.state import REQUEST_LOG, state_dir

CHAT = "/v1/chat/completions"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def lines(directory: Path) -> list[dict[str, Any]]:
    path = directory / REQUEST_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def logged(directory: Path, n: int) -> list[dict[str, Any]]:
    """The log's lines once it holds at least ``n`` (the writer thread flushes on its own)."""
    await until(lambda: len(lines(directory)) >= n, f"{n} request log lines")
    return lines(directory)


async def test_a_retried_request_shows_both_attempts(daemon, upstream, http):
    app, hits = failing_worker(503)
    bad = await upstream(app)
    good = await upstream(worker_id="good")
    d = await daemon(endpoints=[bad.url, good.url], policy="round-robin")
    await d.wait_ready(2)
    ids = {w.url: w.id for w in d.deployment.pool}
    headers = {
        "x-request-id": "req-42",
        "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    }
    # Round robin sends one of the first two requests to the failing worker first.
    for _ in range(2):
        async with http.post(f"{d.url}{CHAT}", json={"max_tokens": 3}, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
    assert hits["n"] >= 1
    records = await logged(d.deployment.state_dir, 2)
    retried = next(r for r in records if len(r["attempts"]) == 2)
    first, second = retried["attempts"]
    assert first["worker"] == ids[bad.url] and first["status"] == 503
    assert second["worker"] == ids[good.url] and second["status"] == 200
    assert retried["worker"] == ids[good.url]
    assert retried["status"] == 200
    assert retried["request_id"] == "req-42"
    assert retried["trace_id"] == TRACE_ID  # the client's, even with no tracing set up
    assert (retried["method"], retried["path"], retried["client"]) == ("POST", CHAT, "127.0.0.1")
    assert retried["bytes_in"] == len(b'{"max_tokens": 3}')
    assert retried["bytes_out"] > 0
    assert retried["prompt_tokens"] == 1 and retried["completion_tokens"] == 3
    assert retried["queue_ms"] >= 0 and retried["ttfb_ms"] <= retried["latency_ms"]
    assert retried["time"].endswith("Z")


def streaming_worker(usage: bool) -> web.Application:
    """An OpenAI stream whose last event carries ``usage`` (as with include_usage)."""

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(40):  # far more than the tail the log keeps
            event = {"choices": [{"delta": {"content": f"t{i} " * 20}}], "usage": None}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        if usage:
            last = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 40}}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post(CHAT, chat)
    return app


async def test_a_stream_logs_the_usage_of_its_last_event_and_the_user(daemon, upstream, http):
    up = await upstream(streaming_worker(usage=True))
    # The prefix policy parses bodies anyway: the body's user is logged then.
    d = await daemon(endpoints=[up.url], policy="prefix")
    await d.wait_ready(1)
    body = {"stream": True, "stream_options": {"include_usage": True}, "user": "ada"}
    async with http.post(f"{d.url}{CHAT}", json={**body, "model": "m"}) as resp:
        streamed = await resp.read()
    (record,) = await logged(d.deployment.state_dir, 1)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (7, 40)
    assert record["user"] == "ada" and record["model"] == "m"
    assert record["bytes_out"] == len(streamed)


async def test_no_usage_no_tokens_and_the_user_read_without_parsing(daemon, upstream, http):
    up = await upstream(streaming_worker(usage=False))
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    # least-connection never parses the body: the user is read from its bytes by the log's writer,
    # and a "user" that is a role or inside a message's text is not taken for it
    messages = [{"role": "user", "content": 'say "user": "mallory"'}]
    for body in ({"stream": True, "messages": messages, "user": "ada"}, {"messages": messages}):
        async with http.post(f"{d.url}{CHAT}", json=body) as resp:
            await resp.read()
    first, second = await logged(d.deployment.state_dir, 2)
    assert first["prompt_tokens"] is None and first["completion_tokens"] is None
    assert first["user"] == "ada"
    assert second["user"] is None


async def test_front_door_refusals_are_counted_and_logged(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url], max_body_size="1K")
    await d.wait_ready(1)
    async with http.post(f"{d.url}{CHAT}", data=b"x" * 4096) as resp:
        assert resp.status == 413
    (record,) = await logged(d.deployment.state_dir, 1)
    assert (record["status"], record["method"], record["path"]) == (413, "POST", CHAT)
    assert record["attempts"] == [] and record["worker"] is None
    async with http.get(f"{d.url}/metrics") as resp:
        text = await resp.text()
    assert 'flockctl_refused_total{code="413"} 1.0' in text


async def test_a_stuck_writer_drops_and_counts_and_never_holds_a_request(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    request_log = d.server.config.app.request_log
    request_log.max_pending = 5
    # A FIFO nobody reads: the writer blocks opening it, as on a hung disk.
    fifo = d.deployment.state_dir / REQUEST_LOG
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    for _ in range(30):
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
    assert request_log.pending == 5
    # The writer took one batch (at most the 5 queued) before it blocked; the rest dropped.
    assert request_log.dropped >= 30 - 5 - 5
    async with http.get(f"{d.url}/metrics") as resp:
        text = await resp.text()
    assert f"flockctl_request_log_dropped_total {float(request_log.dropped)}" in text
    # Someone reads the FIFO: the writer wakes and writes what waited.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await until(lambda: request_log.written >= 5, "the writer to write again")
    finally:
        os.close(reader)


def record(status: int, n: int) -> RequestRecord:
    rec = RequestRecord("POST", CHAT, "127.0.0.1", time.perf_counter())
    rec.status = status
    rec.request_id = f"r{n}"
    return rec


def test_the_log_rotates_and_keeps_its_last_files(tmp_path):
    path = tmp_path / REQUEST_LOG
    log = RequestLog(path, max_bytes=2000, keep=3)
    for n in range(60):
        log.add(record(200, n))
    log.flush()
    log.close()
    files = [path, path.with_name(f"{REQUEST_LOG}.1"), path.with_name(f"{REQUEST_LOG}.2")]
    assert all(f.is_file() for f in files)
    assert not path.with_name(f"{REQUEST_LOG}.3").exists()
    assert all(f.stat().st_size <= 2000 for f in files)
    ids = [json.loads(line)["request_id"] for f in reversed(files) for line in f.open()]
    # The newest lines survive, in order; the oldest went with the dropped file.
    assert ids == [f"r{n}" for n in range(60 - len(ids), 60)]
    assert len(ids) < 60
    assert log.written == 60 and log.dropped == 0


def test_usage_is_read_from_the_last_usage_object():
    tail = (
        b'data: {"usage": null}\n\ndata: {"usage": {"prompt_tokens": 3,'
        b' "completion_tokens": 9, "total_tokens": 12}}\n\ndata: [DONE]\n\n'
    )
    assert usage_of(tail) == (3, 9)
    assert usage_of(b'{"choices": []}') == (None, None)
    assert usage_of(b'{"usage": {"prompt_tokens": 4}}') == (4, None)


def write_log(directory: Path) -> None:
    """A rotated file and a live one, oldest first: five requests in all."""
    directory.mkdir(parents=True)
    rows = [
        {"time": "2027-01-01T00:00:00.000Z", "request_id": "a", "status": 200, "latency_ms": 12},
        {"time": "2027-01-01T00:00:01.000Z", "request_id": "b", "status": 503, "latency_ms": 900},
        {"time": "2027-01-01T00:00:02.000Z", "request_id": "c", "status": 200, "latency_ms": 450},
        {"time": "2027-01-01T00:00:03.000Z", "request_id": "d", "status": 429, "latency_ms": 1},
        {"time": "2027-01-01T00:00:04.000Z", "request_id": "e", "status": 502, "latency_ms": 30},
    ]
    for row in rows:
        row.update(method="POST", path=CHAT, worker="w1", attempts=[], ttfb_ms=1, queue_ms=0)
    text = [json.dumps(r) + "\n" for r in rows]
    (directory / f"{REQUEST_LOG}.1").write_text("".join(text[:3]))
    (directory / REQUEST_LOG).write_text("".join(text[3:]))


def ids_of(args: list[str]) -> list[str]:
    result = CliRunner().invoke(cli, ["logs", "requests", "--json", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line)["request_id"] for line in result.stdout.splitlines()]


def test_logs_requests_reads_rotated_files_in_order_and_filters():
    write_log(state_dir("default"))
    assert ids_of([]) == ["a", "b", "c", "d", "e"]
    assert ids_of(["--tail", "4"]) == ["b", "c", "d", "e"]  # across the rotated file
    assert ids_of(["--status", "5xx"]) == ["b", "e"]
    assert ids_of(["--status", "429"]) == ["d"]
    assert ids_of(["--status", "5xx", "--status", "429"]) == ["b", "d", "e"]
    assert ids_of(["--slow", "400"]) == ["b", "c"]
    assert ids_of(["--status", "5xx", "--tail", "1"]) == ["e"]  # the last matching ones


def test_logs_requests_table_and_errors():
    runner = CliRunner()
    missing = runner.invoke(cli, ["logs", "requests"])
    assert missing.exit_code == 3 and "no deployment" in missing.output
    write_log(state_dir("default"))
    table = runner.invoke(cli, ["logs", "requests"], env={"COLUMNS": "160"})
    assert table.exit_code == 0
    assert "503" in table.stdout and "w1" in table.stdout and CHAT in table.stdout
    bad = runner.invoke(cli, ["logs", "requests", "--status", "6xx"])
    assert bad.exit_code == 2 and "--status" in bad.output
    wrong = runner.invoke(cli, ["logs", "daemon", "--slow", "5"])
    assert wrong.exit_code == 2 and "requests" in wrong.output


async def test_the_log_keeps_up_with_concurrent_requests(daemon, upstream):
    up = await upstream()
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)
    async with aiohttp.ClientSession() as session:

        async def one(n: int) -> int:
            headers = {"x-request-id": f"c{n}"}
            async with session.post(f"{d.url}{CHAT}", json={}, headers=headers) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(one(n) for n in range(50))) == [200] * 50
    records = await logged(d.deployment.state_dir, 50)
    assert sorted(r["request_id"] for r in records) == sorted(f"c{n}" for n in range(50))


def job_worker(seen: list[str]) -> web.Application:
    """The fake worker, holding every job it is asked for (keeping each ask's traceparent)."""

    async def job(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        return web.json_response({"id": request.match_info["id"], "state": "finished"})

    app = build_app("holder", 4, 0.0, None)
    app.router.add_get("/jobs/{id}", job)
    return app


async def test_a_job_lookup_is_logged_with_every_worker_asked(daemon, upstream, http):
    other = await upstream()  # holds no job: answers 404 for every one
    holding = await upstream(job_worker([]))
    d = await daemon(endpoints=[other.url, holding.url])
    await d.wait_ready(2)
    ids = {w.url: w.id for w in d.deployment.pool}
    # neither worker reports an instance token (not flockctl's engine): both may hold the job
    async with http.get(f"{d.url}/jobs/cmpl-abcdef-7", headers={"x-request-id": "j-1"}) as resp:
        assert resp.status == 200
        answer = await resp.read()
    (found,) = await logged(d.deployment.state_dir, 1)
    assert (found["method"], found["path"], found["status"]) == ("GET", "/jobs/cmpl-abcdef-7", 200)
    assert found["request_id"] == "j-1"
    assert found["worker"] == ids[holding.url]
    asked = {a["worker"]: a["status"] for a in found["attempts"]}
    assert asked[ids[holding.url]] == 200
    assert asked.get(ids[other.url], 404) == 404  # asked first, or never (the holder was first)
    assert found["bytes_out"] == len(answer)
    assert 0 <= found["ttfb_ms"] <= found["latency_ms"]


async def test_a_job_no_worker_holds_is_logged_as_the_balancers_404(daemon, upstream, http):
    first, second = await upstream(), await upstream()
    d = await daemon(endpoints=[first.url, second.url])
    await d.wait_ready(2)
    async with http.get(f"{d.url}/jobs/cmpl-zzzzzz-1") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "job_not_found"
    (missing,) = await logged(d.deployment.state_dir, 1)
    assert missing["status"] == 404 and missing["worker"] is None
    assert sorted(a["worker"] for a in missing["attempts"]) == sorted(
        w.id for w in d.deployment.pool
    )
    assert {a["status"] for a in missing["attempts"]} == {404}


async def test_the_balancers_own_model_list_is_logged(daemon, upstream, http):
    alpha = await upstream(build_app("wa", 4, 0.0, None, model="alpha"))
    beta = await upstream(build_app("wb", 4, 0.0, None, model="beta"))
    d = await daemon(endpoints=[alpha.url, beta.url])
    await until(lambda: d.deployment.pool.routes_by_model, "both workers' models known")
    async with http.get(f"{d.url}/v1/models") as resp:
        assert resp.status == 200
        listed = await resp.read()
    assert [m["id"] for m in json.loads(listed)["data"]] == ["alpha", "beta"]
    (record,) = await logged(d.deployment.state_dir, 1)
    assert (record["method"], record["path"], record["status"]) == ("GET", "/v1/models", 200)
    assert record["worker"] is None and record["attempts"] == []
    assert record["bytes_out"] == len(listed)


def test_a_write_error_loses_those_lines_and_the_writer_goes_on(tmp_path):
    fifo = tmp_path / REQUEST_LOG
    os.mkfifo(fifo)
    request_log = RequestLog(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    request_log.add(record(200, 1))
    request_log.flush()
    assert json.loads(os.read(reader, 65536))["status"] == 200
    # The reader goes away: the next write fails (a broken pipe, as a full or failed disk would).
    os.close(reader)
    request_log.add(record(500, 2))
    request_log.flush()  # never raises: that would end the writer thread and the log with it
    assert (request_log.failed, request_log.written) == (1, 2)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        request_log.add(record(503, 3))
        request_log.flush()
        assert json.loads(os.read(reader, 65536))["status"] == 503
        assert (request_log.failed, request_log.written) == (1, 3)
    finally:
        os.close(reader)
        request_log.close()
