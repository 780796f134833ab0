"""A fleet in memory for in-process controller tests: a clock the test moves, a provisioner whose
workers are names, and probes the test passes by hand."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flockctl.server.provisioners.base import ALIVE, Provisioner, ResourceHealth
from flockctl.server.workers import Worker


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
