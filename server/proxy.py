"""The balancer's request path: a plain ASGI handler in front of the FastAPI admin app.

Every path outside ``/-/``, ``/metrics`` and ``/health`` is relayed to a READY worker, but
``/jobs/{id}``, which goes to the worker holding that job (``flockctl.server.jobs``). The hot
path skips FastAPI's routing and response classes on purpose: it reads the request body once,
takes a worker slot, and relays the upstream's status, headers and body bytes unchanged (SSE
included).

The upstream side is ``flockctl.server.upstream.UpstreamPool``, a keep-alive HTTP/1.1 client
made for relaying (see its docstring for why it is not aiohttp's).

Failures, with Envoy's outlier detection and nginx's ``proxy_read_timeout`` as the models:

- Every wait on a worker is bounded: connecting, and each next byte of the answer, the first one
  included (``upstream_timeout``). A stopped worker still accepts connections, so only the second
  finds it.
- Before anything was sent to the client, a connect error, a timeout, a broken connection or a
  502/503/504 answer is retried on another worker (``max_attempts`` in all, with backoff). A 500
  may be the request's own fault (a poison request), so it is retried once at most: the second 500
  goes to the client as it is. Retries must fit a ``RetryBudget``, so that failing workers never
  get several times their usual load. Once the first byte went out nothing is retried: the upstream
  connection is closed and the client's answer ends (an event stream with a last ``event: error``).
- Passive health: a worker that times out, refuses or resets a connection leaves the rotation at
  once (NOT_READY, with the request and what happened as the reason); its requests still running
  go on, and the prober, poked, brings it back when it answers again.

A client that disconnects cancels the upstream request (its connection is closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from flockctl.admin_routes import JOBS_PREFIX
from flockctl.server.jobs import holder, not_found, unlearned
from flockctl.server.metrics import Metrics
from flockctl.server.pool import NoWorker, QueueFull, WorkerPool
from flockctl.server.prober import MODELS_PATH
from flockctl.server.request_log import Attempt, RequestLog, RequestRecord, user_bytes
from flockctl.server.request_meta import NO_META, extract
from flockctl.server.retry_budget import RetryBudget
from flockctl.server.tracing import BalancerTracing, start_tracing
from flockctl.server.upstream import Connection, UpstreamError, UpstreamPool
from flockctl.server.workers import Worker, WorkerState

log = logging.getLogger("flockctl.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Headers that describe one hop, never relayed (RFC 9110 7.6.1), plus what the client recomputes.
_HOP_REQUEST = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
_HOP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: With tracing on, the client's trace context is replaced by the attempt span's.
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
#: Answers up to this size with a Content-Length are read whole and sent in one message.
_SMALL_BODY = 256 * 1024
#: Answers retried on another worker: the worker (or one in front of it) says it cannot serve now.
_RETRIED_STATUSES = frozenset({502, 503, 504})
#: 500 answers after which a request is not retried again: two workers failed on it, so the
#: request itself is the likely cause, and more workers would only fail on it too.
_MAX_SERVER_ERRORS = 2


def json_error(status: int, message: str, kind: str) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return status, json.dumps(body).encode()


async def send_json(send: Send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BrokenOff(Exception):
    """The worker failed after the answer's first bytes went to the client: nothing to retry."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.error = error


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        k == b"content-type" and v.lower().startswith(b"text/event-stream") for k, v in headers
    )


def _sse_error(error: UpstreamError, last: bytes) -> bytes:
    """A last ``event: error`` for a stream the worker stopped, in OpenAI's error shape.

    It starts on an event boundary: if the worker stopped inside an event, that event is ended
    first, so the client parses the error event whole.
    """
    _, body = json_error(504, f"the worker stopped answering: {error}", "upstream_timeout")
    boundary = last.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
    return (b"" if boundary else b"\n\n") + b"event: error\ndata: " + body + b"\n\n"


