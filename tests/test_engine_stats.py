"""Engine stats: the daemon pulls each live worker's /stats into the status snapshot.

A fake worker serving a JSON file at /stats stands in for flockctl's engine; the fake without
that file is any other OpenAI server (404 at /stats).
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from conftest import until
from fake_worker import build_app
from rich.console import Console

from flockctl.render import status_view
from flockctl.server import engine_stats
from flockctl.server.config import ProbeConfig
from flockctl.server.engine_stats import (
    Outcome,
    StatsPuller,
    engine_view,
    gpu_memory_of,
)
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.prober import probe_client
from flockctl.server.workers import Worker, WorkerState

S = WorkerState

STATS = {
    "engine": "flockctl",
    "version": "0.1.0",
    "model": "demo",
    "scheduler": "mlfq",
    "device": {
        "type": "cpu",
        "name": "x86_64",
        "memory_used": 123456789,
        "memory_total": 25000000000,
        "source": "psutil",
    },
    "max_batch_size": 8,
    "queue_lengths": [3, 1, 0, 0],
    "running": 2,
    "waiting": 3,
    "swapped": 1,
    "preemptions_total": {"descheduled": 4, "swapped": 1, "recomputed": 0},
    "kv": {"budget_tokens": 65536, "used_tokens": 1234, "host_tokens": 200},
    "jobs": [
        {
            "id": "job-10",
            "state": "running",
            "level": 0,
            "preemptions": 0,
            "prompt_tokens": 12,
            "generated_tokens": 5,
            "age": 1.234,
        },
        {
            "id": "job-2",
            "state": "swapped",
            "level": 2,
            "preemptions": 3,
            "prompt_tokens": 40,
            "generated_tokens": 17,
            "age": 75.5,
        },
    ],
}


def stats_file(tmp_path: Path, stats: dict | None = None, name: str = "stats.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(STATS if stats is None else stats))
    return path


def counted(app: web.Application, hits: list[str]) -> web.Application:
    """Record the path of every request ``app`` gets."""

    @web.middleware
    async def count(request: web.Request, handler):
        hits.append(request.path)
        return await handler(request)

    app.middlewares.append(count)
    return app


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ready_worker(url: str, worker_id: str = "w1") -> tuple[WorkerPool, Worker]:
    pool = WorkerPool(make_policy("least-connection"), capacity=4, max_queue=4)
    worker = Worker(id=worker_id, provisioner="static", url=url)
    pool.add(worker)
    for state in (S.PROVISIONING, S.STARTING, S.READY):
        pool.set_state(worker, state)
    return pool, worker


@pytest.fixture
async def probes() -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's own client for probes and stats pulls."""
    async with probe_client() as client:
        yield client


# -- what the snapshot keeps of an engine's answer ---------------------------------------------


def test_engine_view_keeps_the_engine_order_and_caps_jobs():
    stats = copy.deepcopy(STATS)
    stats["jobs"] = [{"id": f"job-{i}", "state": "waiting"} for i in range(5, 0, -1)]
    view = engine_view(stats, max_jobs=3)
    assert [j["id"] for j in view["jobs"]] == ["job-5", "job-4", "job-3"]
    assert view["jobs_omitted"] == 2
    assert view["queue_lengths"] == [3, 1, 0, 0] and view["kv"]["used_tokens"] == 1234
    assert stats["jobs"][0]["id"] == "job-5" and len(stats["jobs"]) == 5  # input untouched


def test_other_json_is_not_engine_stats():
    assert engine_view({"object": "list", "data": []}) is None
    assert engine_view([STATS]) is None
    assert engine_view("flockctl") is None
    # An engine that omits its name is still recognised by its scheduler fields.
    unnamed = {k: v for k, v in STATS.items() if k != "engine"}
    assert engine_view(unnamed)["model"] == "demo"


def test_gpu_memory_comes_from_the_device_and_may_be_unknown():
    assert gpu_memory_of(STATS) == {
        "used": 123456789,
        "total": 25000000000,
        "device": "cpu",
        "source": "psutil",
    }
    unknown = {"device": {"type": "mps", "memory_used": None, "memory_total": "lots"}}
    assert gpu_memory_of(unknown) == {"used": None, "total": None, "device": "mps", "source": None}
    assert gpu_memory_of({"engine": "flockctl"}) is None


