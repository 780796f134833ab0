"""The readiness prober: one loop per worker, SkyServe's probe semantics.

- STARTING: failures are expected and ignored until ``initial_delay_seconds`` have passed since
  the worker started; the first success makes it READY; still failing after that: FAILED.
- READY: ``failure_threshold`` consecutive failures make it NOT_READY.
- NOT_READY: one success makes it READY again.

The balancer can ask for an early probe (``poke``) when a request to a worker fails to connect.

Latency probes, for a balancing policy that asks for them (``--policy latency``): a second loop
per worker sends a READY worker a one-token completion when the policy says it is due (it went
``--latency-probe-interval`` seconds without an answer to measure, being idle or avoided as
slow) and tells the policy how long it took. At most one is in flight per worker; one that gets
no answer within ``LATENCY_PROBE_TIMEOUT`` counts as that slow. Probes go through the probe
client, not the balancer: they are not served requests, not in the request log or its metrics.

Probes and engine-stats pulls share one ``httpx.AsyncClient`` (``probe_client``): a fresh
connection for every probe (a worker that stopped accepting is found at once, not through a stale
kept-alive socket), a bounded number at a time, and one deadline for a whole probe, so a worker
that trickles its answer cannot hold a probe past ``timeout_seconds``. The relaying of requests
has its own client (``flockctl.server.upstream``), made for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from typing import Any

import httpx

from flockctl.server.config import ProbeConfig
from flockctl.server.pool import WorkerPool
from flockctl.server.workers import Worker, WorkerState

log = logging.getLogger("flockctl.prober")

S = WorkerState
PROBED = frozenset({S.STARTING, S.READY, S.NOT_READY})
#: Bytes of a probe's answer read at most (a readiness answer is small; a phase fits easily).
MAX_PROBE_BODY = 8192
STARTING_SAYS = "starting: "
#: Probes and stats pulls in flight at once, over all workers (more wait for a free slot).
MAX_PROBE_CONNECTIONS = 64
#: Where an OpenAI-compatible server lists the models it serves.
MODELS_PATH = "/v1/models"
#: Bytes of a ``/v1/models`` answer read at most.
MAX_MODELS_BODY = 256 * 1024
#: Where a latency probe is sent (OpenAI's completions; flockctl's engine answers it too).
LATENCY_PROBE_PATH = "/v1/completions"
#: Seconds a latency probe may wait for its answer; one that gets none counts as this slow.
LATENCY_PROBE_TIMEOUT = 30.0
#: Bytes of a latency probe's answer read at most (the rest is not waited for).
MAX_LATENCY_PROBE_BODY = 64 * 1024


def probe_client(max_connections: int = MAX_PROBE_CONNECTIONS) -> httpx.AsyncClient:
    """The daemon's client for probes and stats pulls (each call passes its own timeout).

    No connection is kept alive between two probes; proxies from the environment are ignored
    (workers are reached directly) and redirects are not followed (a probe judges the answer
    it gets).
    """
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
        timeout=httpx.Timeout(10.0),
        trust_env=False,
        follow_redirects=False,
    )


async def read_capped(resp: httpx.Response, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of a streamed response's body, and whether that is all of it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks)[:cap], False
    return b"".join(chunks), True


def short_error(exc: BaseException) -> str:
    """One line saying why a request to a worker got no answer."""
    if isinstance(exc, httpx.ConnectError):
        cause = _os_error(exc)
        if cause is not None and cause.errno == errno.ECONNREFUSED:
            return "connection refused"
        return f"cannot connect: {cause or exc}".splitlines()[0][:200]
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _os_error(exc: BaseException) -> OSError | None:
    """The system's own error behind ``exc`` (httpx wraps it, and may wrap it twice)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


