"""Faults at the control plane: scale-down that stranded waiting requests, workers stuck
NOT_READY, bounds with no ceiling, and secrets or stale log lines that reached the wrong place."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer
from conftest import FAKE_WORKER, TOKEN, fake_worker_command, until
from fake_worker import build_app
from typer.testing import CliRunner

from flockctl.cli import app as cli_app
from flockctl.server.autoscaler import QueueLengthRunningMean
from flockctl.server.controller import Controller, scale_down_order
from flockctl.server.offline import stop_recorded_workers
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.provisioners import LocalProvisioner
from flockctl.server.provisioners.base import Provisioner
from flockctl.server.provisioners.local import KEY_ENV_VARS
from flockctl.server.workers import Worker, WorkerState

CHAT = "/v1/chat/completions"
S = WorkerState
#: The path every transition takes to reach a state.
_PATH = {
    S.PROVISIONING: [S.PROVISIONING],
    S.STARTING: [S.PROVISIONING, S.STARTING],
    S.READY: [S.PROVISIONING, S.STARTING, S.READY],
    S.NOT_READY: [S.PROVISIONING, S.STARTING, S.READY, S.NOT_READY],
}


def worker(worker_id: str, state: WorkerState, in_flight: int = 0, created: float = 0.0) -> Worker:
    w = Worker(id=worker_id, provisioner="stub", created_at=created)
    for step in _PATH.get(state, []):
        w.transition(step)
    w.in_flight = in_flight
    return w


async def snapshot(d, http) -> dict[str, Any]:
    async with http.get(f"{d.url}/-/status", headers=d.admin) as resp:
        assert resp.status == 200
        return await resp.json()


def launched(d) -> int:
    """How many workers the controller has launched so far (ids are w1, w2, ...)."""
    return d.deployment.controller._seq


# -- scale-down never strands a request --------------------------------------------------------


@pytest.mark.e2e
async def test_a_request_waiting_for_a_slow_worker_is_served_by_the_one_launched_for_it(
    daemon, http
):
    # A server that takes seconds to listen, and a policy that wants to scale down at once: the
    # mean (1 request per worker) is under autoscale_down while the worker starts.
    d = await daemon(
        worker_command=fake_worker_command("--start-delay", "3"),
        min_workers=0,
        max_workers=2,
        upscale_delay=0,
        downscale_delay=0,
        queue_timeout=25,
    )
    controller = d.deployment.controller

    async def ask() -> int:
        async with http.post(f"{d.url}{CHAT}", json={"max_tokens": 2}) as resp:
            return resp.status

    first = asyncio.create_task(ask())
    held = "holding 1: 1 request waiting needs a worker"
    await until(lambda: held in controller.last_decision.reason, "the demand floor", 20)
    snap = await snapshot(d, http)
    (w1,) = snap["workers"]
    assert w1["state"] in ("PROVISIONING", "STARTING"), w1
    assert "kept: 1 request waiting needs a worker" in w1["reason"]
    assert held in snap["autoscaler"]["last_decision"]["reason"]
    assert await first == 200
    assert launched(d) == 1
    # One after another, each served, never more than one launch for one waiting request.
    assert [await ask(), await ask()] == [200, 200]
    assert launched(d) <= 3


async def test_a_worker_coming_up_is_not_scaled_down_while_a_request_waits():
    class Stub(Provisioner):
        name = "stub"

        async def launch(self, w: Worker) -> None:
            w.url = "http://127.0.0.1:9"

        async def terminate(self, w: Worker) -> None:
            pass

    pool = WorkerPool(make_policy("least-connection"), capacity=1, max_queue=10)
    busy, coming = worker("w1", S.READY, created=1), worker("w2", S.STARTING, created=2)
    pool.add(busy)
    pool.add(coming)
    assert pool.try_acquire() is busy
    waiting = asyncio.create_task(pool.acquire(timeout=30))
    await until(lambda: pool.queued == 1, "a waiting request")
    controller = Controller(
        pool, Stub(), QueueLengthRunningMean(0, 2), prober=None, initial_target=2
    )
    controller.target = 1  # the operator lowered max_workers
    controller.reconcile()
    assert coming.state == S.STARTING
    assert busy.state == S.DRAINING
    assert "a worker coming up is not scaled down while requests wait" in coming.to_dict()["reason"]
    waiting.cancel()
    pool.release(busy)  # its request ends, and so does its drain (not 30s later)
    await asyncio.gather(waiting, *controller._tasks, return_exceptions=True)


def test_scale_down_takes_idle_workers_first_and_none_coming_up_while_requests_wait():
    out = worker("out", S.NOT_READY, in_flight=2)
    idle = worker("idle", S.READY, in_flight=0)
    busy = worker("busy", S.READY, in_flight=3)
    less_busy = worker("less", S.READY, in_flight=1)
    starting = worker("starting", S.STARTING)
    pending = worker("pending", S.PENDING)
    live = [busy, starting, idle, less_busy, pending, out]
    assert [w.id for w in scale_down_order(live, waiting=False)] == [
        "out",
        "pending",
        "starting",
        "idle",
        "less",
        "busy",
    ]
    assert [w.id for w in scale_down_order(live, waiting=True)] == ["out", "idle", "less", "busy"]


# -- a worker NOT_READY too long ---------------------------------------------------------------


@pytest.mark.e2e
async def test_a_worker_not_ready_past_replace_after_is_stopped_and_replaced(daemon, tmp_path):
    sick = tmp_path / "sick"
    d = await daemon(
        worker_command=fake_worker_command("--unhealthy-file", str(sick)),
        min_workers=1,
        max_workers=1,
        replace_after=1,
        probe={"interval_seconds": 0.05, "timeout_seconds": 2, "failure_threshold": 1},
    )
    await d.wait_ready(1)
    pool = d.deployment.pool
    w1 = pool.get("w1")
    pid = w1.pid
    sick.touch()
    await until(lambda: pool.get("w2") is not None, "a replacement", 20)
    assert w1.reason == "NOT_READY for 1s (replace_after): replaced by w2"
    assert w1.state in (S.DRAINING, S.TERMINATED)
    assert d.deployment.controller.target == 1
    await until(lambda: w1.state == S.TERMINATED, "the old worker stopped", 20)
    await until(lambda: not psutil.pid_exists(pid), "its process gone", 20)
    sick.unlink()
    await until(lambda: pool.get("w2").state == S.READY, "the replacement READY", 20)
    assert [w.id for w in pool.live()] == ["w2"]


async def test_a_static_endpoint_not_ready_stays_out_of_rotation_until_it_answers(
    daemon, upstream, tmp_path
):
    sick = tmp_path / "sick"
    up = await upstream(build_app("s1", 2, 0.0, sick))
    d = await daemon(
        endpoints=[up.url],
        replace_after=0.5,
        probe={"interval_seconds": 0.05, "timeout_seconds": 2, "failure_threshold": 1},
    )
    await d.wait_ready(1)
    w1 = d.deployment.pool.get("w1")
    sick.touch()
    kept = "NOT_READY for 0.5s; a static endpoint is kept out of rotation until it answers"
    await until(lambda: w1.reason == kept, "the static endpoint's reason", 20)
    assert w1.state == S.NOT_READY
    assert [w.id for w in d.deployment.pool] == ["w1"]
    sick.unlink()
    await until(lambda: w1.state == S.READY, "the endpoint back in rotation", 20)
    assert w1.reason is None


@pytest.mark.e2e
async def test_a_stopped_worker_process_is_killed_when_it_does_not_stop(tmp_path):
    provisioner = LocalProvisioner(fake_worker_command(), tmp_path, stop_timeout=0.5)
    w = Worker(id="w1", provisioner="local")
    await provisioner.launch(w)
    proc = psutil.Process(w.pid)
    os.kill(w.pid, signal.SIGSTOP)
    await until(lambda: proc.status() == psutil.STATUS_STOPPED, "the process stopped")
    await provisioner.terminate(w)
    assert not psutil.pid_exists(w.pid) or proc.status() == psutil.STATUS_ZOMBIE


@pytest.mark.e2e
async def test_workers_a_dead_daemon_left_are_stopped_from_its_records_alone(tmp_path: Path):
    provisioner = LocalProvisioner(fake_worker_command(), tmp_path)
    workers = [Worker(id=f"w{i}", provisioner="local") for i in (1, 2)]
    for w in workers:
        await provisioner.launch(w)
    # A record whose pid now belongs to another process (its start time differs): left alone.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        table = json.loads((tmp_path / "workers.json").read_text())
        started = psutil.Process(bystander.pid).create_time()
        table["workers"].append({"id": "w3", "pid": bystander.pid, "start_time": started - 60})
        (tmp_path / "workers.json").write_text(json.dumps(table))
        # The workers are this test's children: reap them as they exit, as init would.
        reaped = [asyncio.to_thread(w.handle.popen.wait, 30) for w in workers]
        stopped, *codes = await asyncio.gather(
            asyncio.to_thread(stop_recorded_workers, tmp_path), *reaped
        )
        assert stopped == ["w1", "w2"]
        assert all(code is not None for code in codes)
        assert bystander.poll() is None
        assert json.loads((tmp_path / "workers.json").read_text()) == {"workers": []}
        assert stop_recorded_workers(tmp_path) == []
    finally:
        bystander.kill()
        bystander.wait()


# -- bounds have a ceiling ---------------------------------------------------------------------


def test_up_refuses_bounds_above_the_workers_ceiling(tmp_path):
    base = ["up", "--worker-command", fake_worker_command(), "--dry-run", "--json"]
    huge = CliRunner().invoke(cli_app, [*base, "--max-workers", "1000000000"])
    assert huge.exit_code == 2, huge.output
    assert "above the workers ceiling (64" in huge.output
    assert "--workers-ceiling" in huge.output
    low = CliRunner().invoke(cli_app, [*base, "--replicas", "5", "--workers-ceiling", "4"])
    assert low.exit_code == 2 and "workers ceiling (4" in low.output, low.output
    ok = CliRunner().invoke(cli_app, [*base, "--max-workers", "100", "--workers-ceiling", "100"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["workers"]["max"] == 100


async def test_the_admin_api_refuses_bounds_above_the_workers_ceiling(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=0, max_workers=1)
    url = f"{d.url}/-/autoscaler"
    async with http.patch(url, json={"max_workers": 1_000_000_000}, headers=d.admin) as resp:
        assert resp.status == 422
        message = (await resp.json())["error"]["message"]
    assert "max_workers: 1000000000 is above the workers ceiling (64)" in message
    async with http.patch(url, json={"min_workers": 65, "max_workers": 64}, headers=d.admin) as r:
        assert r.status == 422
        assert "min_workers: 65" in (await r.json())["error"]["message"]
    assert d.deployment.policy.max_workers == 1
    assert len(d.deployment.pool) == 0
    async with http.patch(url, json={"max_workers": 64}, headers=d.admin) as resp:
        assert resp.status == 200


@pytest.mark.e2e
async def test_adding_workers_by_hand_stops_at_the_ceiling(daemon, http):
    d = await daemon(
        worker_command=fake_worker_command(), autoscaler="fixed", replicas=1, workers_ceiling=2
    )
    async with http.post(f"{d.url}/-/workers", headers=d.admin) as resp:
        assert resp.status == 201
    async with http.post(f"{d.url}/-/workers", headers=d.admin) as resp:
        assert resp.status == 409
        assert "workers ceiling (2 workers)" in (await resp.json())["error"]["message"]
    assert len(d.deployment.pool.live()) == 2


# -- what reaches whom -------------------------------------------------------------------------


async def test_the_api_schema_needs_the_admin_token_and_there_is_no_docs_page(
    daemon, http, upstream
):
    up = await upstream()
    d = await daemon(endpoints=[up.url])
    async with http.get(f"{d.url}/-/openapi.json") as resp:
        assert resp.status == 401
    async with http.get(f"{d.url}/-/openapi.json", headers=d.admin) as resp:
        assert resp.status == 200
        assert "/-/status" in (await resp.json())["paths"]
    for headers in ({}, d.admin):
        async with http.get(f"{d.url}/-/docs", headers=headers) as resp:
            assert resp.status in (401, 404)
            assert "swagger" not in (await resp.text()).lower()


@pytest.mark.e2e
async def test_local_workers_do_not_get_the_deployments_keys(daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOCKCTL_NODE_CONTROL_KEY", TOKEN)
    monkeypatch.setenv("FLOCKCTL_API_KEY", "the-api-key")
    monkeypatch.setenv("FLOCKCTL_TESTS_PLAIN", "passed-on")
    seen = tmp_path / "env"
    command = f"env > {seen}; exec {sys.executable} {FAKE_WORKER} --port $PORT"
    d = await daemon(worker_command=command, api_key="the-api-key")
    await d.wait_ready(1)
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert env["FLOCKCTL_TESTS_PLAIN"] == "passed-on"
    assert "FLOCKCTL_NODE_CONTROL_KEY" not in env and "FLOCKCTL_API_KEY" not in env
    assert TOKEN not in seen.read_text() and "the-api-key" not in seen.read_text()


def test_every_key_the_cli_reads_from_the_environment_is_kept_from_workers():
    up = typer.main.get_command(cli_app).commands["up"]
    keys = {p.name: p.envvar for p in up.params if p.name in ("api_key", "node_control_key")}
    assert set(keys.values()) == set(KEY_ENV_VARS)


@pytest.mark.e2e
async def test_a_failed_workers_reason_quotes_only_its_own_log_lines(tmp_path):
    logs = tmp_path / "workers"
    logs.mkdir()
    (logs / "w1.log").write_text("Traceback (most recent call last):\nOldError: an earlier run\n")
    quiet = f"{sys.executable} -c 'import sys; sys.exit(3)' {{port}}"
    provisioner = LocalProvisioner(quiet, tmp_path)
    w = Worker(id="w1", provisioner="local")
    await provisioner.launch(w)
    health = await until(
        lambda: (h := provisioner.health(w)) and not h.alive and h, "the process to exit"
    )
    assert health.reason == "process exited with code 3"
    loud = f"{sys.executable} -c 'import sys; print(\"NewError: this run\"); sys.exit(4)' {{port}}"
    again = LocalProvisioner(loud, tmp_path)
    w = Worker(id="w1", provisioner="local")
    await again.launch(w)
    health = await until(lambda: (h := again.health(w)) and not h.alive and h, "the exit")
    assert health.reason == "process exited with code 4: NewError: this run"
