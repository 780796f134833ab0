"""An update of a running deployment to its next version (``flockctl update``, ``POST /-/update``).

The controller launches workers of the new version from the moment the update starts (the
autoscaler's target applies to them); this state machine, stepped on the controller's clock,
decides how many of them may run at once and when the old version's workers drain:

- ``rolling``: at most ``max_surge`` workers above the target at once; each new worker that is
  READY lets one old worker drain, until no old worker is left;
- ``blue-green``: a full set of new workers; once all of them are READY the old set drains at once
  (drained workers get no new request; those in flight finish within the drain timeout).

Old workers keep serving until new ones are READY, so no request waits for want of a worker. A
worker that already runs what the new version runs (``Provisioner.carries_over``: a static URL
the new list keeps, a SkyPilot cluster whose task did not change) is not replaced: it moves to the
new version at once and counts as up, and back to the old one if the update rolls back. New
workers that fail (the controller's crash-loop guard stops launching, or one is not READY within
``timeout`` seconds of its launch) roll the update back: the controller returns to the old
version, the new workers drain, and ``reason`` says why. The update is done once no worker of the
old version is left, running or draining.

A deployment with worker groups updates one group at a time (``Rollout``: each group's part is
an ``Update`` of that group's controller, and a failing group rolls back alone). A daemon killed
while an update ran leaves a ``RecordedUpdate`` for the next one: the update is interrupted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flockctl.schema import GroupUpdateView, UpdateProgress, UpdateView
from flockctl.server.config import GROUP_SCALING
from flockctl.server.workers import LIVE, Worker, WorkerState

if TYPE_CHECKING:
    from flockctl.server.controller import Controller

log = logging.getLogger("flockctl.update")

Mode = Literal["rolling", "blue-green"]
MODES: tuple[Mode, ...] = ("rolling", "blue-green")
#: States a worker of the old version holds until the update may end.
_NOT_GONE = LIVE | {WorkerState.DRAINING}


class Update:
    """One update from version ``old`` to ``new`` of the workers one controller keeps.

    ``on_end(update)`` runs once, when it succeeded or was rolled back, after the controller was
    moved back to ``old`` in the latter case: the deployment records the version it now runs.
    """

    def __init__(
        self,
        controller: Controller,
        update_id: str,
        old: int,
        new: int,
        mode: Mode = "rolling",
        max_surge: int = 1,
        timeout: float = 600.0,
        on_end: Callable[[Update], None] | None = None,
        rollback_to: int | None = None,
    ) -> None:
        self.controller = controller
        self.id = update_id
        self.old = old
        self.new = new
        self.mode: Mode = mode
        self.max_surge = max_surge
        self.timeout = timeout
        self.on_end = on_end
        #: The version whose config this update brings back (``flockctl update --rollback``).
        self.rollback_to = rollback_to
        self.state: Literal["running", "succeeded", "rolled_back"] = "running"
        self.reason: str | None = None
        self.started_at = time.time()
        self.ended_at: float | None = None
        controller.version = new
        controller.update = self
        #: Workers that serve the new version as they are (``Provisioner.carries_over``: a
        #: static URL the new list keeps), moved to it at once, with the model each had.
        self.carried: dict[str, tuple[Worker, str | None]] = {}
        group = controller.group
        for worker in controller.others():
            if controller.provisioner.carries_over(worker):
                self.carried[worker.id] = (worker, worker.model)
                worker.version = new
                if group is not None:
                    _relabel(worker, worker.model, group.model)
        if self.carried:
            controller.pool.models_changed()
        self._set_cap()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def recorded_versions(self) -> dict[str, int]:
        """The version to record for each carried worker while the update runs: the old one,
        which it serves as well, so a daemon restarted mid-update keeps it rather than drain it
        with the new version's workers."""
        return {worker_id: self.old for worker_id in self.carried} if self.running else {}

    def _set_cap(self) -> None:
        controller = self.controller
        if self.mode == "blue-green":
            controller.update_cap = None
        else:
            old = len(controller.others())
            controller.update_cap = max(0, controller.target + self.max_surge - old)

    def step(self, now: float) -> None:
        """Check the new workers, then drain the old ones their READY peers replace."""
        if not self.running:
            return
        controller = self.controller
        if controller.blocked is not None:
            self.roll_back(self._crash_loop())
            return
        new = controller.live()
        for worker in new:
            if worker.id in self.carried:
                continue
            if not worker.ever_ready and now - worker.created_at > self.timeout:
                self.roll_back(
                    f"worker {worker.id} of version {self.new} was not READY within"
                    f" {self.timeout:g}s (--update-timeout)"
                )
                return
        # A carried worker serves as it did before the update, READY or not: it counts as up.
        ready = sum(1 for w in new if w.state == WorkerState.READY or w.id in self.carried)
        old = controller.others()
        target = controller.target
        if self.mode == "blue-green":
            surplus = len(old) if ready >= target else 0
        else:
            surplus = len(old) + ready - target
        if surplus > 0:
            from flockctl.server.controller import scale_down_order

            for worker in scale_down_order(old, waiting=False)[:surplus]:
                log.info("update %s: draining %s of version %d", self.id, worker.id, self.old)
                controller.drain(worker)
        self._set_cap()
        # With carried workers the new ones must all be READY too (a static URL added).
        enough = min(target, 1) if not self.carried else target
        if not controller.others(_NOT_GONE) and ready >= enough:
            self._end("succeeded", None)

    def _crash_loop(self) -> str:
        """Why the crash-loop guard stopped the new version, naming its last failed worker."""
        controller = self.controller
        failed = [
            w
            for w in controller.pool
            if controller.owns(w) and w.version == self.new and w.state == WorkerState.FAILED
        ]
        said = f"{controller.start_failures} workers of version {self.new} in a row failed"
        if not failed:
            return f"{said} before becoming READY"
        last = max(failed, key=lambda w: w.ended_at or 0.0)
        return (
            f"{said} before becoming READY (last, {last.id}: {last.reason}); see"
            f" flockctl logs {last.id}"
        )

    def roll_back(self, reason: str) -> None:
        """Give up the new version: the controller keeps the old one, the new workers drain."""
        if not self.running:
            return
        controller = self.controller
        log.error("update %s to version %d rolled back: %s", self.id, self.new, reason)
        controller.version = self.old
        controller.update_cap = None
        controller.blocked = None
        controller.start_failures = 0
        for worker, model in self.carried.values():
            if worker.version == self.new:
                _relabel(worker, worker.model, model)
                worker.version = self.old
        if self.carried:
            controller.pool.models_changed()
        for worker in controller.others():
            controller.drain(worker)
        self._end("rolled_back", reason)

    def _end(self, state: Literal["succeeded", "rolled_back"], reason: str | None) -> None:
        self.state = state
        self.reason = reason
        self.ended_at = time.time()
        self.controller.update_cap = None
        if state == "succeeded":
            log.info("update %s: version %d serves", self.id, self.new)
        if self.on_end is not None:
            self.on_end(self)

    def progress(self) -> UpdateProgress:
        controller = self.controller
        mine = [w for w in controller.pool if controller.owns(w)]
        new = [w for w in mine if w.version == self.new]
        old = [w for w in mine if w.version == self.old]
        return {
            "target": controller.target,
            "new_live": sum(1 for w in new if w.live),
            "new_ready": sum(1 for w in new if w.state == WorkerState.READY),
            "old_live": sum(1 for w in old if w.live),
            "old_draining": sum(1 for w in old if w.state == WorkerState.DRAINING),
        }

    def to_dict(self) -> UpdateView:
        """The update as the status snapshot shows it (``deployment.update``)."""
        return {
            "id": self.id,
            "from_version": self.old,
            "to_version": self.new,
            "rollback_to": self.rollback_to,
            "mode": self.mode,
            "max_surge": self.max_surge,
            "update_timeout": self.timeout,
            "state": self.state,
            "reason": self.reason,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "progress": self.progress(),
            "groups": [],
        }


