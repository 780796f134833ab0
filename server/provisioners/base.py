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

What else a provisioner's workers allow (a model named at run time, a log, new bounds) is
declared once in its ``capabilities``; the admin API asks those, never which class it has, so a
new provisioner gets the right answers by saying what it can do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flockctl.server.autoscaler import SpotPlan
from flockctl.server.workers import Worker

if TYPE_CHECKING:
    from flockctl.server.config import DeploymentConfig


@dataclass(frozen=True)
class ResourceHealth:
    """Whether the resource behind a worker exists; ``reason`` says why not."""

    alive: bool
    reason: str | None = None
    preempted: bool = False


ALIVE = ResourceHealth(True)


@dataclass(frozen=True)
class Capabilities:
    """What a provisioner's workers allow beyond launch and terminate.

    Where one cannot, its ``why_*`` text is the reason the admin API gives the user.
    """

    #: A worker can run flockctl's engine on a model named when it is added
    #: (``POST /-/workers {"model"}``).
    runs_models: bool = False
    why_no_models: str = "only a local deployment starts workers from a model"
    #: A worker can be a URL named when it is added (``POST /-/workers {"url"}``), given to
    #: ``add_endpoint``.
    takes_urls: bool = False
    #: Each worker writes ``workers/<id>.log`` (``GET /-/logs/<id>``).
    has_logs: bool = True
    why_no_logs: str = "its provisioner keeps none"
    #: The autoscaler's bounds can change at run time (``PATCH /-/autoscaler``).
    bounds_change: bool = True
    why_fixed_bounds: str = "this deployment's bounds cannot change"
    #: A worker can be stopped and launched anew (not a fixed URL): one NOT_READY past
    #: ``replace_after`` is replaced where it can be, else kept out of rotation.
    relaunches: bool = True


class Provisioner(ABC):
    name: str
    capabilities: Capabilities = Capabilities()
    #: How workers split between spot and on-demand machines (None: no such split).
    spot_plan: SpotPlan | None = None

    @property
    def relaunches(self) -> bool:
        """Whether a worker can be stopped and launched anew (``capabilities.relaunches``)."""
        return self.capabilities.relaunches

    @abstractmethod
    async def launch(self, worker: Worker) -> None:
        """Create the resource; sets ``worker.url`` (and ``pid`` where there is one)."""

    @abstractmethod
    async def terminate(self, worker: Worker) -> None:
        """Remove the resource. Must be safe to call twice and on a half-launched worker."""

    def endpoint(self, worker: Worker) -> str | None:
        return worker.url

    def command_line(self, worker: Worker) -> str | None:
        """The command line ``worker`` runs, where the provisioner knows it (None elsewhere)."""
        return None

    def use_config(self, cfg: DeploymentConfig) -> None:
        """Launch the workers started from now on from ``cfg`` (``flockctl update``); those
        running keep what they run. Raises ``NotImplementedError`` where it cannot."""
        raise NotImplementedError(f"the {self.name} provisioner cannot update its workers")

    def use_group(self, name: str, cfg: DeploymentConfig | None) -> None:  # noqa: B027
        """Launch group ``name``'s workers from ``cfg`` (its own config, resolved) from now on,
        or forget the group (None: an update dropped it). Local workers carry their group's
        command themselves, so by default there is nothing to keep."""

    def carries_over(self, worker: Worker) -> bool:
        """Whether ``worker`` already runs what its group (or the deployment) was last given
        (``use_config``, ``use_group``), so an update keeps it instead of replacing it: a
        static URL the new list keeps is the same server. False by default: a new version
        gets new workers."""
        return False

    def add_endpoint(self, url: str) -> None:
        """Take one more worker URL; only where ``capabilities.takes_urls``."""
        raise NotImplementedError(f"the {self.name} provisioner takes no worker URLs")

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