# -- the daemon --------------------------------------------------------------------------------


async def test_status_carries_engine_stats_and_asks_a_plain_worker_rarely(
    daemon, upstream, http, tmp_path
):
    engine = await upstream(build_app("e", 4, 0.0, None, engine_stats=stats_file(tmp_path)))
    plain_hits: list[str] = []
    plain = await upstream(counted(build_app("p", 4, 0.0, None), plain_hits))
    d = await daemon(endpoints=[engine.url, plain.url])
    await d.wait_ready(2)
    pool = d.deployment.pool
    await until(lambda: any(w.engine for w in pool), "engine stats")
    # Probed all along (more than ten times), the plain worker is asked for /stats once.
    await until(lambda: plain_hits.count("/health") > 10, "ten probes of the plain worker")
    assert plain_hits.count("/stats") == 1

    async with http.get(f"{d.url}/-/status", headers=d.admin) as resp:
        snap = await resp.json()
    assert snap["schema"] == 4
    by_url = {w["url"]: w for w in snap["workers"]}
    e, p = by_url[engine.url], by_url[plain.url]
    assert e["engine"]["model"] == "demo" and e["engine"]["scheduler"] == "mlfq"
    assert e["engine"]["queue_lengths"] == [3, 1, 0, 0]
    assert (e["engine"]["running"], e["engine"]["waiting"], e["engine"]["swapped"]) == (2, 3, 1)
    assert [j["id"] for j in e["engine"]["jobs"]] == ["job-10", "job-2"]
    assert e["engine"]["jobs"][1] == STATS["jobs"][1]
    assert e["gpu_memory"] == {
        "used": 123456789,
        "total": 25000000000,
        "device": "cpu",
        "source": "psutil",
    }
    assert e["engine_stale"] is False and e["engine_at"] <= snap["generated_at"]
    assert p["engine"] is None and p["gpu_memory"] is None and p["engine_at"] is None


async def test_stats_follow_the_engine(daemon, upstream, tmp_path):
    path = stats_file(tmp_path)
    engine = await upstream(build_app("e", 4, 0.0, None, engine_stats=path))
    d = await daemon(endpoints=[engine.url])
    await d.wait_ready(1)
    (worker,) = d.deployment.pool
    await until(lambda: worker.engine is not None, "engine stats")
    changed = {**STATS, "running": 0, "waiting": 0, "jobs": []}
    path.write_text(json.dumps(changed))
    await until(lambda: worker.engine["running"] == 0, "fresh stats")
    assert worker.engine["jobs"] == []


# -- one worker's pulls, step by step ----------------------------------------------------------


async def test_failed_pulls_keep_stats_marked_stale_then_drop_them(upstream, probes, tmp_path):
    path = stats_file(tmp_path)
    engine = await upstream(build_app("e", 4, 0.0, None, engine_stats=path))
    pool, worker = ready_worker(engine.url)
    puller = StatsPuller(pool, ProbeConfig(failure_threshold=3, timeout_seconds=2), probes)

    assert await puller.pull(worker) == Outcome.OK
    assert worker.engine["model"] == "demo" and not worker.engine_stale
    first_at = worker.engine_at

    path.unlink()  # the engine answers 503 now
    assert await puller.pull(worker) == Outcome.FAILED
    assert worker.engine_stale and worker.engine["model"] == "demo"
    assert worker.engine_at == first_at and worker.gpu_memory["device"] == "cpu"
    assert await puller.pull(worker) == Outcome.FAILED
    assert worker.engine is not None
    assert await puller.pull(worker) == Outcome.FAILED
    assert worker.engine is None and worker.gpu_memory is None and worker.engine_at is None

    stats_file(tmp_path)
    assert await puller.pull(worker) == Outcome.OK
    assert worker.engine is not None and not worker.engine_stale