def _relabel(worker: Worker, was: str | None, model: str | None) -> None:
    """Say that ``worker`` serves ``model`` (its group's, in the version it moves to) instead of
    ``was``, in its listed models too."""
    if was == model:
        return
    worker.model = model
    if worker.models:
        listed = [m for m in worker.models if m != was]
        worker.models = tuple(dict.fromkeys([*([model] if model else []), *listed]))


@dataclass
class GroupStep:
    """One group's part of a ``Rollout``: ``change`` is update, add or remove."""

    name: str
    change: Literal["update", "add", "remove"]
    state: str = "pending"
    reason: str | None = None

    def to_dict(self) -> GroupUpdateView:
        return {
            "name": self.name,
            "change": self.change,
            "state": self.state,
            "reason": self.reason,
        }


class Rollout:
    """An update of a deployment with worker groups: one group at a time, in ``steps``' order.

    ``begin(step)`` starts a group's part and returns its ``Update`` (the group rolls within its
    own bounds, and rolls back alone), or None for a part done at once (a removed group drains).
    When a group's update ends its ``on_end`` calls ``part_ended``: a rolled-back group ends the
    rollout (the groups after it are skipped; those before it keep the new version), else the
    next group begins. ``on_end(rollout)`` runs once, at the end.
    """

    def __init__(
        self,
        update_id: str,
        old: int,
        new: int,
        steps: list[GroupStep],
        begin: Callable[[GroupStep], Update | None],
        on_end: Callable[[Rollout], None],
        mode: Mode = "rolling",
        max_surge: int = 1,
        timeout: float = 600.0,
        rollback_to: int | None = None,
    ) -> None:
        self.id = update_id
        self.old = old
        self.new = new
        self.steps = steps
        self.mode: Mode = mode
        self.max_surge = max_surge
        self.timeout = timeout
        self.rollback_to = rollback_to
        self._begin = begin
        self.on_end = on_end
        self.state: Literal["running", "succeeded", "rolled_back"] = "running"
        self.reason: str | None = None
        self.started_at = time.time()
        self.ended_at: float | None = None
        #: The group update rolling now, else the last one.
        self.current: Update | None = None
        #: Every group update begun, in order.
        self.parts: list[Update] = []

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def changed(self) -> list[str]:
        """The groups that run the new version's definition (or left) now."""
        return [s.name for s in self.steps if s.state == "succeeded"]

    def start(self) -> None:
        self._next()

    def recorded_versions(self) -> dict[str, int]:
        """``Update.recorded_versions`` of every group's part while the rollout runs (a restart
        undoes the whole rollout, the groups already moved included)."""
        if not self.running:
            return {}
        return {worker_id: part.old for part in self.parts for worker_id in part.carried}

    def _next(self) -> None:
        for step in self.steps:
            if step.state != "pending":
                continue
            step.state = "running"
            log.info("update %s: group %s (%s)", self.id, step.name, step.change)
            update = self._begin(step)
            if update is not None:
                self.current = update
                self.parts.append(update)
                return
            step.state = "succeeded"
        self._end("succeeded", None)

    def part_ended(self, update: Update) -> None:
        """A group's update ended: go on with the next group, or stop at a rolled-back one."""
        step = next(s for s in self.steps if s.state == "running")
        step.state, step.reason = update.state, update.reason
        if update.state == "succeeded":
            self._next()
            return
        for later in self.steps:
            if later.state == "pending":
                later.state = "skipped"
        kept = self.changed
        said = f"group {step.name}: {update.reason}"
        if kept:
            said += f"; {', '.join(kept)} kept the new version {self.new}"
        self._end("rolled_back", said)

    def _end(self, state: Literal["succeeded", "rolled_back"], reason: str | None) -> None:
        self.state, self.reason, self.ended_at = state, reason, time.time()
        self.on_end(self)

    def to_dict(self) -> UpdateView:
        current = self.current
        progress: UpdateProgress = (
            current.progress()
            if current is not None
            else {"target": 0, "new_live": 0, "new_ready": 0, "old_live": 0, "old_draining": 0}
        )
        return {
            "id": self.id,
            "from_version": self.old,
            "to_version": self.new,
            "rollback_to": self.rollback_to,
            "mode": self.mode,
            "max_surge": self.max_surge,
            "update_timeout": self.timeout,
            "state": self.state,
            "reason": self.reason,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "progress": progress,
            "groups": [s.to_dict() for s in self.steps],
        }


