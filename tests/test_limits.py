"""Limits at the daemon's front door, on real sockets: body and head sizes, request deadlines,
the connection cap and the open-file limit (the rules are in flockctl.server.limits)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from conftest import TOKEN, free_port, until

from flockctl.server import limits
from flockctl.server.config import ConfigError, DeploymentConfig
from flockctl.server.limits import connection_cap, descriptor_reserve, parse_size
from flockctl.server.spec_file import resolve
from flockctl.state import DaemonRecord, state_dir

CHAT = "/v1/chat/completions"
#: A guard against a daemon that never answers or never closes (a failure, not a wait).
STUCK = 30.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, headers, body)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the daemon sends until it closes the connection (maybe nothing)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def answer_then_close(reader: asyncio.StreamReader) -> Answer:
    """Everything the daemon sends until it closes the connection, as one answer."""
    data = await asyncio.wait_for(read_until_closed(reader), STUCK)
    assert data, "the daemon closed the connection without an answer"
    return parse_answer(data)


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def post_head(extra: str = "", path: str = CHAT) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


# Pure rules


def test_sizes_take_byte_counts_and_binary_suffixes():
    assert parse_size("1048576") == 1 << 20
    assert parse_size("32M") == 32 << 20
    assert parse_size("512k") == 512 << 10
    assert parse_size("1G") == 1 << 30
    assert parse_size(4096) == 4096
    for bad in ("1X", "-1", "1.5M", "", "M", "0", "32 MB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_a_spec_or_the_resolved_config_takes_sizes_alike(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("flockctl:\n  max_body_size: 64M\n  endpoints: [http://127.0.0.1:9]\n")
    cfg = resolve(spec)
    assert cfg.max_body_size == 64 << 20
    # The daemon reads back the resolved config that `up` wrote.
    assert DeploymentConfig.model_validate(cfg.model_dump(mode="json")).max_body_size == 64 << 20
    spec.write_text("flockctl:\n  max_body_size: lots\n  endpoints: [http://127.0.0.1:9]\n")
    with pytest.raises(
        ConfigError, match=r"spec.yaml: flockctl.max_body_size: 'lots' is not a size"
    ):
        resolve(spec)


def test_connection_cap_keeps_descriptors_for_probes_and_upstreams():
    cfg = DeploymentConfig(endpoints=["http://127.0.0.1:9", "http://127.0.0.1:10"])
    reserve = descriptor_reserve(cfg)
    # Two workers each with 30 request slots (their capacity is theirs to say) need their
    # upstream connections and probes.
    assert cfg.worker_capacity is None
    assert reserve > 2 * limits.AUTO_CAPACITY_SLOTS
    assert connection_cap(10_000, 1024, reserve) == 1024 - reserve
    assert connection_cap(500, 1 << 20, reserve) == 500
    assert connection_cap(10_000, resource.RLIM_INFINITY, reserve) == 10_000
    # A limit smaller than the reserve still leaves a few connections to reach the daemon.
    assert connection_cap(10_000, 100, reserve) == limits.MIN_CLIENT_CONNECTIONS
    big = DeploymentConfig(endpoints=["http://127.0.0.1:9"], max_workers=10)
    assert descriptor_reserve(big) > reserve


@pytest.mark.e2e
def test_bad_max_body_size_is_a_usage_error_naming_the_flag(tmp_path):
    def up(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flockctl", "up", "--endpoint", "http://127.0.0.1:9"]
        return subprocess.run(
            [*command, *args, "--dry-run", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    bad = up("--max-body-size", "1X")
    assert bad.returncode == 2
    assert bad.stderr.startswith("flockctl: --max-body-size: '1X' is not a size")
    good = up("--max-body-size", "64K", "--header-timeout", "5", "--max-connections", "100")
    assert good.returncode == 0, good.stderr
    balancer = json.loads(good.stdout)["balancer"]
    assert balancer["max_body_size"] == 65536
    assert balancer["header_timeout"] == 5
    assert balancer["max_connections"] == 100


# The daemon's front door (the real app under uvicorn, with the daemon's protocol class)


async def test_content_length_over_the_limit_is_refused_before_the_body(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url], max_body_size=1024)
    await d.wait_ready(1)
    reader, writer = await connect(d.url)
    writer.write(post_head("Content-Length: 1025\r\n"))  # the head only: the body never comes
    answer = await answer_then_close(reader)
    writer.close()
    assert answer.status == 413
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "application/json"
    error = answer.error()
    assert error["code"] == 413 and error["type"] == "request_too_large"
    assert "1 KiB" in error["message"] and "--max-body-size" in error["message"]
    assert d.deployment.pool.arrived == 0  # never reached the balancer
    # A body exactly at the limit is relayed.
    body = json.dumps({"max_tokens": 2}).encode().ljust(1024)
    async with http.post(f"{d.url}{CHAT}", data=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "t0 t1"


async def test_chunked_body_is_cut_off_with_413_once_past_the_limit(daemon, upstream, http):
    up = await upstream()
    d = await daemon(endpoints=[up.url], max_body_size=4096)
    await d.wait_ready(1)
    reader, writer = await connect(d.url)
    writer.write(post_head("Transfer-Encoding: chunked\r\n"))
    piece = b"x" * 1024
    # Sixteen times the limit and no last chunk: only the limit can end this request.
    with contextlib.suppress(ConnectionError):
        for _ in range(64):
            writer.write(b"400\r\n" + piece + b"\r\n")
            await writer.drain()
    answer = await answer_then_close(reader)
    writer.close()
    assert answer.status == 413
    assert answer.headers["connection"] == "close"
    assert answer.error()["type"] == "request_too_large"
    await until(lambda: d.deployment.pool.in_flight == 0, "the refused request to end")
    async with http.post(f"{d.url}{CHAT}", json={"max_tokens": 1}) as resp:
        assert resp.status == 200


async def test_request_head_over_64_kib_gets_431(daemon, http):
    d = await daemon(endpoints=["http://127.0.0.1:9"])
    reader, writer = await connect(d.url)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
    answer = await answer_then_close(reader)
    writer.close()
    assert answer.status == 431
    assert answer.headers["connection"] == "close"
    assert answer.error() == {
        "message": "request line and headers are larger than 64 KiB",
        "type": "request_header_too_large",
        "code": 431,
    }
    # A header line of megabytes is refused after its first 64 KiB, not parsed whole.
    reader, writer = await connect(d.url)

    async def send_huge() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            for _ in range(256):
                writer.write(b"a" * 32768)
                await writer.drain()

    sender = asyncio.create_task(send_huge())
    answer = await answer_then_close(reader)
    await sender
    writer.close()
    assert answer.status == 431
    # Below the limit is fine.
    async with http.get(f"{d.url}/health", headers={"x-pad": "a" * 60_000}) as resp:
        assert resp.status == 200


async def test_half_a_request_head_gets_408_and_a_closed_connection(daemon):
    d = await daemon(endpoints=["http://127.0.0.1:9"], header_timeout=0.5)
    reader, writer = await connect(d.url)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    answer = await answer_then_close(reader)
    writer.close()
    assert answer.status == 408
    assert answer.headers["connection"] == "close"
    assert answer.error() == {
        "message": "the request head did not arrive within 0.5s (the balancer's --header-timeout)",
        "type": "request_timeout",
        "code": 408,
    }
    # A connection that never sends a byte is held to the same deadline.
    reader, writer = await connect(d.url)
    assert (await answer_then_close(reader)).status == 408
    writer.close()
    assert d.deployment.pool.arrived == 0


async def test_a_body_that_stops_arriving_gets_408(daemon, monkeypatch):
    monkeypatch.setattr(limits, "BODY_GRACE_SECONDS", 0.5)
    d = await daemon(endpoints=["http://127.0.0.1:9"], header_timeout=0.5)
    reader, writer = await connect(d.url)
    writer.write(post_head("Content-Length: 100\r\n") + b'{"max_tokens":')
    answer = await answer_then_close(reader)
    writer.close()
    assert answer.status == 408
    assert answer.error()["message"] == "the request body did not arrive within 1s"
    await until(lambda: d.deployment.pool.in_flight == 0, "the abandoned request to end")


async def test_slow_stream_and_idle_client_outlive_the_header_deadline(daemon, upstream):
    up = await upstream()
    d = await daemon(endpoints=[up.url], header_timeout=0.5)
    await d.wait_ready(1)
    # Each token takes 0.2 s: the answer streams for more than twice the header deadline while
    # the client, its request sent, only reads.
    payload = {"stream": True, "fake_token_delay": 0.2, "max_tokens": 6}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"{d.url}{CHAT}", json=payload) as resp:
            assert resp.status == 200
            data = await resp.read()
        events = [e for e in data.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert len(events) == 7
        # The same kept-alive connection takes the next request.
        async with session.post(f"{d.url}{CHAT}", json={"max_tokens": 1}) as resp:
            assert resp.status == 200
    assert d.server.server_state.total_requests == 2


async def test_at_the_cap_the_longest_idle_connection_makes_room(daemon, http):
    d = await daemon(endpoints=["http://127.0.0.1:9"], max_connections=3, header_timeout=120)
    connections = d.server.server_state.connections
    # The oldest: a client kept alive after a whole request, likely to send the next one.
    kept_reader, kept = await connect(d.url)
    kept.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await kept_reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    slow = []
    for i in range(2):  # slowloris: each sends part of a head, then nothing
        reader, writer = await connect(d.url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        await until(lambda i=i: len(connections) == i + 2, f"connection {i + 2} open")
        slow.append((reader, writer))
    async with http.get(f"{d.url}/health") as resp:
        assert resp.status == 200
    # The oldest slow one was answered 408 and closed to make room; the rest are still open.
    answer = await answer_then_close(slow[0][0])
    assert answer.status == 408
    assert "connection limit" in answer.error()["message"]
    assert not slow[1][1].is_closing() and not kept.is_closing()
    for _, w in slow:
        w.close()
    kept.close()


async def test_connections_past_the_cap_get_503_and_are_closed(daemon, http):
    d = await daemon(endpoints=["http://127.0.0.1:9"], max_connections=3, header_timeout=120)
    connections = d.server.server_state.connections
    held = []
    for i in range(3):  # each with a request under way: its head sent, its body half sent
        reader, writer = await connect(d.url)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        await until(lambda i=i: len(connections) == i + 1, f"connection {i + 1} open")
        held.append((reader, writer))
    reader, writer = await connect(d.url)
    answer = await answer_then_close(reader)
    writer.close()
    assert answer.status == 503
    assert answer.headers["connection"] == "close"
    assert answer.headers["retry-after"] == "1"
    assert answer.error()["type"] == "service_unavailable"
    assert "limit of 3 open connections" in answer.error()["message"]
    assert len(connections) == 3
    held.pop()[1].close()
    await until(lambda: len(connections) == 2, "a held connection to close")
    async with http.get(f"{d.url}/health") as resp:
        assert resp.status == 200
    for _, w in held:
        w.close()


# The daemon process: open-file limit, a flood of idle connections, memory under big uploads


@dataclass
class DaemonProcess:
    pid: int
    url: str
    log: Path


#: Runs the daemon under an open-file limit given as argv[1:3] (soft, hard), set before it starts.
LAUNCH_UNDER_LIMIT = """
import resource, runpy, sys
soft, hard = int(sys.argv.pop(1)), int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
runpy.run_module("flockctl.server", run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[..., Awaitable[DaemonProcess]]]:
    """``python -m flockctl.server`` in a process of its own, under an open-file limit
    (soft, hard) when one is given."""
    procs: list[subprocess.Popen] = []

    async def start(nofile: tuple[int, int] | None = None, **fields: Any) -> DaemonProcess:
        port = free_port()
        name = f"limits-{port}"
        fields.setdefault("probe", {"interval_seconds": 0.05, "timeout_seconds": 2})
        cfg = {"name": name, "port": port, "node_control_key": TOKEN, **fields}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        log = tmp_path / f"{name}.log"
        if nofile is None:
            launch = [sys.executable, "-m", "flockctl.server"]
        else:
            launch = [sys.executable, "-c", LAUNCH_UNDER_LIMIT, *map(str, nofile)]
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                [*launch, "--name", name, "--config", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=tmp_path,
            )
        procs.append(proc)
        directory = state_dir(name)

        def announced() -> DaemonRecord | None:
            assert proc.poll() is None, log.read_text()
            return DaemonRecord.load(directory)

        record = await until(announced, "the daemon to announce itself")
        return DaemonProcess(record.pid, f"http://127.0.0.1:{port}", log)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def counting_worker() -> tuple[web.Application, dict[str, int]]:
    """A worker that counts the probes it answers."""
    app = web.Application()
    hits = {"health": 0}

    async def health(_r: web.Request) -> web.Response:
        hits["health"] += 1
        return web.json_response({"status": "ok"})

    async def models(_r: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app, hits


@pytest.mark.e2e
async def test_daemon_raises_its_open_file_limit(daemon_process, http):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256 (here {hard})")
    d = await daemon_process(nofile=(256, hard), endpoints=["http://127.0.0.1:9"])
    assert psutil.Process(d.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(f"{d.url}/-/status", headers=headers) as resp:
        shown = (await resp.json())["deployment"]["limits"]
    assert shown["open_files"] == {"soft": hard, "hard": hard}
    assert shown["max_body_size"] == 32 << 20
    assert shown["header_timeout"] == 10
    assert shown["max_connections"] == 10_000


@pytest.mark.e2e
async def test_idle_connection_flood_leaves_probes_their_descriptors(
    daemon_process, upstream, http
):
    # An open-file limit of 400 that cannot be raised, and 450 clients that connect and say
    # nothing: the daemon holds as many as its reserve allows, closing the longest idle to make
    # room for each new one, while its prober keeps reaching both workers.
    apps = [counting_worker() for _ in range(2)]
    ups = [await upstream(app) for app, _ in apps]
    fields: dict[str, Any] = {
        "endpoints": [u.url for u in ups],
        "header_timeout": 600,
        # One failed probe would mark a worker NOT_READY, and the daemon's log would say so.
        "probe": {"interval_seconds": 0.05, "timeout_seconds": 2, "failure_threshold": 1},
    }
    d = await daemon_process(nofile=(400, 400), **fields)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def states() -> list[str] | None:
        """The workers' states, or None while the daemon turns this client away."""
        async with http.get(f"{d.url}/-/status", headers=headers) as resp:
            if resp.status == 503:
                return None
            return [w["state"] for w in (await resp.json())["workers"]]

    async def both_ready() -> bool:
        return await states() == ["READY", "READY"]

    await until(both_ready, "both workers READY", STUCK)
    cap = connection_cap(10_000, 400, descriptor_reserve(DeploymentConfig(**fields)))
    flood = [await connect(d.url) for _ in range(450)]
    reads = [asyncio.create_task(read_until_closed(reader)) for reader, _ in flood]

    def closed_ones() -> list[asyncio.Task] | None:
        done = [task for task in reads if task.done()]
        return done if len(done) >= len(flood) - cap else None

    closed = await until(closed_ones, "the connections past the cap to be closed")
    # They had sent nothing: closed without a word (the oldest first), or refused with a 503.
    assert all(not t.result() or parse_answer(t.result()).status == 503 for t in closed)
    assert reads.index(closed[0]) < len(flood) - cap
    before = [hits["health"] for _, hits in apps]
    await until(
        lambda: all(h["health"] >= b + 20 for (_, h), b in zip(apps, before, strict=True)),
        "20 more probes of each worker with the daemon's connections full",
    )
    for task in reads:
        task.cancel()
    for _, writer in flood:
        writer.close()
    await until(both_ready, "the daemon to take clients again, both workers READY", STUCK)
    assert "NOT_READY" not in d.log.read_text()  # not one probe failed
    async with http.get(f"{d.url}/v1/models") as resp:
        assert resp.status == 200


@pytest.mark.e2e
async def test_a_200_mb_upload_leaves_daemon_memory_flat(daemon_process, upstream):
    up = await upstream()
    d = await daemon_process(endpoints=[up.url])
    process = psutil.Process(d.pid)
    before = process.memory_info().rss
    piece = b"x" * (1 << 20)
    for framing in (f"Content-Length: {200 << 20}\r\n", "Transfer-Encoding: chunked\r\n"):
        reader, writer = await connect(d.url)
        writer.write(post_head(framing))
        chunked = framing.startswith("Transfer")

        async def upload(w: asyncio.StreamWriter = writer, chunked: bool = chunked) -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(200):
                    w.write(b"100000\r\n" + piece + b"\r\n" if chunked else piece)
                    await w.drain()

        sender = asyncio.create_task(upload())
        answer = await answer_then_close(reader)
        await sender
        writer.close()
        assert answer.status == 413
    grown = process.memory_info().rss - before
    # The whole body used to be buffered (RSS 64 -> 648 MB); a chunked one is now cut at 32 MiB.
    assert grown < 48 << 20, f"daemon RSS grew by {grown >> 20} MiB"
