"""Worker groups: one controller and one autoscaler per group, each scaling on its own queue.

A deployment without ``flockctl: groups`` is one group (the deployment's own controller, whose
workers have no group), exactly as before groups existed. With groups, each declared group has
its own controller and autoscaler policy over the same pool, provisioner and prober; the first
group also adopts the workers a previous daemon left running. Groups run local workers (each its
model or command), static ones (each its endpoints, one worker per URL: a fixed size) or SkyPilot
clusters (each its own task); the one provisioner launches a worker from its group's part.

An update (``flockctl update``) redefines a group in place (``redefine``), adds or removes one;
each hands the group's new definition to the provisioner (``Provisioner.use_group``), so its next
workers get the group's new endpoints or task.

An operator starting a worker with another model (``POST /-/workers {"model"}``, the dashboard's
``m``) puts it in the group of that model, made on the spot when there is none (bounds 1 to the
deployment's ``max_workers``), so no other group's autoscaler ever scales it down.

A group's queue is the requests waiting for its models (its declared model and every model its
workers have listed); the deployment's first group also counts the requests naming no model,
or a model no group is known to serve.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from flockctl.schema import GroupView
from flockctl.server.autoscaler import AutoscalerPolicy
from flockctl.server.config import DeploymentConfig, GroupConfig
from flockctl.server.controller import Controller, WorkerGroup
from flockctl.server.pool import WorkerPool
from flockctl.server.workers import Worker, WorkerIds, WorkerState

#: Builds the controller of one group: (group or None, its config, its policy, options).
ControllerFactory = Callable[..., Controller]


class Groups:
    """Every group's controller, and what each one is fed (its queue) and shows (its view)."""

    def __init__(
        self,
        cfg: DeploymentConfig,
        pool: WorkerPool,
        make_policy: Callable[[DeploymentConfig], AutoscalerPolicy],
        make_controller: ControllerFactory,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.make_policy = make_policy
        self.make_controller = make_controller
        self.ids = WorkerIds()
        self.controllers: list[Controller] = []
        self._models: dict[str | None, set[str]] = {}
        self._configs: dict[str | None, DeploymentConfig] = {}
        if not cfg.groups:
            self._add(None, cfg, adopts=True)
        for index, declared in enumerate(cfg.groups):
            own = cfg.group_config(declared)
            command = own.local_command() if own.provisioner == "local" else None
            group = WorkerGroup(declared.name, command, declared.model)
            self._add(group, own, adopts=index == 0)
        self._declare()

    def __iter__(self) -> Iterator[Controller]:
        return iter(list(self.controllers))

    @property
    def primary(self) -> Controller:
        """The deployment's own controller (no groups), else the first group's."""
        return self.controllers[0]

    @property
    def named(self) -> bool:
        """Whether any group has a name (declared, or made for a model at run time)."""
        return any(c.group is not None for c in self.controllers)

    def _add(
        self,
        group: WorkerGroup | None,
        own: DeploymentConfig,
        adopts: bool,
        initial: int | None = None,
    ) -> Controller:
        name = None if group is None else group.name
        self._models[name] = {m for m in (own.model,) if m}
        self._configs[name] = own
        controller = self.make_controller(
            group,
            own,
            self.make_policy(own),
            initial_target=own.initial_target() if initial is None else initial,
            ids=self.ids,
            queue=lambda: self.queued(name),
            arrivals=None if group is None else lambda: self.arrived(name),
            adopts=adopts,
            group_of=self.group_of,
        )
        self.controllers.append(controller)
        return controller

    def config_of(self, controller: Controller) -> DeploymentConfig:
        return self._configs[None if controller.group is None else controller.group.name]

    # -- a new version's groups (flockctl update) ----------------------------------------------

    def add_group(self, declared: GroupConfig, own: DeploymentConfig) -> Controller:
        """A group the new version declares: its controller starts at once, with no worker."""
        self.primary.provisioner.use_group(declared.name, own)
        command = own.local_command() if own.provisioner == "local" else None
        controller = self._add(WorkerGroup(declared.name, command, declared.model), own, False)
        self._declare()
        return controller

    def redefine(
        self, controller: Controller, declared: GroupConfig, own: DeploymentConfig
    ) -> None:
        """The workers ``controller`` launches from now on run ``declared``'s model or command
        (its endpoints, its task)."""
        controller.provisioner.use_group(declared.name, own)
        command = own.local_command() if own.provisioner == "local" else None
        controller.group = WorkerGroup(declared.name, command, declared.model)
        self._configs[declared.name] = own
        self._models[declared.name] = {m for m in (own.model,) if m}
        self._declare()

    def remove(self, controller: Controller) -> None:
        """Forget a group the new version no longer declares (stopping it is the caller's)."""
        self.controllers.remove(controller)
        if controller.group is not None:
            controller.provisioner.use_group(controller.group.name, None)
            self._configs.pop(controller.group.name, None)
            self._models.pop(controller.group.name, None)
        self._declare()

    # -- which group -------------------------------------------------------------------------

    def of_worker(self, worker: Worker) -> Controller:
        """The controller that keeps ``worker``."""
        for controller in self.controllers:
            if controller.owns(worker):
                return controller
        return self.primary

    def group_of(self, worker: Worker) -> str | None:
        """The group a re-adopted worker rejoins: the one its provisioner recorded (a SkyPilot
        cluster's), else the one running its command, else the first."""
        names = {c.group.name for c in self.controllers if c.group is not None}
        if worker.group in names:
            return worker.group
        for controller in self.controllers:
            group = controller.group
            if group is not None and group.command is not None and worker.command == group.command:
                return group.name
        first = self.primary.group
        return None if first is None else first.name

    def named_group(self, name: str) -> Controller | None:
        """The controller of the group called ``name`` (``default``: the deployment's own)."""
        for controller in self.controllers:
            if (controller.group.name if controller.group else "default") == name:
                return controller
        return None

    def for_model(self, model: str, command: str) -> Controller:
        """The controller of the group serving ``model``, made now (running ``command``) if no
        group serves it; a deployment whose own controller runs ``model`` keeps it there."""
        for controller in self.controllers:
            if controller.group is None and self.cfg.model == model:
                return controller
            if controller.group is not None and controller.group.model == model:
                return controller
        taken = {c.group.name for c in self.controllers if c.group is not None}
        name = base = _group_name(model)
        n = 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        own = self.cfg.model_copy(
            update={"model": model, "worker_command": None, "groups": [], "min_workers": 1}
        )
        # It starts empty: the operator's worker is its first.
        controller = self._add(WorkerGroup(name, command, model), own, adopts=False, initial=0)
        self._declare()
        return controller

    # -- queues ------------------------------------------------------------------------------

    def _declare(self) -> None:
        """Tell the pool every model a group serves, so routing by model knows them while a
        group has no worker."""
        declared = frozenset(m for models in self._models.values() for m in models)
        if declared != self.pool.declared_models:
            self.pool.declared_models = declared
            self.pool.models_changed()

    def _learn(self) -> None:
        """Add the models each group's workers listed to the group's models (a group an update
        removed has none, though its stopped workers stay in the pool a while)."""
        changed = False
        for worker in self.pool:
            if not worker.models or worker.group not in self._configs:
                continue
            models = self._models.setdefault(worker.group, set())
            if not models.issuperset(worker.models):
                models.update(worker.models)
                changed = True
        if changed:
            self._declare()

    def queued(self, name: str | None) -> int:
        """Requests waiting for group ``name``'s workers."""
        return self._share(name, self.pool.queued_by_model())

    def arrived(self, name: str | None) -> int:
        """Requests that arrived for group ``name`` so far (its request-rate autoscaler's)."""
        return self._share(name, self.pool.arrived_by_model)

    def _share(self, name: str | None, by_model: dict[str | None, int]) -> int:
        """Group ``name``'s part of counts by model: its models', and for the first group also
        those of no model or of a model no group is known to serve."""
        self._learn()
        mine = self._models.get(name, set())
        count = sum(n for model, n in by_model.items() if model in mine)
        first = self.primary.group
        if name == (None if first is None else first.name):
            claimed = {m for models in self._models.values() for m in models}
            count += sum(
                n for model, n in by_model.items() if model is None or model not in claimed
            )
        return count

    # -- the status snapshot -----------------------------------------------------------------

    def views(self) -> list[GroupView]:
        """One line per group (``groups`` in the snapshot); empty without named groups."""
        if not self.named:
            return []
        out: list[GroupView] = []
        for controller in self.controllers:
            group = controller.group
            name = None if group is None else group.name
            workers = [w for w in self.pool if controller.owns(w)]
            out.append(
                {
                    "name": name or "default",
                    "model": group.model if group is not None else self.cfg.model,
                    "models": sorted(self._models.get(name, set())),
                    "version": controller.serving_version,
                    "policy": controller.policy.name,
                    "target": controller.target,
                    "min_workers": controller.policy.min_workers,
                    "max_workers": controller.policy.max_workers,
                    "queued": controller.queued,
                    "in_flight": sum(w.in_flight for w in workers),
                    "live": sum(1 for w in workers if w.live),
                    "ready": sum(1 for w in workers if w.state == WorkerState.READY),
                    "last_decision": controller.last_decision.to_dict(),
                    "launch_blocked": controller.blocked,
                }
            )
        return out


def _group_name(model: str) -> str:
    """A group name for a model: its last path part, in the characters a name may hold."""
    tail = model.rstrip("/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", tail).strip("-.") or "model"
    return cleaned[:40]
