"""``flockctl update --dry-run``'s plan, from the same decision the daemon starts an update from
(``server/update_plan.py``): each group's part in the rollout's order, what changes in it, and
what happens to its workers, for local, static and SkyPilot groups."""

from __future__ import annotations

from typing import Any

import pytest

from flockctl.server.config import DeploymentConfig
from flockctl.server.update import UpdateRefused
from flockctl.server.update_plan import plan, resolve

TASK: dict[str, Any] = {"run": "serve --port 8000", "resources": {"ports": 8000}}


def sky(name: str, accelerator: str, **fields: Any) -> dict[str, Any]:
    task = {"resources": {"ports": 8000, "accelerators": accelerator}}
    return {"name": name, "model": name, "task": task, **fields}


def planned(old: DeploymentConfig, new: DeploymentConfig) -> list[tuple[str, str, list[str], str]]:
    resolved, steps = resolve(old, new, None, [g.name for g in old.groups])
    return [(p.name, p.change, p.changes, p.workers) for p in plan(old, resolved, steps)]


def test_a_skypilot_plan_says_which_groups_keep_their_clusters() -> None:
    base = {"provisioner": "skypilot", "task": TASK}
    old = DeploymentConfig(
        **base, groups=[sky("a", "L4", replicas=1), sky("b", "A100", replicas=1)]
    )
    new = DeploymentConfig(
        **base,
        groups=[
            sky("a", "L4", replicas=2),
            sky("b", "H100", replicas=1),
            sky("c", "T4", replicas=1),
        ],
    )
    parts = planned(old, new)
    assert [(name, change) for name, change, _, _ in parts] == [
        ("c", "add"),
        ("a", "update"),
        ("b", "update"),
    ]
    added, grown, moved = parts
    assert added[3] == "1 started, READY before the next group moves"
    assert grown[2] == ["replicas: 1 -> 2"]
    assert grown[3] == "clusters kept (the same task), scaled to the new bounds"
    assert moved[2] == ['task.resources: {"ports": 8000, "accelerators": "A100"} ->'
                        ' {"ports": 8000, "accelerators": "H100"}']  # fmt: skip
    assert moved[3].startswith("clusters replaced: new ones from the new task READY")


def test_a_plan_without_groups_and_its_refusals() -> None:
    old = DeploymentConfig(endpoints=["http://127.0.0.1:1", "http://127.0.0.1:2"])
    new = old.model_copy(update={"endpoints": ["http://127.0.0.1:2", "http://127.0.0.1:3"]})
    ((name, change, changes, workers),) = planned(old, new)
    assert (name, change) == ("default", "update")
    assert changes == [
        "endpoints: +http://127.0.0.1:3, -http://127.0.0.1:1 (kept: http://127.0.0.1:2)"
    ]
    assert workers.startswith("1 kept (serving the new version as they are), 1 added")
    with pytest.raises(UpdateRefused, match=r"^port: cannot change with flockctl update"):
        resolve(old, new.model_copy(update={"port": 1}), None, [])
    with pytest.raises(UpdateRefused, match=r"^endpoints: the new version needs an endpoint"):
        resolve(old, old.model_copy(update={"endpoints": ["http://127.0.0.1:2"]}), None, [])


def test_a_static_plan_adds_and_removes_groups_in_the_rollouts_order() -> None:
    chat = {"name": "chat", "model": "alpha", "endpoints": ["http://127.0.0.1:1"]}
    gone = {"name": "gone", "endpoints": ["http://127.0.0.1:2"]}
    extra = {"name": "extra", "model": "gamma", "endpoints": ["http://127.0.0.1:3"]}
    old = DeploymentConfig(groups=[chat, gone])
    new = DeploymentConfig(groups=[{**chat, "model": "alpha-2"}, extra])
    assert planned(old, new) == [
        (
            "extra",
            "add",
            ['model: "gamma"', 'endpoints: ["http://127.0.0.1:3"]'],
            "1 added, one per endpoint, READY before the next group moves",
        ),
        (
            "chat",
            "update",
            ['model: "alpha" -> "alpha-2"'],
            "1 kept (serving the new version as they are), 0 added (READY first), 0 drained",
        ),
        ("gone", "remove", [], "drained, then stopped"),
    ]