class Balancer:
    """ASGI entry point: the proxy for inference traffic, the admin app for the rest."""

    def __init__(
        self,
        admin_app: ASGIApp,
        pool: WorkerPool,
        metrics: Metrics,
        *,
        max_attempts: int = 3,
        queue_timeout: float = 60.0,
        api_key: str | None = None,
        admin_token: str | None = None,
        on_connect_error: Callable[[Worker], None] | None = None,
        backoff: float = 0.05,
        upstream_timeout: float = 60.0,
        retry_budget: RetryBudget | None = None,
        request_log: RequestLog | None = None,
        otel_endpoint: str | None = None,
    ) -> None:
        self.admin_app = admin_app
        self.pool = pool
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.queue_timeout = queue_timeout
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        #: The operator's admin token also opens the routes the balancer answers itself (the
        #: dashboard reads a job's timeline with it); it is never relayed to a worker.
        self.admin_auth = f"Bearer {admin_token}".encode() if admin_token else None
        self.on_connect_error = on_connect_error
        self.backoff = backoff
        self.upstream_timeout = upstream_timeout
        self.retry_budget = retry_budget or RetryBudget()
        self.request_log = request_log
        if request_log is not None:
            metrics.track_request_log(request_log)
        self.otel_endpoint = otel_endpoint
        #: Set while traces are sent (an endpoint, or ``OTEL_EXPORTER_OTLP_ENDPOINT``).
        self.tracing: BalancerTracing | None = None
        self._hop_request = _HOP_REQUEST
        self.upstream: UpstreamPool | None = None
        #: When the balancer started (the ``created`` of the models it lists).
        self.started = time.time()

    @property
    def needs_meta(self) -> bool:
        """Whether request bodies are parsed for routing: the policy reads them, or more than
        one model is served (routing by model). The default single-model path never parses."""
        return self.pool.policy.needs_meta or self.pool.routes_by_model

    def open_session(self) -> UpstreamPool:
        """The shared upstream connections, the request log's writer and the OpenTelemetry
        exporters; started inside the running loop (lifespan)."""
        if self.request_log is not None:
            self.request_log.start()
        self.tracing = start_tracing(self.otel_endpoint, self.metrics.registry)
        if self.tracing is not None:
            self._hop_request = _HOP_REQUEST | _TRACE_HEADERS
        # Idle connections are dropped before uvicorn's (and so vLLM's) 5 s keep-alive ends, so a
        # request rarely meets a connection the worker is closing at that moment.
        self.upstream = UpstreamPool(
            connect_timeout=10.0, idle_timeout=4.0, read_timeout=self.upstream_timeout
        )
        return self.upstream

    async def close_session(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None
        tracing, self.tracing = self.tracing, None
        self._hop_request = _HOP_REQUEST
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)
        if self.request_log is not None:
            await asyncio.to_thread(self.request_log.close)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.admin_app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/-/") or path in ("/metrics", "/health"):
            await self.admin_app(scope, receive, send)
            return
        if path.startswith(JOBS_PREFIX):
            await self.job(scope, send)
            return
        if path == MODELS_PATH and scope["method"] == "GET" and self.pool.routes_by_model:
            await self.models(scope, send)
            return
        await self.proxy(scope, receive, send)

    async def job(self, scope: Scope, send: Send) -> None:
        """``/jobs/{id}``: relayed to the worker whose engine holds the job, else a 404 here.
        Logged and traced like a relayed request: each worker asked is an attempt."""
        started = time.perf_counter()
        rec = self._record(scope, started)
        if await self._refused(scope, send, rec, started):
            return
        job_id = scope["path"][len(JOBS_PREFIX) :]
        known = holder(self.pool, job_id)
        upstream = self.upstream
        candidates = [known] if known is not None else unlearned(self.pool)
        status = 404
        try:
            if not candidates or upstream is None:
                await send_json(send, 404, not_found(job_id))
                return
            method = scope["method"].encode("latin-1")
            target = scope.get("raw_path") or scope["path"].encode()
            headers = self._upstream_headers(scope, drop_auth=True)
            for worker in candidates:
                conn: Connection | None = None
                tried = Attempt(worker.id)
                rec.attempts.append(tried)
                sent = headers
                if rec.span is not None:
                    sent = headers + self.tracing.attempt(rec, tried)  # type: ignore[union-attr]
                t0 = time.perf_counter()
                try:
                    conn = await upstream.send(worker.url or "", method, target, sent, b"")
                    tried.status = conn.status
                    if conn.status == 404 and known is None:
                        continue  # not this one; its unread answer closes the connection
                    status = conn.status
                    rec.worker = worker.id
                    await self._respond(conn, send, rec)
                    return
                except UpstreamError as exc:
                    tried.error = f"{exc.kind}: {exc}"
                    if known is None:
                        continue
                    rec.worker = worker.id
                    status, err = json_error(
                        502, f"worker {worker.id} failed: {exc}", "upstream_error"
                    )
                    await send_json(send, status, err)
                    return
                finally:
                    tried.ms = (time.perf_counter() - t0) * 1000
                    if rec.span is not None:
                        self.tracing.end_attempt(tried)  # type: ignore[union-attr]
                    if conn is not None:
                        upstream.release(conn)
            await send_json(send, 404, not_found(job_id))
        except _BrokenOff:
            pass
        finally:
            self._done(rec, status, time.perf_counter() - started)

    async def models(self, scope: Scope, send: Send) -> None:
        """``GET /v1/models`` where several models are served: all of them, in OpenAI's shape."""
        started = time.perf_counter()
        rec = self._record(scope, started)
        if await self._refused(scope, send, rec, started):
            return
        data = [
            {"id": model, "object": "model", "created": int(self.started), "owned_by": "flockctl"}
            for model in self.pool.models()
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        await send_json(send, 200, body)
        rec.bytes_out = len(body)
        self._done(rec, 200, time.perf_counter() - started)

    async def _refused(self, scope: Scope, send: Send, rec: RequestRecord, started: float) -> bool:
        """For a route the balancer answers itself: refuse (401) a request that carries neither
        the API key (when one is set) nor the admin token."""
        if self.api_key is None:
            return False
        auth = _authorization(scope["headers"])
        if auth == self.api_key or (self.admin_auth is not None and auth == self.admin_auth):
            return False
        await self._unauthorized(send, rec, started)
        return True

    async def _unauthorized(self, send: Send, rec: RequestRecord, started: float) -> None:
        status, body = json_error(401, "missing or wrong API key", "authentication_error")
        await send_json(send, status, body, [(b"www-authenticate", b"Bearer")])
        self._done(rec, status, time.perf_counter() - started)

    def _record(self, scope: Scope, started: float) -> RequestRecord:
        """The log record (and trace) of a request the balancer answers without the relay."""
        client = scope.get("client")
        rec = RequestRecord(scope["method"], scope["path"], client[0] if client else None, started)
        if self.request_log is not None or self.tracing is not None:
            _identify(rec, scope["headers"])
        if self.tracing is not None:
            self.tracing.start(rec, scope)
        return rec

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        self.pool.arrived += 1
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        rec = RequestRecord(scope["method"], scope["path"], client[0] if client else None, started)
        if self.request_log is not None or self.tracing is not None:
            _identify(rec, headers)
        if self.api_key is not None and _authorization(headers) != self.api_key:
            await self._unauthorized(send, rec, started)
            return
        # Read the body once, before any retry (re-reading after a retry would hang).
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        if message.get("more_body", False):
            parts = [body]
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = b"".join(parts)
        rec.bytes_in = len(body)

        task = asyncio.current_task()
        assert task is not None
        done = gone = False

        async def watch() -> None:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not done:
                gone = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        status = 499
        if self.tracing is not None:
            self.tracing.start(rec, scope)
        try:
            status = await self._relay(scope, body, send, rec)
        except asyncio.CancelledError:
            if not gone:
                raise
            if sys.version_info >= (3, 11):
                task.uncancel()
        finally:
            done = True
            watcher.cancel()
            self._done(rec, status, time.perf_counter() - started)

    def refused(
        self, status: int, method: str | None, path: str | None, client: str | None
    ) -> None:
        """A request or connection the front door refused (``http_protocol``): it never reached
        the relay, and is counted in ``/metrics`` and logged all the same."""
        self.metrics.refused(status)
        if self.request_log is not None:
            rec = RequestRecord(method or "-", path or "-", client, time.perf_counter())
            rec.status = status
            self.request_log.add(rec)

    def _done(self, rec: RequestRecord, status: int, seconds: float) -> None:
        """A request ended: count it, end its trace, log it."""
        self.metrics.observe(status, seconds)
        rec.status = status
        rec.latency = seconds
        if rec.span is not None:
            self.tracing.finish(rec)  # type: ignore[union-attr]
        if self.request_log is not None:
            self.request_log.add(rec)

    def _upstream_headers(self, scope: Scope, drop_auth: bool = False) -> bytes:
        """The request's header lines as sent to the worker (Host and length added later).

        The peer's address is appended to X-Forwarded-For, one line for the whole chain. The
        balancer's own credentials stay here: with an API key set, or ``drop_auth`` (a job
        lookup, which may carry the admin token), Authorization is not sent on.
        """
        skip_auth = drop_auth or self.api_key is not None
        hop = self._hop_request
        parts: list[bytes] = []
        forwarded: list[bytes] = []
        for k, v in scope["headers"]:
            if k in hop or (skip_auth and k == b"authorization"):
                continue
            if k == b"x-forwarded-for":
                forwarded.append(v)
                continue
            parts += (k, b": ", v, b"\r\n")
        client = scope.get("client")
        if client:
            forwarded.append(str(client[0]).encode("latin-1"))
        if forwarded:
            parts += (b"x-forwarded-for: ", b", ".join(forwarded), b"\r\n")
        return b"".join(parts)

    async def _relay(self, scope: Scope, body: bytes, send: Send, rec: RequestRecord) -> int:
        """Send the request to a worker (retrying before the first byte); returns the status.

        What each attempt met goes into ``rec`` (the request log and the trace read it)."""
        upstream = self.upstream
        assert upstream is not None, "the balancer's upstream pool is opened in the app lifespan"
        method = scope["method"].encode("latin-1")
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = self._upstream_headers(scope)
        meta = extract(scope["headers"], body) if self.needs_meta else NO_META
        if meta is not NO_META:
            rec.model = meta.model
            rec.user = _user(meta.session, scope["headers"])
        elif self.request_log is not None:
            rec.user_head = user_bytes(body)  # read by the log's writer, off this path
        if self.pool.unknown_model(meta.model):
            served = ", ".join(self.pool.models())
            message = f"model: {meta.model!r} is not served here; served models: {served}"
            error = {"message": message, "type": "model_not_found", "param": "model", "code": 404}
            await send_json(send, 404, json.dumps({"error": error}).encode())
            return 404
        policy = self.pool.policy
        deadline = time.monotonic() + self.queue_timeout
        tried: set[Worker] = set()
        server_errors = 0
        attempt = 0
        self.retry_budget.request()
        while True:
            if attempt:
                self.metrics.retry()
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            attempt += 1
            waited = time.perf_counter()
            try:
                worker = await self.pool.acquire(max(deadline - time.monotonic(), 0.0), tried, meta)
            except QueueFull:
                status, err = json_error(
                    429,
                    f"too many requests waiting for a worker ({self.pool.max_queue} queued)",
                    "rate_limit_error",
                )
                await send_json(send, status, err, [(b"retry-after", b"1")])
                return status
            except NoWorker:
                status, err = json_error(
                    503,
                    f"no worker could take the request within {self.queue_timeout:g}s"
                    f" ({len(self.pool.ready())} ready of {len(self.pool.live())} live workers)",
                    "service_unavailable",
                )
                await send_json(send, status, err, [(b"retry-after", b"5")])
                return status
            t0 = time.perf_counter()
            rec.queue += t0 - waited
            rec.worker = worker.id
            tried_now = Attempt(worker.id)
            rec.attempts.append(tried_now)
            sent = headers
            if rec.span is not None:
                sent = headers + self.tracing.attempt(rec, tried_now)  # type: ignore[union-attr]
            conn: Connection | None = None
            try:
                try:
                    conn = await upstream.send(worker.url or "", method, target, sent, body)
                    tried_now.status = conn.status
                    if conn.status in _RETRIED_STATUSES or conn.status == 500:
                        worker.failures += 1
                        tried.add(worker)
                        if conn.status == 500:
                            server_errors += 1
                        if server_errors < _MAX_SERVER_ERRORS and self._may_retry(attempt):
                            continue
                    t1 = time.perf_counter()
                    policy.observe_first_byte(worker, t1 - t0)
                    chunks = await self._respond(conn, send, rec)
                    policy.observe_end(worker, time.perf_counter() - t1, chunks)
                except UpstreamError as exc:
                    # Nothing reached the client yet: another worker may answer instead.
                    tried_now.error = f"{exc.kind}: {exc}"
                    worker.failures += 1
                    tried.add(worker)
                    self._worker_failed(worker, exc, scope)
                    if self._may_retry(attempt):
                        continue
                    status = 504 if exc.kind == "timeout" else 502
                    refused = attempt < self.max_attempts
                    why = f"; not retried: {self.retry_budget.describe()}" if refused else ""
                    status, err = json_error(
                        status, f"worker {worker.id} failed: {exc}{why}", "upstream_error"
                    )
                    await send_json(send, status, err)
                    return status
                except _BrokenOff as exc:
                    # Bytes already went out: nothing can be retried; the client's answer ends.
                    tried_now.error = f"{exc.error.kind}: {exc}"
                    worker.failures += 1
                    log.warning("worker %s broke off a response: %s", worker.id, exc)
                    self._worker_failed(worker, exc.error, scope)
                    return 504 if exc.error.kind == "timeout" else 502
                worker.served += 1
                worker.latencies.append(time.perf_counter() - t0)
                return conn.status
            finally:
                tried_now.ms = (time.perf_counter() - t0) * 1000
                if rec.model is None:
                    rec.model = worker.model
                if rec.span is not None:
                    self.tracing.end_attempt(tried_now)  # type: ignore[union-attr]
                if conn is not None:
                    upstream.release(conn)
                self.pool.release(worker)

    def _may_retry(self, attempt: int) -> bool:
        """Whether a failed attempt may be retried: attempts left, and room in the budget."""
        if attempt >= self.max_attempts:
            return False
        if self.retry_budget.try_retry():
            return True
        self.metrics.retry_refused()
        return False

    def _worker_failed(self, worker: Worker, error: UpstreamError, scope: Scope) -> None:
        """Passive health: a worker that times out, refuses or resets leaves the rotation now."""
        if error.worker_at_fault and worker.state == WorkerState.READY:
            reason = f"{error} on {scope['method']} {scope['path']}"
            log.warning("worker %s is NOT_READY: %s", worker.id, reason)
            self.pool.set_state(worker, WorkerState.NOT_READY, reason)
        if self.on_connect_error is not None:
            self.on_connect_error(worker)

    @staticmethod
    async def _respond(conn: Connection, send: Send, rec: RequestRecord | None = None) -> int:
        """Relay the answer: UpstreamError before its first byte went out, _BrokenOff after.

        Returns how many body reads it relayed (1 for an answer sent whole). ``rec`` gets the
        time to first byte, the bytes sent and the answer's last bytes (its token usage)."""
        headers = [(k, v) for k, v in conn.headers if k not in _HOP_RESPONSE]
        start = {"type": "http.response.start", "status": conn.status, "headers": headers}
        length = conn.length
        if conn.complete or (length is not None and length <= _SMALL_BODY):
            data = await conn.read_all()
            await send(start)
            await send({"type": "http.response.body", "body": data})
            if rec is not None:
                rec.answered(data, len(data))
            return 1
        await send(start)
        if rec is not None:
            rec.answered(b"", 0)
        last = b""
        chunks = 0
        sent = 0
        try:
            while True:
                chunk = await conn.read_some()
                chunks += 1
                sent += len(chunk)
                if conn.complete:
                    # The last bytes and the end of the answer go out in one message.
                    await send({"type": "http.response.body", "body": chunk})
                    if rec is not None:
                        rec.ended(last, chunk, sent)
                    return chunks
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last = chunk
        except UpstreamError as exc:
            if exc.kind == "timeout" and _is_event_stream(headers):
                # An event stream can say why it ends, and then end cleanly; any other answer is
                # cut short (the connection closes) so the client cannot take it for whole.
                await send({"type": "http.response.body", "body": _sse_error(exc, last)})
            if rec is not None:
                rec.bytes_out = sent
            raise _BrokenOff(exc) from None


def _identify(rec: RequestRecord, headers: list[tuple[bytes, bytes]]) -> None:
    """The client's own request id (``x-request-id``) and trace id (W3C ``traceparent``)."""
    for k, v in headers:
        if k == b"x-request-id":
            rec.request_id = v.decode("latin-1")[:128]
        elif k == b"traceparent" and len(v) >= 55:
            rec.trace_id = v[3:35].decode("latin-1")


def _user(session: str | None, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The body's ``user`` where the request meta read it: its session, unless a header set it."""
    if session is None or any(k == b"x-session-id" for k, _ in headers):
        return None
    return session


def _authorization(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    return next((v for k, v in headers if k == b"authorization"), None)
