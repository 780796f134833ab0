"""Workers that already exist: fixed URLs given with ``--endpoint``.

Nothing is started or stopped; the provisioner only hands out the URLs not yet in use, so the
pool never holds more workers than there are endpoints. A URL may be added at run time
(``POST /-/workers {"url": ...}``). An endpoint that stops answering cannot be relaunched: it stays
out of rotation until a probe passes again, however long that takes.

With worker groups each group lists its own endpoints, and a worker of a group only ever gets
one of its group's URLs; a URL added at run time joins the first group (whose controller adds
the operator's workers).

An update (``flockctl update``) hands over a new list: a worker at a URL the new list keeps is
the same server, so it stays and serves the new version (``carries_over``); new URLs get new
workers; workers at URLs the list dropped drain once the new ones are READY.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flockctl.server.provisioners.base import Capabilities, Provisioner
from flockctl.server.workers import Worker

if TYPE_CHECKING:
    from flockctl.server.config import DeploymentConfig


class StaticProvisioner(Provisioner):
    name = "static"
    capabilities = Capabilities(
        takes_urls=True,
        has_logs=False,
        why_no_logs="it is a static endpoint",
        bounds_change=False,
        why_fixed_bounds=(
            "a static deployment has one worker per endpoint; its bounds cannot change"
        ),
        relaunches=False,
    )

    def __init__(self, endpoints: list[str], groups: dict[str, list[str]] | None = None) -> None:
        self.endpoints = [u.rstrip("/") for u in endpoints]
        #: Each group's own endpoints, by group name, in the SPEC's order.
        self.groups = {name: [u.rstrip("/") for u in urls] for name, urls in (groups or {}).items()}
        self._in_use: dict[str, str] = {}  # worker id -> url

    @classmethod
    def from_config(cls, cfg: DeploymentConfig) -> StaticProvisioner:
        """The deployment's endpoints, or with groups each group's."""
        return cls(cfg.endpoints, {g.name: list(g.endpoints or []) for g in cfg.groups})

    def _list(self, group: str | None) -> list[str]:
        """The endpoints a worker of ``group`` may get."""
        return self.groups.get(group, self.endpoints) if group is not None else self.endpoints

    def add_endpoint(self, url: str) -> None:
        url = url.rstrip("/")
        urls = next(iter(self.groups.values()), self.endpoints)
        if all(url not in known for known in (self.endpoints, *self.groups.values())):
            urls.append(url)

    def use_config(self, cfg: DeploymentConfig) -> None:
        """The new endpoint list replaces the old one; a worker already at an old URL keeps it
        until it is drained."""
        self.endpoints = [u.rstrip("/") for u in cfg.endpoints]

    def use_group(self, name: str, cfg: DeploymentConfig | None) -> None:
        """Group ``name``'s new endpoint list replaces its old one (None: the group is gone); a
        worker at a URL the list no longer has keeps it until it is drained."""
        if cfg is None:
            self.groups.pop(name, None)
        else:
            self.groups[name] = [u.rstrip("/") for u in cfg.endpoints]

    def carries_over(self, worker: Worker) -> bool:
        """A worker whose URL its list still has: the same server serves the new version."""
        return worker.url is not None and worker.url in self._list(worker.group)

    def capacity(self, live: int) -> int | None:
        in_use = set(self._in_use.values())
        every = [u for urls in (self.endpoints, *self.groups.values()) for u in urls]
        return sum(1 for u in every if u not in in_use)

    async def launch(self, worker: Worker) -> None:
        free = [u for u in self._list(worker.group) if u not in self._in_use.values()]
        if not free:
            if worker.group is not None and worker.group in self.groups:
                raise RuntimeError(f"every endpoint of group {worker.group!r} already has a worker")
            raise RuntimeError("every --endpoint already has a worker")
        worker.url = free[0]
        self._in_use[worker.id] = free[0]

    async def terminate(self, worker: Worker) -> None:
        self.forget(worker)

    def forget(self, worker: Worker) -> None:
        self._in_use.pop(worker.id, None)