async def test_a_worker_without_engine_stats_is_asked_again_only_after_recheck(upstream, probes):
    hits: list[str] = []
    plain = await upstream(counted(build_app("p", 4, 0.0, None), hits))
    pool, worker = ready_worker(plain.url)
    clock = Clock()
    puller = StatsPuller(pool, ProbeConfig(), probes, recheck_seconds=60, clock=clock)

    async def tick_and_settle() -> None:
        puller.tick()
        await asyncio.gather(*puller._pulls.values())

    await tick_and_settle()
    assert hits == ["/stats"] and worker.engine is None
    clock.now += 59
    await tick_and_settle()
    assert hits == ["/stats"]
    clock.now += 2
    await tick_and_settle()
    assert hits == ["/stats", "/stats"]


async def test_what_counts_as_no_engine_and_what_as_a_failure(upstream, probes):
    async def text(_req: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def listing(_req: web.Request) -> web.Response:
        return web.json_response([1, 2])

    async def broken(_req: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_get("/text/stats", text)
    app.router.add_get("/list/stats", listing)
    app.router.add_get("/broken/stats", broken)
    up = await upstream(app)
    pool, _ = ready_worker(up.url)
    puller = StatsPuller(pool, ProbeConfig(timeout_seconds=2), probes)
    for prefix, expected in (
        ("/text", Outcome.NOT_ENGINE),
        ("/list", Outcome.NOT_ENGINE),
        ("/missing", Outcome.NOT_ENGINE),
        ("/broken", Outcome.FAILED),
    ):
        outcome, stats, detail = await puller.fetch(f"{up.url}{prefix}/stats")
        assert (outcome, stats) == (expected, None), (prefix, detail)
    outcome, _, detail = await puller.fetch("http://127.0.0.1:9/stats")
    assert (outcome, detail) == (Outcome.FAILED, "connection refused")


async def test_stats_bodies_past_the_cap_are_not_read_and_a_trickle_times_out(
    upstream, probes, monkeypatch
):
    monkeypatch.setattr(engine_stats, "MAX_BODY", 1024)
    big = json.dumps({**STATS, "padding": "x" * 2048})

    async def said(_req: web.Request) -> web.Response:
        return web.Response(text=big, content_type="application/json")

    async def streamed(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()  # no length said: the cap is found while reading
        await resp.prepare(req)
        for start in range(0, len(big), 256):
            await resp.write(big[start : start + 256].encode())
        await resp.write_eof()
        return resp

    async def trickle(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(req)
        for _ in range(600):  # one byte at a time, each well within a read timeout
            await resp.write(b" ")
            await asyncio.sleep(0.1)
        return resp

    app = web.Application()
    app.router.add_get("/said/stats", said)
    app.router.add_get("/streamed/stats", streamed)
    app.router.add_get("/trickle/stats", trickle)
    up = await upstream(app)
    pool, _ = ready_worker(up.url)
    puller = StatsPuller(pool, ProbeConfig(timeout_seconds=1), probes)
    for prefix in ("/said", "/streamed"):
        assert await puller.fetch(f"{up.url}{prefix}/stats") == (
            Outcome.NOT_ENGINE,
            None,
            "a body over 1024 bytes",
        ), prefix
    assert await puller.fetch(f"{up.url}/trickle/stats") == (
        Outcome.FAILED,
        None,
        "no answer within 1s",
    )


async def test_draining_workers_are_pulled_and_ended_ones_cleared(upstream, probes, tmp_path):
    hits: list[str] = []
    app = counted(build_app("e", 4, 0.0, None, engine_stats=stats_file(tmp_path)), hits)
    engine = await upstream(app)
    pool, worker = ready_worker(engine.url)
    puller = StatsPuller(pool, ProbeConfig(), probes)
    pool.set_state(worker, S.DRAINING)
    puller.tick()
    await asyncio.gather(*puller._pulls.values())
    assert hits == ["/stats"] and worker.engine is not None
    pool.set_state(worker, S.TERMINATED)
    puller.tick()
    assert not puller._pulls and worker.engine is None and worker.gpu_memory is None


async def test_a_draining_worker_going_quiet_is_no_warning(upstream, probes, tmp_path, caplog):
    engines = {}
    for worker_id in ("w1", "w2"):
        path = stats_file(tmp_path, name=f"{worker_id}.json")
        up = await upstream(build_app(worker_id, 4, 0.0, None, engine_stats=path))
        pool, worker = ready_worker(up.url, worker_id)
        puller = StatsPuller(pool, ProbeConfig(failure_threshold=1, timeout_seconds=2), probes)
        assert await puller.pull(worker) == Outcome.OK
        path.unlink()  # the engine stops answering /stats (503)
        engines[worker_id] = (pool, worker, puller)
    pool, w2, puller = engines["w2"]
    pool.set_state(w2, S.DRAINING)  # being stopped on purpose
    with caplog.at_level(logging.INFO, logger="flockctl.stats"):
        for _pool, worker, puller in engines.values():
            assert await puller.pull(worker) == Outcome.FAILED
            assert worker.engine is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("worker w1: dropping its engine stats")


# -- the human view ----------------------------------------------------------------------------


def snapshot_with(workers: list[dict]) -> dict:
    now = 1_700_000_000.0
    return {
        "schema": 1,
        "generated_at": now,
        "deployment": {
            "name": "default",
            "endpoint": "http://127.0.0.1:3000",
            "provisioner": "local",
            "policy": "least-connection",
            "started_at": now - 60,
        },
        "autoscaler": None,
        "requests": {
            "total": 0,
            "in_flight": 0,
            "queued": 0,
            "failed": 0,
            "retried": 0,
            "rate": 0.0,
        },
        "workers": [
            {
                "provisioner": "local",
                "state": "READY",
                "reason": None,
                "url": "http://127.0.0.1:1",
                "pid": 1,
                "in_flight": 0,
                "served": 0,
                "failures": 0,
                "latency_p50_ms": None,
                "created_at": now - 30,
                "gpu_memory": None,
                "engine": None,
                "engine_at": None,
                "engine_stale": False,
                **w,
            }
            for w in workers
        ],
    }


def render(snap: dict) -> str:
    out = io.StringIO()
    Console(file=out, width=200, no_color=True).print(status_view(snap))
    return out.getvalue()


def test_status_view_lists_jobs_by_worker_then_job_with_state_words():
    now = 1_700_000_000.0
    memory = gpu_memory_of(STATS)
    stats = engine_view(STATS)
    snap = snapshot_with(
        [
            {"id": "w10", "engine": stats, "gpu_memory": memory, "engine_at": now - 1},
            {"id": "w2", "engine": stats, "gpu_memory": memory, "engine_at": now - 1},
            {"id": "w3"},  # not an engine: no line, no jobs
        ]
    )
    text = render(snap)
    rows = [line.split() for line in text.splitlines() if "job-" in line]
    assert [(r[0], r[1]) for r in rows] == [
        ("w2", "job-2"),
        ("w2", "job-10"),
        ("w10", "job-2"),
        ("w10", "job-10"),
    ]
    # worker, job, glyph + state word, level, generated, preemptions, speculation, age
    assert rows[0] == ["w2", "job-2", "◌", "swapped", "2", "17", "3", "-", "1m15s"]
    assert rows[1] == ["w2", "job-10", "▶", "running", "0", "5", "0", "-", "1.2s"]
    header = next(line for line in text.splitlines() if "JOB" in line).split()
    assert header == ["WORKER", "JOB", "STATE", "LEVEL", "GENERATED", "PREEMPTIONS", "SPEC", "AGE"]
    # Per engine worker: model, scheduler, device, queue per level, run/wait/swap, preemptions,
    # speculation (none here), device memory used/total.
    engines = [line.split() for line in text.splitlines() if "mlfq" in line]
    row = ["demo", "mlfq", "cpu", "3", "1", "0", "0", "2", "3", "1", "5", "-", "0.1/23.3", "GiB"]
    assert engines == [["w2", *row], ["w10", *row]]
    assert "stale" not in text


def test_status_view_marks_stale_stats_and_skips_engine_part_without_engines():
    now = 1_700_000_000.0
    stale = {
        "id": "w1",
        "engine": {**engine_view(STATS), "jobs": []},
        "engine_at": now - 12,
        "engine_stale": True,
    }
    text = render(snapshot_with([stale]))
    assert "⚠ w1: engine stats are stale (last pulled 12s ago" in text
    assert "no jobs" in text
    plain = render(snapshot_with([{"id": "w1"}]))
    assert "QUEUES" not in plain and "JOB" not in plain
