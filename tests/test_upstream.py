"""The balancer's HTTP/1.1 upstream client against raw servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from flockctl.server.upstream import HIGH_WATER, UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, list[int]]]]]:
    """A TCP server whose handler gets (reader, writer, connection number)."""
    servers: list[asyncio.AbstractServer] = []

    async def start(handler: Handler) -> tuple[str, list[int]]:
        accepted: list[int] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(len(accepted) + 1)
            try:
                await handler(reader, writer, len(accepted))
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", accepted

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=2)
    yield p
    await p.close()


async def fetch(
    pool: UpstreamPool, url: str, method: bytes = b"GET", body: bytes = b"", target: bytes = b"/x"
) -> tuple[int, bytes]:
    conn = await pool.send(url, method, target, b"", body)
    try:
        data = b""
        while chunk := await conn.read_some():
            data += chunk
        return conn.status, data
    finally:
        pool.release(conn)


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def test_keep_alive_connections_are_reused(raw_server, pool):
    async def serve(reader, writer, _n):
        for _ in range(3):
            await read_request(reader)
            writer.write(OK)

    url, accepted = await raw_server(serve)
    for _ in range(3):
        assert await fetch(pool, url) == (200, b"ok")
    assert accepted == [1]


async def test_an_idle_connection_the_worker_closed_is_replaced(raw_server, pool):
    async def serve(reader, writer, n):
        await read_request(reader)
        writer.write(OK)
        if n == 1:
            await read_request(reader)  # the second request on it: close without a word
            return
        await read_request(reader)
        writer.write(OK)

    url, accepted = await raw_server(serve)
    assert await fetch(pool, url) == (200, b"ok")
    assert await fetch(pool, url) == (200, b"ok")
    assert accepted == [1, 2]


async def test_a_new_connection_closed_before_an_answer_is_an_error(raw_server, pool):
    async def serve(reader, writer, _n):
        await read_request(reader)

    url, _ = await raw_server(serve)
    with pytest.raises(UpstreamError, match="closed the connection"):
        await fetch(pool, url)


async def test_body_delimited_by_close_and_interim_answers(raw_server, pool):
    async def serve(reader, writer, _n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")

    url, _ = await raw_server(serve)
    assert await fetch(pool, url) == (200, b"hello world")


async def test_chunked_answer_arrives_piece_by_piece(raw_server, pool):
    step = asyncio.Event()

    async def serve(reader, writer, _n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await step.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    url, _ = await raw_server(serve)
    conn = await pool.send(url, b"GET", b"/", b"", b"")
    try:
        assert ("transfer-encoding", "chunked") in [
            (k.decode(), v.decode()) for k, v in conn.headers
        ]
        assert await conn.read_some() == b"first"
        assert not conn.complete
        step.set()
        assert await conn.read_some() == b"second"
        assert conn.complete
    finally:
        pool.release(conn)


async def test_garbage_is_an_error_not_a_hang(raw_server, pool):
    async def serve(reader, writer, _n):
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")

    url, _ = await raw_server(serve)
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        await fetch(pool, url)


async def test_head_has_no_body_and_is_not_reused(raw_server, pool):
    async def serve(reader, writer, _n):
        head, _ = await read_request(reader)
        assert head.startswith(b"HEAD /x HTTP/1.1\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        await asyncio.sleep(0.2)

    url, _ = await raw_server(serve)
    assert await fetch(pool, url, b"HEAD") == (200, b"")


async def test_request_line_host_and_length(raw_server, pool):
    seen: list[tuple[bytes, bytes]] = []

    async def serve(reader, writer, _n):
        seen.append(await read_request(reader))
        writer.write(OK)

    url, _ = await raw_server(serve)
    await fetch(pool, url + "/prefix", b"POST", b'{"a": 1}', target=b"/v1/x?y=1")
    head, body = seen[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /prefix/v1/x?y=1 HTTP/1.1"
    assert f"host: {url.removeprefix('http://')}".encode() in lines
    assert b"content-length: 8" in lines
    assert body == b'{"a": 1}'


async def test_slow_reader_pauses_the_worker_and_loses_nothing(raw_server, pool):
    payload = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def serve(reader, writer, _n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()

    url, _ = await raw_server(serve)
    conn = await pool.send(url, b"GET", b"/", b"", b"")
    try:
        await asyncio.sleep(0.2)  # let the worker push as much as it can
        assert conn._paused  # reading stopped at the high-water mark
        assert conn._buffered <= HIGH_WATER + 256 * 1024
        data = b""
        while chunk := await conn.read_some():
            data += chunk
    finally:
        pool.release(conn)
    assert data == payload


async def test_unreachable_worker(pool):
    with pytest.raises(UpstreamError, match=r"cannot connect to http://127\.0\.0\.1:9"):
        await fetch(pool, "http://127.0.0.1:9")


async def test_balancer_turns_a_chunked_upload_into_a_sized_request(daemon, upstream, http):
    received: list[tuple[str | None, bytes, str]] = []

    async def echo(request: web.Request) -> web.Response:
        received.append(
            (
                request.headers.get("content-length"),
                await request.read(),
                request.headers["x-forwarded-for"],
            )
        )
        return web.json_response({})

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/upload", echo)
    up = await upstream(app)
    d = await daemon(endpoints=[up.url])
    await d.wait_ready(1)

    async def parts():
        for i in range(3):
            yield f"part{i};".encode()

    headers = {"x-forwarded-for": "203.0.113.7"}
    async with http.post(f"{d.url}/upload", data=parts(), headers=headers) as resp:
        assert resp.status == 200
    assert received == [("18", b"part0;part1;part2;", "203.0.113.7, 127.0.0.1")]
