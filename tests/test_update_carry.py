"""An update keeps the workers that already run the new version's definition (a static URL the
new list keeps, a SkyPilot cluster of an unchanged task): they move to the new version at once,
count as up while the others roll, go back to the old version if the update rolls back, and are
recorded at the old version while it runs, so a daemon restarted mid-update keeps them.

In-process: the controller with an in-memory provisioner, a clock the test moves and probes the
test passes by hand.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fleet import MemoryProvisioner, Rig, start_rig

from flockctl.server.controller import WorkerGroup
from flockctl.server.update import Update
from flockctl.server.workers import Worker, WorkerState


class KeepingProvisioner(MemoryProvisioner):
    """Carries over the workers whose ids it is told to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: set[str] = set()

    def carries_over(self, worker: Worker) -> bool:
        return worker.id in self.keep


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await start_rig(KeepingProvisioner(), group=WorkerGroup("chat", None, "alpha"))
    for worker in r.pool:
        worker.learn_models(["alpha", "base"])
    yield r
    await r.controller.stop(drain=False)


async def test_a_carried_worker_serves_on_while_the_rest_rolls(rig: Rig) -> None:
    rig.provisioner.keep = {"w1"}
    rig.controller.group = WorkerGroup("chat", None, "alpha-2")  # the group's new definition
    update = Update(rig.controller, "u2", 1, 2, "rolling", max_surge=1)
    w1 = rig.pool.get("w1")
    assert w1 is not None and (w1.version, w1.model, w1.models) == (
        2,
        "alpha-2",
        ("alpha-2", "base"),
    )
    assert update.recorded_versions() == {"w1": 1}
    await rig.tick()
    # One new worker for w2's place; w2 serves until it is READY.
    assert rig.states() == {"w1": (2, "READY"), "w2": (1, "READY"), "w3": (2, "STARTING")}
    assert update.running
    rig.ready_all()
    await rig.tick()
    await rig.tick()
    assert rig.states()["w2"] == (1, "TERMINATED") and rig.states()["w1"] == (2, "READY")
    assert update.state == "succeeded"
    assert update.recorded_versions() == {}
    assert rig.provisioner.terminated == ["w2"]


async def test_a_rolled_back_update_gives_carried_workers_back_to_the_old_version(
    rig: Rig,
) -> None:
    rig.provisioner.keep = {"w1"}
    rig.controller.group = WorkerGroup("chat", None, "alpha-2")
    update = Update(rig.controller, "u2", 1, 2, "rolling")
    for _ in range(4):
        await rig.tick()
        for worker in rig.controller.live():
            if worker.state == WorkerState.STARTING:
                rig.provisioner.exited[worker.id] = "the new URL does not answer"
    assert update.state == "rolled_back"
    # w1 was never drained: it serves the old version again, under its old model.
    w1 = rig.pool.get("w1")
    assert w1 is not None and (w1.version, w1.state.value, w1.model) == (1, "READY", "alpha")
    assert w1.models == ("alpha", "base")
    assert rig.states()["w2"] == (1, "READY")
    assert "w1" not in rig.provisioner.terminated and rig.controller.version == 1


async def test_an_update_that_carries_every_worker_ends_at_once(rig: Rig) -> None:
    rig.provisioner.keep = {"w1", "w2"}
    update = Update(rig.controller, "u2", 1, 2, "blue-green")
    await rig.tick()
    assert update.state == "succeeded"
    assert rig.states() == {"w1": (2, "READY"), "w2": (2, "READY")}
    assert rig.provisioner.launched == ["w1", "w2"]  # nothing new was launched
