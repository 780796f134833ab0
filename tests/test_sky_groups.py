"""SkyPilot worker groups: each group launches its own task (its fields over the SPEC's) and
scales on the requests for its own model, driven by the real daemon with SkyPilot's SDK replaced
by the recording fake (``fake_sky.py``), whose clusters are real fake-server processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import until
from fake_sky import FakeSky

from flockctl.server.provisioners.skypilot import recorded_clusters

#: Every test here runs against the fake SkyPilot SDK (conftest's ``sky``).
pytestmark = pytest.mark.usefixtures("sky")

TASK: dict[str, Any] = {"run": "serve --port 8000", "resources": {"ports": 8000}}
GROUPS: list[dict[str, Any]] = [
    {
        "name": "small",
        "model": "alpha",
        "min_workers": 0,
        "max_workers": 1,
        "task": {"resources": {"ports": 8000, "accelerators": "L4:1"}},
    },
    {
        "name": "big",
        "model": "beta",
        "min_workers": 1,
        "max_workers": 1,
        "task": {"resources": {"ports": 9000, "accelerators": "A100:1"}, "run": "big --port 9000"},
    },
]


@pytest.mark.e2e
async def test_each_skypilot_group_launches_its_own_task_on_its_own_queue(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    d = await daemon(
        provisioner="skypilot",
        task=TASK,
        groups=GROUPS,
        upscale_delay=0,
        autoscale_up=1,
        autoscale_down=0.5,
        launch_backoff=0.01,
        status_interval=0.05,
        probe={"interval_seconds": 0.05, "timeout_seconds": 2, "initial_delay_seconds": 20},
    )
    small, big = d.deployment.groups.controllers
    await d.wait_ready(1)
    # Only the big group starts a worker: its own task, on its own port.
    (first,) = sky.calls("launch")
    assert (first["cluster"], first["port"], first["envs"]["PORT"]) == (
        "flockctl-default-w1",
        9000,
        "9000",
    )
    w1 = d.deployment.pool.get("w1")
    assert w1 is not None and w1.group == "big"
    log = d.deployment.state_dir / "workers" / "w1.log"
    assert "A100" in log.read_text()
    assert small.target == 0
    # A request for alpha waits for the small group alone, which scales from zero to serve it.
    sky.script(worker_args=["--model", "alpha"])
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    asked = asyncio.create_task(http.post(f"{d.url}/v1/chat/completions", json=body))
    await until(lambda: len(sky.calls("launch")) == 2, "the small group's launch", 30)
    second = sky.calls("launch")[1]
    assert (second["cluster"], second["port"]) == ("flockctl-default-w2", 8000)
    assert (small.target, big.target) == (1, 1)
    async with await asyncio.wait_for(asked, 30) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-worker-id"] == "flockctl-default-w2"
    w2 = d.deployment.pool.get("w2")
    assert w2 is not None and w2.group == "small"
    assert "L4" in (d.deployment.state_dir / "workers" / "w2.log").read_text()
    # The clusters record their group, so a restarted daemon puts each back in its own.
    recorded = recorded_clusters(d.deployment.state_dir)
    assert {k: v.get("group") for k, v in recorded.items()} == {"w1": "big", "w2": "small"}


def test_a_readopted_cluster_rejoins_the_group_it_recorded(tmp_path: Path, sky: FakeSky) -> None:
    from flockctl.server.config import DeploymentConfig
    from flockctl.server.provisioners.sky_sdk import make_sdk
    from flockctl.server.provisioners.skypilot import SkyPilotProvisioner, group_launches

    cfg = DeploymentConfig(provisioner="skypilot", task=TASK, groups=GROUPS)
    launches = group_launches(cfg)
    assert (launches["small"].port, launches["big"].port) == (8000, 9000)
    assert launches["big"].task["run"] == "big --port 9000"
    rows = [
        {"id": "w1", "cluster": "flockctl-d-w1", "url": "http://127.0.0.1:1", "group": "big"},
        {"id": "w2", "cluster": "flockctl-d-w2", "url": "http://127.0.0.1:2"},
    ]
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": rows}))
    provisioner = SkyPilotProvisioner(
        TASK, "d", 8000, tmp_path, make_sdk(), groups=launches, status_interval=0.05
    )
    adopted = {w.id: w.group for w in provisioner.adopt()}
    assert adopted == {"w1": "big", "w2": None}
