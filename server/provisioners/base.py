"""The provisioner interface.

Shaped for slow, remote resources (a SkyPilot cluster takes minutes to launch and can be
preempted), so local processes and fixed URLs are its easy cases:

- ``launch(worker)`` creates the resource and returns when it exists (the worker is then STARTING
  and the prober decides when it is READY); it may be cancelled while in flight;
- ``endpoint(worker)`` is the URL requests go to;
- ``health(worker)`` says whether the underlying resource still exists (a process that exited, a
  preempted cluster), independently of the HTTP readiness probe;
- ``terminate(worker)`` removes it, after the pool drained it;
- ``adopt()`` finds resources left by an earlier daemon of the same deployment.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from flockctl.server.autoscaler import SpotPlan
from flockctl.server.workers import Worker


@dataclass(frozen=True)
class ResourceHealth:
    """Whether the resource behind a worker exists; ``reason`` says why not."""

    alive: bool
    reason: str | None = None
    preempted: bool = False


ALIVE = ResourceHealth(True)


class Provisioner(ABC):
    name: str
    #: How workers split between spot and on-demand machines (None: no such split).
    spot_plan: SpotPlan | None = None
    #: Whether a worker can be stopped and launched anew (False for fixed URLs): one NOT_READY
    #: past ``replace_after`` is replaced where it can be, else kept out of rotation.
    relaunches: bool = True

    @abstractmethod
    async def launch(self, worker: Worker) -> None:
        """Create the resource; sets ``worker.url`` (and ``pid`` where there is one)."""

    @abstractmethod
    async def terminate(self, worker: Worker) -> None:
        """Remove the resource. Must be safe to call twice and on a half-launched worker."""

    def endpoint(self, worker: Worker) -> str | None:
        return worker.url

    def health(self, worker: Worker) -> ResourceHealth:
        return ALIVE

    def capacity(self, live: int) -> int | None:
        """How many more workers can be launched now (None: no limit of the provisioner's own)."""
        return None

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin any background work (a status refresh); called inside the running loop."""

    def adopt(self) -> list[Worker]:
        """Workers whose resources outlived an earlier daemon of this deployment."""
        return []

    def forget(self, worker: Worker) -> None:  # noqa: B027 - optional hook
        """Drop any record kept for ``worker`` once it ended."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the provisioner itself holds (not the workers)."""