class Prober:
    def __init__(self, pool: WorkerPool, config: ProbeConfig, client: httpx.AsyncClient):
        self.pool = pool
        self.config = config
        self.client = client
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pokes: dict[str, asyncio.Event] = {}
        #: Each worker's latency probe loop, while the balancing policy asks for probes.
        self._speed: dict[str, asyncio.Task[None]] = {}
        #: Workers whose latency probes failed (told once in the log, until one passes again).
        self._speed_failing: set[str] = set()
        #: Workers whose ``/v1/models`` was asked once already (the answer does not change).
        self._listed: set[str] = set()

    def watch(self, worker: Worker) -> None:
        """Start probing ``worker`` (idempotent); the loop ends when the worker leaves PROBED."""
        task = self._tasks.get(worker.id)
        if task is not None and not task.done():
            return
        self._pokes[worker.id] = asyncio.Event()
        self._tasks[worker.id] = asyncio.create_task(self._loop(worker), name=f"probe-{worker.id}")
        speed = self._speed.get(worker.id)
        if self.pool.policy.probe_due_in(worker) is not None and (speed is None or speed.done()):
            self._speed[worker.id] = asyncio.create_task(
                self._latency_loop(worker), name=f"latency-probe-{worker.id}"
            )

    def poke(self, worker: Worker) -> None:
        """Probe ``worker`` now instead of at its next interval."""
        event = self._pokes.get(worker.id)
        if event is not None:
            event.set()

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._speed.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._speed.clear()

    async def latency_probe(self, worker: Worker) -> float | None:
        """Seconds a one-token completion on ``worker`` took (``LATENCY_PROBE_TIMEOUT`` when
        it got no answer in that time); None when it failed (an error status, no connection):
        that says nothing of the worker's speed."""
        body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
        model = worker.model or (worker.models[0] if worker.models else None)
        if model is not None:
            body["model"] = model
        started = time.monotonic()
        try:
            status = await asyncio.wait_for(self._post_probe(worker, body), LATENCY_PROBE_TIMEOUT)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return LATENCY_PROBE_TIMEOUT
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            self._speed_failed(worker, short_error(exc))
            return None
        if not 200 <= status < 300:
            self._speed_failed(worker, f"HTTP {status}")
            return None
        self._speed_failing.discard(worker.id)
        return time.monotonic() - started

    async def _post_probe(self, worker: Worker, body: dict[str, Any]) -> int:
        url = f"{worker.url}{LATENCY_PROBE_PATH}"
        timeout = httpx.Timeout(LATENCY_PROBE_TIMEOUT)
        async with self.client.stream(
            "POST", url, json=body, headers=self.config.headers or None, timeout=timeout
        ) as resp:
            await read_capped(resp, MAX_LATENCY_PROBE_BODY)
            return resp.status_code

    def _speed_failed(self, worker: Worker, detail: str) -> None:
        if worker.id not in self._speed_failing:
            self._speed_failing.add(worker.id)
            log.warning(
                "worker %s: latency probe (POST %s) failed: %s; its estimate decays while"
                " it is idle instead",
                worker.id,
                LATENCY_PROBE_PATH,
                detail,
            )

    async def _latency_loop(self, worker: Worker) -> None:
        """Probe ``worker`` whenever the balancing policy says it is due, while it is probed."""
        try:
            while worker.state in PROBED and worker.url:
                policy = self.pool.policy
                if worker.state != S.READY:  # not taking requests: nothing to route by
                    await asyncio.sleep(self.config.interval_seconds)
                    continue
                due = policy.probe_due_in(worker)
                if due is None:
                    return
                if due > 0:
                    await asyncio.sleep(due)
                    continue
                policy.probe_started(worker)
                seconds = await self.latency_probe(worker)
                policy.observe_probe(worker, seconds)
        finally:
            if self._speed.get(worker.id) is asyncio.current_task():
                del self._speed[worker.id]
            self._speed_failing.discard(worker.id)

    async def probe_once(self, worker: Worker) -> tuple[bool, str]:
        """One probe: (success, what happened). A starting server that answers with a phase
        (flockctl's engine: 503 ``{"status": "starting", "phase": ...}``) is quoted."""
        cfg = self.config
        try:
            status, body = await asyncio.wait_for(self._request(worker), cfg.timeout_seconds)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return False, f"no answer within {cfg.timeout_seconds:g}s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return False, short_error(exc)
        ok = 200 <= status < 300
        phase = None if ok else _starting_phase(body)
        return ok, f"HTTP {status}" + (f" ({STARTING_SAYS}{phase})" if phase else "")

    async def list_models(self, worker: Worker) -> None:
        """Record the models ``worker``'s ``/v1/models`` lists (OpenAI's shape). A server that
        does not answer it keeps only the model it was started with, or none: then it may be
        sent any model."""
        try:
            names = await asyncio.wait_for(self._models(worker), self.config.timeout_seconds)
        except (asyncio.TimeoutError, httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            log.info("worker %s: no model list at %s (%s)", worker.id, MODELS_PATH, exc)
            names = []
        worker.learn_models(names)
        self.pool.models_changed()
        if worker.models:
            log.info("worker %s serves %s", worker.id, ", ".join(worker.models))

    async def _models(self, worker: Worker) -> list[str]:
        timeout = httpx.Timeout(self.config.timeout_seconds)
        url = f"{worker.url}{MODELS_PATH}"
        async with self.client.stream(
            "GET", url, headers=self.config.headers or None, timeout=timeout
        ) as resp:
            if resp.status_code != 200:
                raise ValueError(f"HTTP {resp.status_code}")
            body, whole = await read_capped(resp, MAX_MODELS_BODY)
        if not whole:
            raise ValueError(f"a body over {MAX_MODELS_BODY} bytes")
        return model_ids(json.loads(body))

    async def _request(self, worker: Worker) -> tuple[int, bytes]:
        """The probe's status and the start of its body (``MAX_PROBE_BODY`` bytes at most)."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "headers": cfg.headers or None,
            "timeout": httpx.Timeout(cfg.timeout_seconds),
        }
        method = "GET"
        if cfg.post_data is not None:
            method, kwargs["json"] = "POST", cfg.post_data
        async with self.client.stream(method, f"{worker.url}{cfg.path}", **kwargs) as resp:
            body, _ = await read_capped(resp, MAX_PROBE_BODY)
            return resp.status_code, body

    async def _loop(self, worker: Worker) -> None:
        cfg = self.config
        poke = self._pokes[worker.id]
        try:
            while worker.state in PROBED and worker.url:
                started = time.monotonic()
                ok, detail = await self.probe_once(worker)
                if worker.state not in PROBED:
                    break
                worker.last_probe = {
                    "at": time.time(),
                    "ok": ok,
                    "detail": detail,
                    "ms": round((time.monotonic() - started) * 1000, 2),
                }
                worker.probe_history.append(worker.last_probe)
                if ok and worker.state != S.READY and worker.id not in self._listed:
                    # Before it takes requests: routing by model needs to know what it serves.
                    self._listed.add(worker.id)
                    await self.list_models(worker)
                    if worker.state not in PROBED:
                        break
                self._apply(worker, ok, detail)
                poke.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(poke.wait(), cfg.interval_seconds)
        finally:
            self._pokes.pop(worker.id, None)
            self._tasks.pop(worker.id, None)
            self._listed.discard(worker.id)

    def _apply(self, worker: Worker, ok: bool, detail: str) -> None:
        cfg = self.config
        if ok:
            worker.probe_failures = 0
            if worker.state in (S.STARTING, S.NOT_READY):
                log.info("worker %s is READY (%s)", worker.id, worker.url)
                self.pool.set_state(worker, S.READY)
            return
        worker.probe_failures += 1
        if worker.state == S.STARTING:
            waited = time.time() - (worker.started_at or worker.created_at)
            worker.reason = _starting_reason(detail, cfg.path)
            if waited > cfg.initial_delay_seconds:
                reason = (
                    f"not READY after {cfg.initial_delay_seconds:g}s"
                    f" (initial_delay_seconds); last probe of {cfg.path}: {detail}"
                )
                log.warning("worker %s FAILED: %s", worker.id, reason)
                self.pool.set_state(worker, S.FAILED, reason)
        elif worker.state == S.READY and worker.probe_failures >= cfg.failure_threshold:
            reason = f"{worker.probe_failures} probes of {cfg.path} failed in a row: {detail}"
            log.warning("worker %s is NOT_READY: %s", worker.id, reason)
            self.pool.set_state(worker, S.NOT_READY, reason)


def model_ids(payload: Any) -> list[str]:
    """The ids in an OpenAI ``/v1/models`` answer (``{"data": [{"id": ...}, ...]}``)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError("not an OpenAI model list")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _starting_phase(body: bytes) -> str | None:
    """The phase a starting server reports in a JSON body, if it does (one line, bounded)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    phase = data.get("phase") if isinstance(data, dict) else None
    if not isinstance(phase, str) or data.get("status") != "starting":
        return None
    return " ".join(phase.split())[:200] or None


def _starting_reason(detail: str, path: str) -> str:
    """A STARTING worker's reason: what it says it is doing, else that it does not answer yet."""
    _, said, phase = detail.partition(f"({STARTING_SAYS}")
    if said:
        return phase.removesuffix(")")
    if detail.startswith("HTTP "):
        return f"starting; {path} answers {detail}"
    return f"starting; no answer on {path} yet ({detail})"
