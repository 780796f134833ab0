"""``flockctl update`` of a SkyPilot deployment: new clusters from the new task, rolling or
blue-green, the old clusters torn down, a failing new version rolled back, and no request failed.

SkyPilot's SDK is the recording fake (``fake_sky.py``): each "cluster" is the fake OpenAI server as
a local process, so the daemon probes and proxies real HTTP; the task is parsed by SkyPilot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cli_driver import flockctl
from conftest import free_port, until, until_sync
from fake_sky import FakeSky

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("sky")]

TASK: dict[str, Any] = {"run": "python -m http.server 8000", "resources": {"ports": 8000}}
#: The next version's task: other resources, so its clusters' launch logs tell them apart.
TASK_V2: dict[str, Any] = {
    "run": "python -m http.server 8000",
    "resources": {"ports": 8000, "cpus": "4+"},
}


async def sky_daemon(daemon: Any, **extra: Any) -> Any:
    d = await daemon(
        provisioner="skypilot",
        task=TASK,
        autoscaler="fixed",
        replicas=2,
        launch_backoff=0.01,
        launch_attempts=1,
        status_interval=0.05,
        probe={"interval_seconds": 0.05, "timeout_seconds": 2, "initial_delay_seconds": 20},
        drain_timeout=20,
        **extra,
    )
    await d.wait_ready(2)
    return d


@contextlib.asynccontextmanager
async def steady_load(url: str) -> AsyncIterator[dict[str, int]]:
    """Two clients sending requests one after another (one streaming) until the block ends."""
    counts = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def client(stream: bool) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                body = {"prompt": "hi", "max_tokens": 4, "stream": stream}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    data = await resp.read()
                good = resp.status == 200 and (not stream or data.rstrip().endswith(b"[DONE]"))
                counts["ok" if good else "failed"] += 1

    tasks = [asyncio.create_task(client(stream)) for stream in (False, True)]
    try:
        yield counts
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def start_update(d: Any, http: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    async with http.post(f"{d.url}/-/update", json=body, headers=d.admin) as resp:
        answer = await resp.json()
        assert resp.status == 202, answer
    return answer


def clusters_of(d: Any, version: int) -> set[str]:
    return {w.resource for w in d.deployment.pool if w.version == version and w.live}


@pytest.mark.parametrize("mode", ["rolling", "blue-green"])
async def test_an_update_launches_clusters_of_the_new_task_and_tears_down_the_old(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession, mode: str
) -> None:
    d = await sky_daemon(daemon)
    old = clusters_of(d, 1)
    assert old == {"flockctl-default-w1", "flockctl-default-w2"}
    async with steady_load(d.url) as counts:
        update = await start_update(d, http, changes={"task": TASK_V2}, mode=mode)
        assert (update["from_version"], update["to_version"]) == (1, 2)
        await until(lambda: d.deployment.update.state != "running", "the update to end", 60)
        await until(lambda: counts["ok"] >= 10, "requests served after the update")
    assert d.deployment.update.state == "succeeded", d.deployment.update.reason
    assert counts["failed"] == 0 and counts["ok"] >= 10
    assert d.deployment.version == 2
    new = clusters_of(d, 2)
    assert len(new) == 2 and not new & old
    # The new clusters were launched from the new task, the old ones from the old.
    state_dir = d.deployment.state_dir
    for worker in d.deployment.pool:
        log = (state_dir / "workers" / f"{worker.id}.log").read_text()
        assert ("cpus=4+" in log) == (worker.version == 2), (worker.id, log)
    # The old clusters are gone, on SkyPilot's side and from the deployment's records.
    await until(lambda: not old & set(sky.clusters()), "the old clusters to be torn down")
    assert old <= {c["cluster"] for c in sky.calls("down")}
    saved = (state_dir / "clusters.json").read_text()
    assert not any(cluster in saved for cluster in old)


async def test_a_new_task_whose_clusters_never_launch_is_rolled_back(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    d = await sky_daemon(daemon, max_start_failures=2)
    old = clusters_of(d, 1)
    sky.script(fail_launches=100, error="ResourcesUnavailableError: no cpus=4+ anywhere")
    async with steady_load(d.url) as counts:
        await start_update(d, http, changes={"task": TASK_V2})
        await until(lambda: d.deployment.update.state != "running", "the update to end", 60)
    update = d.deployment.update
    assert update.state == "rolled_back"
    assert update.reason is not None and "no cpus=4+ anywhere" in update.reason
    assert counts["failed"] == 0 and counts["ok"] > 0
    # The old clusters serve on, and the deployment launches from the old task again.
    assert d.deployment.version == 1 and clusters_of(d, 1) == old
    assert d.deployment.provisioner.task == TASK  # type: ignore[attr-defined]
    failed = [c["cluster"] for c in sky.calls("launch")][2:]
    assert failed and not set(failed) & set(sky.clusters())


def test_flockctl_update_with_a_new_spec_applies_its_task_and_service_fields(
    tmp_path: Path, sky: FakeSky
) -> None:
    """The CLI path in real processes: the new SPEC's task and its service: replicas apply."""
    head = "flockctl:\n  status_interval: 0.2\n  probe:\n    interval_seconds: 0.1\n"
    old, new = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    old.write_text(
        "resources:\n  ports: 8000\nrun: python -m http.server 8000\n"
        f"service:\n  readiness_probe: /health\n  replicas: 1\n{head}"
    )
    new.write_text(
        "resources:\n  ports: 8000\n  cpus: 4+\nrun: python -m http.server 8000\n"
        f"service:\n  readiness_probe: /health\n  replicas: 2\n{head}"
    )
    assert flockctl("up", str(old), "--name", "sky", "--port", str(free_port())).code == 0
    try:
        until_sync(lambda: status()["ready_workers"] == 1, "a READY worker of version 1")
        moved = flockctl("update", str(new), "--name", "sky", "--mode", "blue-green", "--json")
        assert moved.code == 0, moved.err
        assert moved.json()["state"] == "succeeded"
        snap = status()
        live = [w for w in snap["workers"] if w["state"] == "READY"]
        assert snap["deployment"]["version"] == 2 and snap["autoscaler"]["target"] == 2
        assert sorted(w["resource"] for w in live) == ["flockctl-sky-w2", "flockctl-sky-w3"]
        assert {w["version"] for w in live} == {2}
        until_sync(lambda: "flockctl-sky-w1" not in sky.clusters(), "the old cluster torn down")
        assert sorted(sky.clusters()) == ["flockctl-sky-w2", "flockctl-sky-w3"]
    finally:
        flockctl("down", "--name", "sky", "--timeout", "30")
    assert sky.clusters() == {}


def status() -> dict[str, Any]:
    result = flockctl("status", "--name", "sky", "--json")
    assert result.code == 0, result.err
    return result.json()
