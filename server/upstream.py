"""The balancer's upstream client: keep-alive HTTP/1.1 connections to the workers.

Made for relaying, it does a fraction of a general client's work per request: connections per
worker URL carry one request at a time, the request goes out in one write with its own
Content-Length, and answers are parsed by httptools (uvicorn's own parser) and handed on as
they arrive, waking the waiting request directly with no extra task. There are no header
multidicts, cookies, redirects or payload objects: replacing aiohttp's client with this halved
the balancer's CPU per streamed request (``bench/balancer.py``). Reading from a worker pauses
when more than ``HIGH_WATER`` bytes wait for a slow client.

Every wait on a worker is bounded. Connecting has ``connect_timeout``; after the request went out,
``read_timeout`` bounds the wait for each next byte, the first included (nginx's
``proxy_read_timeout``): a stopped worker's kernel still accepts connections and takes the
request, so only this finds it. One timer per request checks the time of the last byte when it
fires instead of being re-armed on every chunk, and time spent paused for a slow client does not
count against the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from typing import cast

import httptools
from yarl import URL

#: Methods whose request always carries a Content-Length, even for an empty body.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: Unsent answer bytes buffered per connection before reading from the worker pauses.
HIGH_WATER = 1024 * 1024


class UpstreamError(Exception):
    """A worker could not be reached, did not answer in time, or broke off (or garbled) its answer.

    ``kind`` says which: ``connect`` (refused, unreachable, or the connect timed out), ``timeout``
    (no byte within the read timeout), ``reset`` (the worker reset the connection), ``closed``
    (it closed the connection before the answer ended), ``invalid`` (not HTTP/1.1).
    """

    def __init__(self, message: str, kind: str = "closed") -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def worker_at_fault(self) -> bool:
        """A sign that the worker itself is unwell, not only this request (passive health)."""
        return self.kind in ("connect", "timeout", "reset")


class Origin:
    """Where a worker URL points, parsed once: address, TLS, Host header and path prefix."""

    __slots__ = ("host", "host_header", "port", "prefix", "ssl")

    def __init__(self, url: str) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise UpstreamError(f"worker URL {url!r} is not an http(s) URL", "connect")
        self.host = parsed.raw_host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parsed.scheme == "https" else None
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if parsed.scheme == "https" else 80
        self.host_header = (name if self.port == default else f"{name}:{self.port}").encode()
        # The relayed path is appended to the URL as written ("http://h:1/v1" + "/chat").
        rest = url.split("://", 1)[1]
        slash = rest.find("/")
        self.prefix = rest[slash:].encode() if slash >= 0 else b""


class Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, carrying one request at a time.

    httptools calls the ``on_*`` methods from ``data_received``; the request's coroutine waits
    on ``_waiter`` for the answer's head and then for body bytes, so no task is spawned.
    """

    __slots__ = (
        "_body",
        "_buffered",
        "_interim",
        "_last",
        "_loop",
        "_parser",
        "_paused",
        "_pool",
        "_timer",
        "_waiter",
        "busy",
        "chunked",
        "complete",
        "error",
        "head_only",
        "headers",
        "idle_since",
        "keep_alive",
        "key",
        "length",
        "origin",
        "ready",
        "received",
        "reused",
        "status",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, key: str, origin: Origin) -> None:
        self._pool = pool
        self.key = key
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.busy = False
        self.reused = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self._disarm()
        self.received = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.head_only = False
        self.ready = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._interim = False
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.head_only
            and not self._paused
            and self.usable
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- the request ---------------------------------------------------------------------------

    async def request(self, method: bytes, target: bytes, headers: bytes, body: bytes) -> None:
        """Send one request and wait for the head of its answer (``status``, ``headers``)."""
        assert self.transport is not None and not self.busy
        self.busy = True
        self.head_only = method == b"HEAD"
        length = b"content-length: %d\r\n" % len(body) if body or method in _BODY_METHODS else b""
        origin = self.origin
        self.transport.write(
            b"%s %s%s HTTP/1.1\r\nhost: %s\r\n%s%s\r\n%s"
            % (method, origin.prefix, target, origin.host_header, headers, length, body)
        )
        timeout = self._pool.read_timeout
        if timeout is not None:
            self._last = self._loop.time()
            self._timer = self._loop.call_at(self._last + timeout, self._check_timeout)
        while not self.ready:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_all(self) -> bytes:
        """The whole body (for answers with a small Content-Length)."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait()
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        return data

    async def read_some(self) -> bytes:
        """Every body byte that arrived since the last call (waiting for at least one).

        Returns ``b""`` only at the end; ``complete`` is true once the returned bytes are the last.
        """
        body = self._body
        while not body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last = self._loop.time()
            self.transport.resume_reading()
        return data

    def _wait(self) -> asyncio.Future[None]:
        self._waiter = waiter = self._loop.create_future()
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._disarm()
        self._wake()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timeout(self) -> None:
        """The read timer fired: fail the request if the worker sent nothing for that long."""
        self._timer = None
        timeout = self._pool.read_timeout
        if timeout is None or not self.busy or self.complete or self.error is not None:
            return
        now = self._loop.time()
        if self._paused:
            # Reading is paused for a slow client: the worker is not the one keeping us waiting.
            self._last = now
        if now < self._last + timeout:
            self._timer = self._loop.call_at(self._last + timeout, self._check_timeout)
            return
        message = f"no byte from the worker within {timeout:g}s (upstream timeout)"
        self._fail(UpstreamError(message, "timeout"))
        self.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; the interface is the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._last = self._loop.time()
        if not self.busy or self.complete:
            # Bytes nobody asked for: the connection is out of step, never reuse it.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            message = f"the worker's answer is not valid HTTP/1.1: {exc}"
            self._fail(UpstreamError(message, "invalid"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)
        self._disarm()
        if self.busy and not self.complete:
            ended = self.ready and exc is None and self.error is None
            if ended and self.length is None and not self.chunked:
                # A body without a length ends when the worker closes the connection.
                self.complete = True
                self._wake()
            elif exc is not None:
                self._fail(UpstreamError(f"the worker reset the connection: {exc}", "reset"))
            else:
                self._fail(UpstreamError("the worker closed the connection"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: the connection is out of step.
            raise UpstreamError("the worker sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            try:
                self.length = int(value)
            except ValueError:
                self.length = None
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self._interim = True
            self.headers = []
            self.length = None
            self.chunked = False
            return
        self.status = status
        self.ready = True
        if self.head_only:
            # The parser cannot know that an answer to HEAD has no body; the connection is not
            # reused after it.
            self.complete = True
            self._disarm()
        self._wake()

    def on_body(self, data: bytes) -> None:
        if self.head_only:
            return
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._disarm()
        self._wake()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to the workers, shared by every relayed request.

    ``read_timeout`` (None: no limit) is the longest wait for a worker's next byte once a request
    went out, the first byte of the answer included.
    """

    def __init__(
        self,
        connect_timeout: float = 10.0,
        idle_timeout: float = 4.0,
        read_timeout: float | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, deque[Connection]] = {}
        self._open: set[Connection] = set()

    async def connection(self, url: str) -> Connection:
        """An idle connection to the worker at ``url``, or a new one (raises UpstreamError)."""
        idle = self._idle.get(url)
        if idle:
            now = time.monotonic()
            # Oldest first: drop connections idle too long (the worker may be closing them).
            while idle and now - idle[0].idle_since > self.idle_timeout:
                idle.popleft().close()
            while idle:
                conn = idle.pop()
                if conn.usable:
                    conn.reused = True
                    return conn
        return await self._connect(url)

    async def send(
        self, url: str, method: bytes, target: bytes, headers: bytes, body: bytes
    ) -> Connection:
        """Send one request and return its connection once the answer's head arrived.

        A kept-alive connection that the worker closed while it sat idle (it answered nothing)
        is replaced by a new one, once: that is the connection's failure, not the worker's.
        Raises UpstreamError; the returned connection must go back through ``release``.
        """
        conn = await self.connection(url)
        try:
            await conn.request(method, target, headers, body)
            return conn
        except UpstreamError as exc:
            self.release(conn)
            if not conn.reused or conn.received or exc.kind not in ("closed", "reset"):
                raise
        except BaseException:  # cancelled: the connection is in an unknown state
            self.release(conn)
            raise
        conn = await self._connect(url)
        try:
            await conn.request(method, target, headers, body)
        except BaseException:
            self.release(conn)
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """Take back a connection after its request: kept if its answer ended cleanly."""
        if conn.reusable:
            conn.busy = False
            conn._reset()
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, deque()).append(conn)
        else:
            conn.busy = False
            conn.close()

    def forget(self, conn: Connection) -> None:
        """Called by a connection once it is closed."""
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    async def _connect(self, url: str) -> Connection:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = Origin(url)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(self, url, origin),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise UpstreamError(
                f"connecting to {url} timed out after {self.connect_timeout:g}s", "connect"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {url}: {exc.strerror or exc}", "connect"
            ) from None
        self._open.add(conn)
        return conn

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
