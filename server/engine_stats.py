"""Engine stats: each live worker's ``GET /stats``, pulled into the status snapshot.

flockctl's engine answers ``/stats`` with its scheduler's view: queue lengths per MLFQ level,
running/waiting/swapped counts, preemptions, KV use, device memory and its jobs. Any other server
(vLLM, TGI, ...) answers 404 or something that is not an engine's stats; that is normal, not an
error, and such a worker is asked again only every ``recheck_seconds`` (it may be replaced by an
engine behind the same URL).

An engine's ``capacity`` (requests it takes at once) becomes the worker's capacity at the balancer
unless ``--worker-capacity`` was given.

The pull belongs with the readiness probe (same HTTP client, same timeout and cadence) but runs in
tasks of its own, one at most per worker, so a slow ``/stats`` never delays a probe. When pulls
fail, the last good stats stay in the snapshot marked ``engine_stale`` until
``failure_threshold`` pulls in a row have failed; then they are cleared, with a warning unless
the worker is DRAINING (it is being stopped, so its engine going quiet is no fault).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from enum import Enum
from functools import partial
from typing import Any, cast

import httpx

from flockctl.schema import EngineView, GpuMemory
from flockctl.server.config import ProbeConfig
from flockctl.server.gpus import discover
from flockctl.server.pool import WorkerPool
from flockctl.server.prober import read_capped, short_error
from flockctl.server.workers import TERMINAL, Worker, WorkerState

log = logging.getLogger("flockctl.stats")

S = WorkerState
STATS_PATH = "/stats"
#: States whose workers run an engine worth asking: serving, failing probes, or draining.
PULLED = frozenset({S.READY, S.NOT_READY, S.DRAINING})
#: Jobs kept per worker in the snapshot (the engine's order); the rest are counted.
MAX_JOBS = 100
#: A ``/stats`` body larger than this is not read.
MAX_BODY = 4 << 20


class Outcome(str, Enum):
    OK = "ok"
    NOT_ENGINE = "not_engine"  # no /stats of flockctl's engine there: ask again much later
    FAILED = "failed"  # no answer, or a server error: keep the last stats for a while


def engine_view(payload: Any, max_jobs: int = MAX_JOBS) -> EngineView | None:
    """The engine's stats as the snapshot carries them, or None when ``payload`` is not the
    ``/stats`` of flockctl's engine.

    ``jobs`` keeps the engine's order, capped at ``max_jobs``; ``jobs_omitted`` says how many
    were left out so a reader knows the list is partial.
    """
    if not isinstance(payload, dict):
        return None
    if payload.get("engine") != "flockctl" and not (
        "queue_lengths" in payload and "jobs" in payload
    ):
        return None
    jobs = payload.get("jobs")
    jobs = [job for job in jobs if isinstance(job, dict)] if isinstance(jobs, list) else []
    view = dict(payload)
    view["jobs"] = jobs[:max_jobs]
    view["jobs_omitted"] = max(0, len(jobs) - max_jobs)
    # another process's JSON, taken as the declared view: its readers treat every key as optional
    return cast(EngineView, view)


def gpu_memory_of(
    stats: EngineView, nvml_index: Mapping[str, int] | None = None
) -> GpuMemory | None:
    """``{"used", "total", "device", "source"}`` from the stats' ``device``, or None.

    A CUDA engine names its GPU by UUID; ``nvml_index`` (UUID to NVML's index, as nvidia-smi
    numbers the GPUs here) turns it into ``cuda:2`` for the GPU it really is, whatever index
    the engine's ``CUDA_VISIBLE_DEVICES`` gave it. A GPU this machine does not know (a remote
    worker) keeps the engine's own index.
    """
    device = stats.get("device")
    if not isinstance(device, dict):
        return None
    kind, uuid, index = _text(device.get("type")), device.get("uuid"), device.get("index")
    if isinstance(uuid, str) and nvml_index and uuid in nvml_index:
        index = nvml_index[uuid]
    label = f"{kind}:{index}" if kind and isinstance(index, int) else kind
    return {
        "used": _number(device.get("memory_used")),
        "total": _number(device.get("memory_total")),
        "device": label,
        "source": _text(device.get("source")),
    }


def nvml_indices() -> dict[str, int]:
    """Each GPU's NVML index by UUID on this machine (empty without NVML)."""
    return {gpu.uuid: gpu.index for gpu in discover()}


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class StatsPuller:
    """Keeps ``Worker.engine`` and ``Worker.gpu_memory`` of every live worker current."""

    def __init__(
        self,
        pool: WorkerPool,
        config: ProbeConfig,
        client: httpx.AsyncClient,
        recheck_seconds: float = 60.0,
        max_jobs: int = MAX_JOBS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.config = config
        self.client = client
        self.recheck_seconds = recheck_seconds
        self.max_jobs = max_jobs
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._pulls: dict[str, asyncio.Task[Outcome]] = {}
        self._not_before: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        #: NVML's index of each GPU by UUID, read once when an engine first reports a device.
        self._nvml_index: dict[str, int] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-stats")

    async def close(self) -> None:
        tasks = [*self._pulls.values(), *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pulls.clear()
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # pragma: no cover - a bug must not stop the stats for good
                log.exception("engine stats round failed")
            await asyncio.sleep(self.config.interval_seconds)

    def tick(self) -> None:
        """Start a pull for every live worker that is due and has none under way."""
        now = self.clock()
        present: set[str] = set()
        for worker in self.pool:
            present.add(worker.id)
            if worker.state in TERMINAL:
                _clear(worker)  # whatever it ran is gone
            if worker.state not in PULLED or not worker.url:
                continue
            if worker.id in self._pulls or now < self._not_before.get(worker.id, 0.0):
                continue
            task = asyncio.create_task(self.pull(worker), name=f"stats-{worker.id}")
            self._pulls[worker.id] = task
            task.add_done_callback(partial(self._pull_done, worker.id))
        for table in (self._not_before, self._failures):
            for worker_id in [k for k in table if k not in present]:
                del table[worker_id]

    def _pull_done(self, worker_id: str, _task: asyncio.Task[Outcome]) -> None:
        self._pulls.pop(worker_id, None)

    async def pull(self, worker: Worker) -> Outcome:
        """Ask ``worker`` for its stats once and record what came back."""
        outcome, stats, detail = await self.fetch(f"{worker.url}{STATS_PATH}")
        if worker.state not in PULLED:
            _clear(worker)
            return outcome
        if outcome == Outcome.OK:
            assert stats is not None
            if worker.engine is None:
                log.info(
                    "worker %s runs flockctl's engine (model %s, scheduler %s)",
                    worker.id,
                    stats.get("model"),
                    stats.get("scheduler"),
                )
            worker.engine = stats
            self._take_capacity(worker, stats)
            if self._nvml_index is None:
                self._nvml_index = nvml_indices()
            worker.gpu_memory = gpu_memory_of(stats, self._nvml_index)
            worker.engine_at = time.time()
            worker.engine_stale = False
            self._failures.pop(worker.id, None)
            self._not_before.pop(worker.id, None)
        elif outcome == Outcome.NOT_ENGINE:
            if worker.id not in self._not_before:
                log.info(
                    "worker %s has no engine stats at %s (%s); asking again every %gs",
                    worker.id,
                    STATS_PATH,
                    detail,
                    self.recheck_seconds,
                )
            _clear(worker, keep_memory=worker.engine is None)
            self._failures.pop(worker.id, None)
            self._not_before[worker.id] = self.clock() + self.recheck_seconds
        else:
            failures = self._failures.get(worker.id, 0) + 1
            self._failures[worker.id] = failures
            if worker.engine is not None:
                worker.engine_stale = True
                if failures >= self.config.failure_threshold:
                    # A DRAINING worker is being stopped on purpose: that its engine stops
                    # answering is expected, not a fault worth a warning.
                    if worker.state != S.DRAINING:
                        log.warning(
                            "worker %s: dropping its engine stats after %d failed pulls: %s",
                            worker.id,
                            failures,
                            detail,
                        )
                    _clear(worker)
        return outcome

    def _take_capacity(self, worker: Worker, stats: EngineView) -> None:
        """The requests the engine takes at once (its running batch plus its waiting room, more
        it refuses with 429): the balancer queues the rest instead of sending them to a 429."""
        cap = stats.get("capacity")
        reported = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None
        if reported != worker.reported_capacity:
            if worker.capacity_flag is None:
                log.info("worker %s takes %s requests at once (its /stats)", worker.id, reported)
            worker.reported_capacity = reported
            self.pool.capacity_changed(worker)

    async def fetch(self, url: str) -> tuple[Outcome, EngineView | None, str]:
        """GET ``url``: the outcome, the stats when there are some, and what happened."""
        cfg = self.config
        try:
            status, body = await asyncio.wait_for(self._get(url), cfg.timeout_seconds)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return Outcome.FAILED, None, f"no answer within {cfg.timeout_seconds:g}s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return Outcome.FAILED, None, short_error(exc)
        if status >= 500 or status in (408, 429):
            return Outcome.FAILED, None, f"HTTP {status}"
        if status != 200:
            return Outcome.NOT_ENGINE, None, f"HTTP {status}"
        if body is None:
            return Outcome.NOT_ENGINE, None, f"a body over {MAX_BODY} bytes"
        try:
            payload = json.loads(body)
        except ValueError:  # not JSON, or not UTF-8
            return Outcome.NOT_ENGINE, None, "not JSON"
        stats = engine_view(payload, self.max_jobs)
        if stats is None:
            return Outcome.NOT_ENGINE, None, "JSON that is not flockctl engine stats"
        return Outcome.OK, stats, "HTTP 200"

    async def _get(self, url: str) -> tuple[int, bytes | None]:
        """The status and, for a 200, the body (None when it is over ``MAX_BODY``)."""
        cfg = self.config
        timeout = httpx.Timeout(cfg.timeout_seconds)
        headers = cfg.headers or None
        async with self.client.stream("GET", url, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                return resp.status_code, None
            return resp.status_code, await _read_capped(resp)


async def _read_capped(resp: httpx.Response) -> bytes | None:
    """The body, or None when it is larger than ``MAX_BODY`` (said or sent: a body is never
    read past the cap)."""
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        return None
    body, whole = await read_capped(resp, MAX_BODY)
    return body if whole else None


def _clear(worker: Worker, keep_memory: bool = False) -> None:
    """Forget what ``worker``'s engine said; ``keep_memory`` keeps ``gpu_memory`` when it was
    not the engine's (the local provisioner reads a non-engine worker's GPUs itself)."""
    worker.engine = None
    if not keep_memory:
        worker.gpu_memory = None
    worker.engine_at = None
    worker.engine_stale = False
