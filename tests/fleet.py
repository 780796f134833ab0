"""A fleet in memory for in-process controller tests: a clock the test moves, a provisioner whose
workers are names, probes the test passes by hand, and a controller over them the test steps."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from flockctl.server.autoscaler import FixedPolicy
from flockctl.server.controller import Controller
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.provisioners.base import ALIVE, Provisioner, ResourceHealth
from flockctl.server.workers import Worker, WorkerState


class Clock:
    """Wall-clock seconds that move only when the test says (the controller's ``now`` and a
    worker's ``not_ready_since`` are on the same wall clock, so it starts from the real one)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryProvisioner(Provisioner):
    """Workers that are names in a list: launched at once, ended when the test says."""

    name = "memory"

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.terminated: list[str] = []
        self.exited: dict[str, str] = {}

    async def launch(self, worker: Worker) -> None:
        worker.url = f"http://{worker.id}.invalid"
        self.launched.append(worker.id)

    async def terminate(self, worker: Worker) -> None:
        if worker.id not in self.terminated:
            self.terminated.append(worker.id)

    def health(self, worker: Worker) -> ResourceHealth:
        reason = self.exited.get(worker.id)
        return ALIVE if reason is None else ResourceHealth(False, reason)


@dataclass
class Probes:
    """Stands in for the prober: records whom the controller asked to watch."""

    watched: list[str] = field(default_factory=list)

    def watch(self, worker: Worker) -> None:
        self.watched.append(worker.id)


@dataclass
class Rig:
    """A controller over an in-memory fleet, stepped by the test (see :func:`start_rig`)."""

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
            if worker.state == WorkerState.STARTING:
                self.pool.set_state(worker, WorkerState.READY)

    def by_version(self, version: int, state: WorkerState = WorkerState.READY) -> list[str]:
        return [w.id for w in self.pool if w.version == version and w.state == state]

    def states(self) -> dict[str, tuple[int, str]]:
        return {w.id: (w.version, w.state.value) for w in self.pool}


async def start_rig(provisioner: MemoryProvisioner, **controller: Any) -> Rig:
    """A controller of two workers over ``provisioner`` (``controller``: more of its keyword
    arguments), both READY; the caller stops it."""
    pool = WorkerPool(make_policy("least-connection"), None, 100)
    clock = Clock()
    rig = Rig(
        Controller(
            pool,
            provisioner,
            FixedPolicy(2),
            Probes(),  # type: ignore[arg-type]
            initial_target=2,
            max_start_failures=2,
            drain_timeout=0.0,
            clock=clock,
            **controller,
        ),
        pool,
        provisioner,
        clock,
    )
    await rig.tick()
    rig.ready_all()
    await rig.tick()
    return rig
