"""What an update will do, decided before it starts (pure: no I/O).

``resolve`` is the one place that says whether an update may start: the new config as it will
run (with groups, ``grouped_config``'s), each group's part in the rollout's order, or
``UpdateRefused`` naming the field. The daemon starts an update from its answer, and
``flockctl update --dry-run`` shows the same answer as a plan (``plan``), one entry per group,
each with what changes and what happens to its workers, with nothing started.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from flockctl.server.config import DeploymentConfig
from flockctl.server.group_update import group_steps, grouped_config
from flockctl.server.update import GroupStep, UpdateRefused, fixed_fields

#: The fields of a SkyPilot worker's launch: a cluster launched from the same ones is kept.
_LAUNCH = ("task", "worker_port", "workdir")


def resolve(
    old: DeploymentConfig, new: DeploymentConfig, group: str | None, taken: Collection[str]
) -> tuple[DeploymentConfig, list[GroupStep]]:
    """The config an update from ``old`` moves to, and each group's part (empty without
    groups), or ``UpdateRefused``. ``group`` and ``taken`` are ``grouped_config``'s."""
    grouped = bool(old.groups or new.groups or group is not None)
    if grouped:
        new = grouped_config(old, new, group, taken)
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    if grouped:
        before.pop("groups"), after.pop("groups")
    fixed = fixed_fields(before, after)
    if fixed:
        raise UpdateRefused(
            f"{', '.join(fixed)}: cannot change with flockctl update (only what runs on the"
            " workers and how many may); restart with flockctl down and flockctl up",
            422,
        )
    if not grouped and new.provisioner == "static" and set(new.endpoints) <= set(old.endpoints):
        raise UpdateRefused(
            "endpoints: the new version needs an endpoint the running one does not use"
            " (--endpoint URL ...: the new list replaces the old)",
            422,
        )
    return new, group_steps(old, new) if grouped else []


@dataclass
class GroupPlan:
    """One group's part of a planned update (``default``: a deployment without groups)."""

    name: str
    change: str
    #: What differs, one line per field (``endpoints: +URL, -URL``).
    changes: list[str] = field(default_factory=list)
    #: What happens to the group's workers.
    workers: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(old: DeploymentConfig, new: DeploymentConfig, steps: list[GroupStep]) -> list[GroupPlan]:
    """Each group's part of the update from ``old`` to ``new`` (``resolve``'s answer), in the
    rollout's order, then the groups it leaves as they are."""
    if not steps:
        return [_update("default", old, new)]
    old_by = {g.name: old.group_config(g) for g in old.groups}
    new_by = {g.name: new.group_config(g) for g in new.groups}
    out: list[GroupPlan] = []
    for step in steps:
        if step.change == "add":
            own = new_by[step.name]
            changes = [f"{k}: {_show(v)}" for k, v in _runs(own).items() if v not in (None, [])]
            out.append(GroupPlan(step.name, "add", changes, _starts(own)))
        elif step.change == "remove":
            out.append(GroupPlan(step.name, "remove", [], "drained, then stopped"))
        else:
            out.append(_update(step.name, old_by[step.name], new_by[step.name]))
    moved = {s.name for s in steps}
    out += [GroupPlan(n, "none", [], "kept as they are") for n in new_by if n not in moved]
    return out


def _runs(own: DeploymentConfig) -> dict[str, Any]:
    """What a group's workers run and how many, as the plan names it (a static group: its
    endpoints, one worker each)."""
    values = own.model_dump(mode="json")
    if own.provisioner == "static":
        keys: tuple[str, ...] = ("model", "endpoints")
    else:
        what = "task" if own.provisioner == "skypilot" else "worker_command"
        keys = ("model", what, "autoscaler", "replicas", "min_workers", "max_workers")
    return {k: values[k] for k in keys}


def _starts(own: DeploymentConfig) -> str:
    if own.provisioner == "static":
        return f"{len(own.endpoints)} added, one per endpoint, READY before the next group moves"
    return f"{own.initial_target()} started, READY before the next group moves"


def _update(name: str, old: DeploymentConfig, new: DeploymentConfig) -> GroupPlan:
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    changes: list[str] = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if key == "groups" or was == now:
            continue
        if key == "endpoints":
            changes.append(f"endpoints: {_endpoints(was or [], now or [])}")
        elif key == "task" and isinstance(was, dict) and isinstance(now, dict):
            for part in sorted(was.keys() | now.keys()):
                if was.get(part) != now.get(part):
                    changes.append(f"task.{part}: {_show(was.get(part))} -> {_show(now.get(part))}")
        else:
            changes.append(f"{key}: {_show(was)} -> {_show(now)}")
    return GroupPlan(name, "update", changes, _moves(old, new))


def _moves(old: DeploymentConfig, new: DeploymentConfig) -> str:
    """What an update does to a group's workers (``Provisioner.carries_over``, foreseen)."""
    if new.provisioner == "static":
        kept = [u for u in new.endpoints if u in old.endpoints]
        added = [u for u in new.endpoints if u not in old.endpoints]
        dropped = [u for u in old.endpoints if u not in new.endpoints]
        return (
            f"{len(kept)} kept (serving the new version as they are), {len(added)} added"
            f" (READY first), {len(dropped)} drained"
        )
    if new.provisioner == "skypilot":
        same = all(getattr(old, k) == getattr(new, k) for k in _LAUNCH)
        if same and old.uses_spot() == new.uses_spot():
            return "clusters kept (the same task), scaled to the new bounds"
        return "clusters replaced: new ones from the new task READY, then the old ones torn down"
    return "replaced: new workers READY, then the old ones drain"


def _endpoints(was: list[str], now: list[str]) -> str:
    parts = [f"+{u}" for u in now if u not in was] + [f"-{u}" for u in was if u not in now]
    kept = [u for u in now if u in was]
    return ", ".join(parts) + (f" (kept: {', '.join(kept)})" if kept else "")


def _show(value: Any) -> str:
    """A config value on one line, as JSON."""
    return json.dumps(value, separators=(", ", ": "))
