"""The SkyPilot provisioner, driven by the real daemon with SkyPilot's SDK replaced by a recording
fake (``fake_sky.py``): each "cluster" is the fake OpenAI server as a local process, so probes and
proxied requests are real HTTP. Task parsing is SkyPilot's own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import free_port, until, until_sync
from fake_sky import FakeSky

from flockctl.server.provisioners.skypilot import recorded_clusters
from flockctl.server.workers import WorkerState

#: Every test here runs against the fake SkyPilot SDK (conftest's ``sky``).
pytestmark = pytest.mark.usefixtures("sky")

S = WorkerState
TASK: dict[str, Any] = {"run": "python -m http.server 8000", "resources": {"ports": 8000}}
SKYPILOT_TEXT = (
    "ResourcesUnavailableError: Failed to acquire resources in all zones in us-east-1 for"
    " {L4:1}. Try changing resource requirements or use another region."
)


def fields(task: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    base = {
        "provisioner": "skypilot",
        "task": task or TASK,
        "launch_backoff": 0.01,
        "status_interval": 0.05,
        "probe": {"interval_seconds": 0.05, "timeout_seconds": 2, "initial_delay_seconds": 20},
        "drain_timeout": 20,
    }
    return {**base, **extra}


def state(d: Any, worker_id: str) -> WorkerState | None:
    worker = d.deployment.pool.get(worker_id)
    return worker.state if worker is not None else None


@pytest.mark.e2e
async def test_scale_up_then_down_drains_before_the_cluster_goes(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    sky.script(worker_args=["--tokens", "30", "--token-delay", "0.05"])
    d = await daemon(**fields(autoscaler="fixed", replicas=2))
    await d.wait_ready(2)
    launched = sky.calls("launch")
    assert sorted(c["cluster"] for c in launched) == ["flockctl-default-w1", "flockctl-default-w2"]
    assert {c["envs"]["FLOCKCTL_WORKER_ID"] for c in launched} == {"w1", "w2"}
    assert all(c["port"] == 8000 for c in launched)
    w1 = d.deployment.pool.get("w1")
    assert w1.resource == "flockctl-default-w1" and w1.url.startswith("http://127.0.0.1:")

    body = {"prompt": "hi", "stream": True}
    async with http.post(f"{d.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        cluster = resp.headers["x-worker-id"]
        worker_id = cluster.rsplit("-", 1)[1]
        async with http.delete(f"{d.url}/-/workers/{worker_id}", headers=d.admin) as removed:
            assert removed.status == 202
        assert state(d, worker_id) == S.DRAINING
        assert cluster not in [c["cluster"] for c in sky.calls("down")], "down before the drain"
        text = (await resp.read()).decode()
    assert text.rstrip().endswith("data: [DONE]")
    await until(lambda: state(d, worker_id) == S.TERMINATED, "the drained worker to end")
    assert cluster in [c["cluster"] for c in sky.calls("down")]
    assert cluster not in sky.clusters()
    assert len(d.deployment.pool.live()) == 1 and d.deployment.controller.target == 1


@pytest.mark.e2e
async def test_a_preempted_spot_worker_is_replaced(daemon: Any, sky: FakeSky) -> None:
    task = {**TASK, "resources": {"ports": 8000, "use_spot": True}}
    d = await daemon(**fields(task, autoscaler="fixed", replicas=1))
    await d.wait_ready(1)
    assert d.deployment.pool.get("w1").spot is True
    sky.preempt("flockctl-default-w1")
    await until(lambda: state(d, "w1") == S.PREEMPTED, "w1 to be PREEMPTED")
    assert "preempted" in d.deployment.pool.get("w1").reason
    await d.wait_ready(1)
    assert d.deployment.pool.ready()[0].id == "w2"
    assert [c["spot"] for c in sky.calls("launch")] == [True, True]
    assert d.deployment.controller.start_failures == 0, "a preemption is not a crash"
    # What is left of the preempted cluster is torn down.
    await until(lambda: "flockctl-default-w1" in [c["cluster"] for c in sky.calls("down")], "down")


@pytest.mark.e2e
async def test_a_failed_launch_is_retried_with_skypilots_text_in_the_log(
    daemon: Any, sky: FakeSky
) -> None:
    sky.script(fail_launches=2, error=SKYPILOT_TEXT)
    d = await daemon(**fields(autoscaler="fixed", replicas=1, launch_attempts=3))
    await d.wait_ready(1)
    assert [c["cluster"] for c in sky.calls("launch")] == ["flockctl-default-w1"] * 3
    # Each failed try is torn down before the next.
    assert [c["cluster"] for c in sky.calls("down")] == ["flockctl-default-w1"] * 2
    log = (d.deployment.state_dir / "workers" / "w1.log").read_text()
    assert log.count(f"launch failed: {SKYPILOT_TEXT}") == 2
    assert "try 3" in log and "is UP" in log


async def test_a_launch_that_keeps_failing_is_reported_and_stops(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    sky.script(fail_launches=100, error=SKYPILOT_TEXT)
    d = await daemon(
        **fields(autoscaler="fixed", replicas=1, launch_attempts=2, max_start_failures=2)
    )
    controller = d.deployment.controller
    await until(lambda: controller.blocked, "the crash-loop guard")
    w1 = d.deployment.pool.get("w1")
    assert w1.state == S.FAILED
    assert "did not launch in 2 tries" in w1.reason and SKYPILOT_TEXT in w1.reason
    async with http.get(f"{d.url}/-/status", headers=d.admin) as resp:
        snapshot = await resp.json()
    assert "stopped launching" in snapshot["autoscaler"]["launch_blocked"]
    assert len(sky.calls("launch")) == 4  # two workers, two tries each, then it stopped
    assert sky.clusters() == {}


async def test_a_launch_no_longer_wanted_is_cancelled(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    sky.script(launch_delay=60)
    d = await daemon(**fields(autoscaler="fixed", replicas=1))
    (launch,) = await until(lambda: sky.calls("launch"), "the launch")
    assert state(d, "w1") == S.PROVISIONING
    async with http.delete(f"{d.url}/-/workers/w1", headers=d.admin) as resp:
        assert resp.status == 202
    await until(lambda: state(d, "w1") == S.TERMINATED, "w1 to end")
    assert [c["request"] for c in sky.calls("cancel")] == [launch["request"]]
    assert "flockctl-default-w1" in [c["cluster"] for c in sky.calls("down")]
    assert sky.clusters() == {}
    assert recorded_clusters(d.deployment.state_dir) == {}


@pytest.mark.e2e
async def test_spot_workers_with_on_demand_fallback(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    task = {**TASK, "resources": {"ports": 8000, "use_spot": True}}
    d = await daemon(
        **fields(
            task,
            autoscaler="fixed",
            replicas=2,
            base_ondemand_fallback_replicas=1,
            dynamic_ondemand_fallback=True,
        )
    )
    # While the spot worker is not READY an extra on-demand one covers it; then it goes.
    launches = await until(lambda: len(sky.calls("launch")) >= 3 and sky.calls("launch"), "3")
    assert sorted(c["spot"] for c in launches) == [False, False, True]

    def settled() -> bool:
        live = d.deployment.pool.live()
        return len(live) == 2 and all(w.state == S.READY for w in live)

    await until(settled, "one spot and one on-demand worker READY")
    assert sorted(w.spot for w in d.deployment.pool.live()) == [False, True]
    async with http.get(f"{d.url}/-/status", headers=d.admin) as resp:
        spot = (await resp.json())["autoscaler"]["spot"]
    assert spot == {
        "base_ondemand_fallback_replicas": 1,
        "dynamic_ondemand_fallback": True,
        "spot_target": 1,
        "ondemand_target": 1,
    }


@pytest.mark.e2e
def test_cli_up_logs_down_with_a_skypilot_task(tmp_path: Path, sky: FakeSky) -> None:
    """The whole path in real processes: up (the daemon launches through the SDK), status,
    logs (the job log streamed through the SDK), down (every cluster torn down)."""
    spec = tmp_path / "task.yaml"
    spec.write_text(
        "resources:\n  ports: 8000\nrun: python -m http.server 8000\n"
        "service:\n  readiness_probe: /health\n  replicas: 1\n"
        "flockctl:\n  status_interval: 0.2\n  probe:\n    interval_seconds: 0.1\n"
    )
    port = free_port()

    def flockctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flockctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    up = flockctl("up", str(spec), "--port", str(port), "--json")
    assert up.returncode == 0, up.stderr
    pid = json.loads(up.stdout)["pid"]
    try:

        def one_ready() -> dict[str, Any] | None:
            status = json.loads(flockctl("status", "--json").stdout)
            return status if status["ready_workers"] == 1 else None

        (worker,) = until_sync(one_ready, "a READY worker", 60)["workers"]
        assert worker["provisioner"] == "skypilot"
        assert worker["resource"] == "flockctl-default-w1"
        logs = flockctl("logs", "w1", "--tail", "50")
        assert logs.returncode == 0, logs.stderr
        assert "job on flockctl-default-w1: serving on port" in logs.stdout
        assert sky.calls("tail_logs")[-1]["cluster"] == "flockctl-default-w1"
        down = flockctl("down")
        assert down.returncode == 0, down.stderr
        assert sky.clusters() == {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_down_tears_down_clusters_a_dead_daemon_left(tmp_path: Path, sky: FakeSky) -> None:
    from flockctl.state import state_dir

    directory = state_dir("default")
    directory.mkdir(parents=True)
    sky.script()
    request = sky.launch(TASK, "flockctl-default-w1", base_dir=None, spot=False, port=8000, envs={})
    sky.wait(request)
    (directory / "clusters.json").write_text(
        json.dumps({"clusters": [{"id": "w1", "cluster": "flockctl-default-w1", "spot": False}]})
    )
    down = subprocess.run(
        [sys.executable, "-m", "flockctl", "down", "--json"], capture_output=True, text=True
    )
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["orphans_stopped"] == 1
    assert sky.clusters() == {}


@pytest.mark.e2e
async def test_a_restarted_daemon_readopts_its_clusters(tmp_path: Path, sky: FakeSky) -> None:
    """Clusters recorded by an earlier daemon: an UP one comes back as a STARTING worker (the
    probe decides READY again); one whose launch the restart interrupted is torn down."""
    from flockctl.server.provisioners.sky_sdk import make_sdk
    from flockctl.server.provisioners.skypilot import SkyPilotProvisioner

    request = sky.launch(TASK, "flockctl-d-w1", base_dir=None, spot=True, port=8000, envs={})
    sky.wait(request)
    url = "http://" + sky.endpoint("flockctl-d-w1", 8000)
    (tmp_path / "clusters.json").write_text(
        json.dumps(
            {
                "clusters": [
                    {"id": "w1", "cluster": "flockctl-d-w1", "spot": True, "url": url},
                    {"id": "w2", "cluster": "flockctl-d-w2", "spot": False},
                ]
            }
        )
    )
    provisioner = SkyPilotProvisioner(TASK, "d", 8000, tmp_path, make_sdk(), status_interval=0.05)
    (worker,) = provisioner.adopt()
    assert (worker.id, worker.state, worker.url, worker.spot) == ("w1", S.STARTING, url, True)
    provisioner.start()
    try:
        await until(lambda: "flockctl-d-w2" in [c["cluster"] for c in sky.calls("down")], "down")
        await until(lambda: sky.calls("status"), "a status refresh")
        assert provisioner.health(worker).alive
        sky.preempt("flockctl-d-w1")
        await until(lambda: not provisioner.health(worker).alive, "the preemption to show")
        assert provisioner.health(worker).preempted
        assert list(recorded_clusters(tmp_path)) == ["w1"]
    finally:
        await provisioner.close()


@pytest.mark.e2e
async def test_a_skypilot_worker_has_a_log_and_no_command_and_takes_no_model(
    daemon: Any, http: aiohttp.ClientSession
) -> None:
    d = await daemon(**fields(autoscaler="fixed", replicas=1))
    await d.wait_ready(1)
    async with http.get(f"{d.url}/-/workers/w1", headers=d.admin) as resp:
        assert resp.status == 200 and (await resp.json())["command"] is None
    async with http.get(f"{d.url}/-/logs/w1", headers=d.admin) as resp:
        assert resp.status == 200
        assert any("is UP" in line for line in (await resp.json())["lines"])
    body = {"model": "demo"}
    async with http.post(f"{d.url}/-/workers", json=body, headers=d.admin) as resp:
        assert resp.status == 422
        assert "run: section" in (await resp.json())["error"]["message"]
    assert [w.id for w in d.deployment.pool] == ["w1"]  # nothing was started for the model
