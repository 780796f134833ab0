"""``flockctl update`` of a SkyPilot deployment with worker groups: a group whose task changed
gets new clusters from its new task, READY before the old ones drain and are torn down; a group
whose task did not change keeps its clusters and only rescales within its new bounds; a group
the new config adds launches first; a group whose new clusters never launch rolls back alone
(its old clusters serving, its next clusters launched from its old task again). Without groups
too, an update that leaves the task as it was keeps the clusters.

The real daemon in-process, SkyPilot's SDK the recording fake (``fake_sky.py``) whose clusters
are real fake-server processes, so probes and requests are real HTTP.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from conftest import until
from fake_sky import FakeSky
from update_traffic import load

from flockctl.server.provisioners.skypilot import recorded_clusters

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("sky")]

TASK: dict[str, Any] = {"run": "serve --port 8000", "resources": {"ports": 8000}}


def group(name: str, model: str, accelerator: str, **fields: Any) -> dict[str, Any]:
    task = {"resources": {"ports": 8000, "accelerators": f"{accelerator}:1"}}
    return {"name": name, "model": model, "task": task, **fields}


async def run_update(d: Any, http: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    async with http.post(f"{d.url}/-/update", json=body, headers=d.admin) as resp:
        answer = await resp.json()
        assert resp.status == 202, answer
    await until(lambda: not d.deployment.update.running, "the update to end", 90)
    return d.deployment.update.to_dict()


def clusters(d: Any, name: str) -> dict[str, int]:
    """The live clusters of group ``name`` and each one's version."""
    return {w.resource: w.version for w in d.deployment.pool if w.group == name and w.live}


def launched_on(d: Any, cluster: str) -> str:
    """What the cluster's launch asked for, from its worker's log."""
    worker_id = cluster.rsplit("-", 1)[-1]
    return (d.deployment.state_dir / "workers" / f"{worker_id}.log").read_text()


@pytest.mark.parametrize("mode", ["rolling", "blue-green"])
async def test_skypilot_groups_roll_their_clusters_one_group_at_a_time(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession, mode: str
) -> None:
    d = await daemon(
        provisioner="skypilot",
        task=TASK,
        groups=[
            group("small", "alpha", "L4", replicas=1),
            group("big", "beta", "A100", replicas=1),
        ],
        launch_backoff=0.01,
        launch_attempts=1,
        max_start_failures=2,
        status_interval=0.05,
        probe={"interval_seconds": 0.05, "timeout_seconds": 2, "initial_delay_seconds": 20},
        drain_timeout=20,
    )
    await d.wait_ready(2)
    small, big = clusters(d, "small"), clusters(d, "big")
    assert len(small) == len(big) == 1
    config = d.deployment.cfg.model_dump(mode="json")

    # big gets a new task; small keeps its task and grows to 2; extra is added.
    new_groups = [
        group("small", "alpha", "L4", replicas=2, max_workers=3),
        group("big", "beta", "H100", replicas=1),
        group("extra", "gamma", "T4", replicas=1),
    ]
    async with load(d.url, ["alpha", "beta"]) as seen:
        view = await run_update(d, http, config={**config, "groups": new_groups}, mode=mode)
        count = seen["ok"]
        await until(lambda: seen["ok"] > count + 10, "requests after the update")
    assert seen["failed"] == [], seen["failed"][:3]
    assert view["state"] == "succeeded", view["reason"]
    assert [(g["name"], g["change"], g["state"]) for g in view["groups"]] == [
        ("extra", "add", "succeeded"),
        ("small", "update", "succeeded"),
        ("big", "update", "succeeded"),
    ]
    # small's cluster was kept (same task) and moved to version 2, with one more beside it.
    now_small = clusters(d, "small")
    assert len(now_small) == 2 and set(small) < set(now_small)
    assert set(now_small.values()) == {2}
    assert all("L4" in launched_on(d, c) for c in now_small)
    # big's old cluster is gone: a new one from the new task replaced it, and was torn down.
    (old_big,) = big
    now_big = clusters(d, "big")
    assert len(now_big) == 1 and old_big not in now_big and set(now_big.values()) == {2}
    assert "H100" in launched_on(d, next(iter(now_big)))
    await until(lambda: old_big not in sky.clusters(), "big's old cluster torn down")
    assert old_big in {c["cluster"] for c in sky.calls("down")}
    assert old_big not in {r["cluster"] for r in recorded_clusters(d.deployment.state_dir).values()}
    (extra,) = clusters(d, "extra")
    assert "T4" in launched_on(d, extra)
    groups = {g["name"]: g for g in d.deployment.snapshot()["groups"]}
    assert {n: g["version"] for n, g in groups.items()} == {"small": 2, "big": 2, "extra": 2}
    assert (groups["small"]["target"], groups["small"]["max_workers"]) == (2, 3)
    # Only the clusters of big's old task and the new ones were launched: none for small's.
    launches = [c["cluster"] for c in sky.calls("launch")]
    assert len(launches) == 2 + 3

    # big's next task never launches: big rolls back alone, its cluster serving throughout.
    sky.script(fail_launches=100, error="ResourcesUnavailableError: no B200 anywhere")
    config = d.deployment.cfg.model_dump(mode="json")
    broken = [dict(g) for g in config["groups"]]
    broken[1] = {**broken[1], "task": {"resources": {"ports": 8000, "accelerators": "B200:1"}}}
    broken[2] = {**broken[2], "replicas": 2}
    before = clusters(d, "big")
    async with load(d.url, ["beta"]) as seen:
        view = await run_update(d, http, config={**config, "groups": broken}, mode=mode)
    assert seen["failed"] == [] and seen["ok"] > 0
    assert view["state"] == "rolled_back"
    assert view["reason"].startswith("group big: ") and "no B200 anywhere" in view["reason"]
    assert [(g["name"], g["state"]) for g in view["groups"]] == [
        ("big", "rolled_back"),
        ("extra", "skipped"),
    ]
    assert clusters(d, "big") == before
    launch = d.deployment.provisioner.groups["big"]  # type: ignore[attr-defined]
    assert launch.task["resources"]["accelerators"] == "H100:1"
    groups = {g["name"]: g for g in d.deployment.snapshot()["groups"]}
    assert {n: g["version"] for n, g in groups.items()} == {"small": 2, "big": 2, "extra": 2}
    assert d.deployment.version == 2


async def test_an_update_that_leaves_the_task_keeps_the_clusters_without_groups_too(
    daemon: Any, sky: FakeSky, http: aiohttp.ClientSession
) -> None:
    d = await daemon(
        provisioner="skypilot",
        task=TASK,
        autoscaler="fixed",
        replicas=1,
        launch_backoff=0.01,
        status_interval=0.05,
        probe={"interval_seconds": 0.05, "timeout_seconds": 2, "initial_delay_seconds": 20},
    )
    await d.wait_ready(1)
    view = await run_update(d, http, changes={"replicas": 2})
    assert view["state"] == "succeeded", view["reason"]
    live = {w.resource: w.version for w in d.deployment.pool if w.live}
    assert live == {"flockctl-default-w1": 2, "flockctl-default-w2": 2}
    assert [c["cluster"] for c in sky.calls("launch")] == list(live)
    assert sky.calls("down") == []
