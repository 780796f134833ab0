"""``flockctl update``: a deployment moves to its next version without refusing a request.

In-process first: the controller with an in-memory provisioner, a clock the test moves and probes
the test passes by hand, so each step of a rolling or blue-green update happens when the test
says. Then end to end: real fake-worker processes under steady plain and streaming load while
``flockctl update`` runs, and a broken new version rolled back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from flockctl.server.autoscaler import FixedPolicy
from flockctl.server.controller import Controller
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.provisioners.base import ALIVE, Provisioner, ResourceHealth
from flockctl.server.update import Update
from flockctl.server.workers import Worker, WorkerState

S = WorkerState


class Clock:
    """Wall-clock seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class MemoryProvisioner(Provisioner):
    """Workers that are names: launched at once, ended when the test says."""

    name = "memory"

    def __init__(self) -> None:
        self.exited: dict[str, str] = {}
        self.terminated: list[str] = []

    async def launch(self, worker: Worker) -> None:
        worker.url = f"http://{worker.id}.invalid"

    async def terminate(self, worker: Worker) -> None:
        self.terminated.append(worker.id)

    def health(self, worker: Worker) -> ResourceHealth:
        reason = self.exited.get(worker.id)
        return ALIVE if reason is None else ResourceHealth(False, reason)


@dataclass
class Probes:
    watched: list[str] = field(default_factory=list)

    def watch(self, worker: Worker) -> None:
        self.watched.append(worker.id)


@dataclass
class Rig:
    controller: Controller
    pool: WorkerPool
    provisioner: MemoryProvisioner
    clock: Clock

    async def tick(self, seconds: float = 0.0) -> None:
        """Move the clock, run one step, and let the launches and drains it started run."""
        self.clock.now += seconds
        self.controller.step(self.clock())
        for _ in range(5):
            await asyncio.sleep(0)

    def ready_all(self) -> None:
        """Every worker STARTING passes its probe."""
        for worker in self.pool:
            if worker.state == S.STARTING:
                self.pool.set_state(worker, S.READY)

    def by_version(self, version: int, state: WorkerState = S.READY) -> list[str]:
        return [w.id for w in self.pool if w.version == version and w.state == state]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    pool = WorkerPool(make_policy("least-connection"), None, 100)
    provisioner = MemoryProvisioner()
    clock = Clock()
    controller = Controller(
        pool,
        provisioner,
        FixedPolicy(2),
        Probes(),  # type: ignore[arg-type]
        initial_target=2,
        max_start_failures=2,
        drain_timeout=0.0,
        clock=clock,
    )
    r = Rig(controller, pool, provisioner, clock)
    await r.tick()
    r.ready_all()
    await r.tick()
    assert r.by_version(1) == ["w1", "w2"]
    yield r
    await controller.stop(drain=False)


async def test_rolling_update_replaces_one_worker_at_a_time(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "rolling", max_surge=1)
    await rig.tick()
    # One new worker above the target; no old one goes before it is READY.
    assert [w.id for w in rig.controller.live()] == ["w3"]
    assert rig.by_version(1) == ["w1", "w2"]
    await rig.tick()
    assert len(rig.controller.live()) == 1, "a second new worker before the first was READY"
    rig.ready_all()
    await rig.tick()
    # w3 READY: one old worker drained, and the next new one started.
    assert len(rig.by_version(1)) == 1
    assert [w.id for w in rig.controller.live()] == ["w3", "w4"]
    assert update.running
    rig.ready_all()
    await rig.tick()
    await rig.tick()
    assert rig.by_version(1) == []
    assert rig.by_version(2) == ["w3", "w4"]
    assert update.state == "succeeded"
    assert sorted(rig.provisioner.terminated) == ["w1", "w2"]


async def test_blue_green_switches_only_when_the_whole_new_set_is_ready(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "blue-green")
    await rig.tick()
    assert [w.id for w in rig.controller.live()] == ["w3", "w4"]
    rig.pool.set_state(rig.pool.get("w3"), S.READY)  # type: ignore[arg-type]
    await rig.tick()
    assert rig.by_version(1) == ["w1", "w2"], "the old set drained before the new one was ready"
    rig.ready_all()
    await rig.tick()
    await rig.tick()
    assert rig.by_version(1) == []
    assert update.state == "succeeded"


async def test_a_crash_looping_new_version_is_rolled_back(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "rolling")
    for _ in range(4):
        await rig.tick()
        for worker in rig.controller.live():
            if worker.state == S.STARTING:
                rig.provisioner.exited[worker.id] = "process exited with code 1: bad flag"
    assert update.state == "rolled_back"
    assert update.reason is not None and "bad flag" in update.reason
    # The old set kept serving throughout, and the controller launches the old version again.
    assert rig.by_version(1) == ["w1", "w2"]
    assert rig.controller.version == 1 and rig.controller.blocked is None
    assert not [w for w in rig.pool if w.version == 2 and w.live]


async def test_a_new_version_never_ready_is_rolled_back_after_the_timeout(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "blue-green", timeout=60)
    await rig.tick()
    await rig.tick(59)
    assert update.running
    await rig.tick(2)
    assert update.state == "rolled_back"
    assert update.reason is not None and "not READY within 60s" in update.reason
    assert rig.by_version(1) == ["w1", "w2"]