class RecordedUpdate:
    """The last update as a killed daemon recorded it, taken up by the daemon started next.

    One that was still running was cut short (``interrupted``): the old version serves on, and
    the new version's workers that were up drain. It stays the last update
    (``deployment.update``) until the next one starts.
    """

    running = False

    def __init__(self, view: UpdateView, drained: int) -> None:
        self.id = view["id"]
        self.old = view["from_version"]
        self.new = view["to_version"]
        self.state = view["state"]
        self.reason = view["reason"]
        if self.state == "running":
            self.state = "interrupted"
            self.reason = (
                f"the daemon restarted while this update ran; version {self.old} serves on and"
                f" the {drained} worker{'s' if drained != 1 else ''} of version {self.new} that"
                " were up drain; run the same flockctl update again to retry it"
            )
            view = {**view, "state": self.state, "reason": self.reason, "ended_at": time.time()}
        self._view: UpdateView = {"groups": [], **view}  # an earlier daemon's has no groups

    def to_dict(self) -> UpdateView:
        return self._view

    def recorded_versions(self) -> dict[str, int]:
        return {}


class UpdateRefused(Exception):
    """An update the deployment cannot start; ``status`` is the admin API's answer (409: not
    now or not here, 422: a field of the new config that cannot change)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


#: The config fields an update may change: what runs on a worker (for SkyPilot, the task and
#: how its clusters launch) and how many run. The rest (the balancer's address, keys, limits,
#: the probe) belong to the daemon and need ``up``.
UPDATABLE = (
    frozenset({"model", "worker_command", "engine_args", "draft_models", "workdir", "endpoints"})
    | frozenset(GROUP_SCALING)
    | frozenset(
        {
            "task",
            "worker_port",
            "base_ondemand_fallback_replicas",
            "dynamic_ondemand_fallback",
            "launch_attempts",
            "launch_backoff",
        }
    )
)


def fixed_fields(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """The fields that differ between two configs (as JSON) and that an update cannot change."""
    return sorted(
        k for k in old.keys() | new.keys() if k not in UPDATABLE and old.get(k) != new.get(k)
    )
