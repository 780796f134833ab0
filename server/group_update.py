"""What an update of a deployment with worker groups changes, group by group (pure: no I/O).

A new config (a SPEC, or the running config with one group's new definition: ``flockctl update
--group NAME``) is compared with the running one group by group, each group as it runs (its own
model or command, engine flags and autoscaler settings, with what it takes from the deployment):

- a group whose resolved definition changed is updated (rolling or blue-green, within its bounds);
- a group only the new config declares is added (started; rolled back when it cannot get READY);
- a group the new config no longer declares is removed (its workers drain).

The ``Rollout`` takes them one at a time, added groups first and removed ones last, so capacity
comes before it goes. What is kept out is refused by name: adding groups to a deployment without
any or dropping them all, renaming a group (a removal and an addition that run the same thing),
moving the first group (it takes the requests that name no model), and moving a static URL from
one group to another (the two groups would hold it at once).

Local, static and SkyPilot groups update alike: the provisioner gets the group's new definition
(``Provisioner.use_group``: its command, endpoint list or task) when the group's turn comes, and
back when the group rolls back. A worker that already runs the new definition (a static URL the
group keeps, a cluster of a group whose task did not change) is kept and moves to the new version
in place; the others are replaced, new ones READY before old ones drain.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from flockctl.server.config import DeploymentConfig, GroupConfig
from flockctl.server.update import UPDATABLE, GroupStep, Rollout, UpdateRefused

_RESTART = "restart the deployment with flockctl down and flockctl up"


def runs(cfg: DeploymentConfig, group: GroupConfig) -> dict[str, Any]:
    """What a group's workers run and how many, resolved: two groups differ where this does."""
    return cfg.group_config(group).model_dump(mode="json")


def grouped_config(
    old: DeploymentConfig, new: DeploymentConfig, group: str | None, taken: Collection[str]
) -> DeploymentConfig:
    """The config an update of a deployment with groups moves to, or ``UpdateRefused``.

    ``group`` limits it to that group (its definition from ``new``; the rest stays as it runs).
    ``taken`` holds the names of the groups running now, those made at run time included.
    """
    if not old.groups:
        if group is not None:
            raise UpdateRefused(
                f"group: this deployment has no groups, so none named {group!r}", 422
            )
        raise UpdateRefused(
            f"groups: an update cannot add groups to a deployment without any; {_RESTART}", 422
        )
    if not new.groups:
        raise UpdateRefused(
            f"groups: the new config declares no groups; to run without them, {_RESTART}", 422
        )
    old_by = {g.name: g for g in old.groups}
    new_by = {g.name: g for g in new.groups}
    if group is not None:
        if group not in old_by:
            raise UpdateRefused(f"group: no group {group!r} (the groups: {', '.join(old_by)})", 422)
        if group not in new_by:
            raise UpdateRefused(f"group: the new config declares no group {group!r}", 422)
        groups = [new_by[group] if g.name == group else g for g in old.groups]
        kept = {key: getattr(old, key) for key in UPDATABLE}
        new = new.model_copy(update={**kept, "groups": groups})
        new_by = {g.name: g for g in new.groups}
    first = old.groups[0].name
    if new.groups[0].name != first:
        raise UpdateRefused(
            f"groups: the first group ({first}) takes the requests that name no model, so it stays"
            f" first under its name; to change that, {_RESTART}",
            422,
        )
    added = [n for n in new_by if n not in old_by]
    for name in added:
        for gone in (n for n in old_by if n not in new_by):
            if _work(old_by[gone]) == _work(new_by[name]):
                raise UpdateRefused(
                    f"groups: {gone} renamed to {name}: a group keeps its name in an update (add"
                    f" {name} in one update and remove {gone} in the next, or {_RESTART})",
                    422,
                )
        if name in taken:
            raise UpdateRefused(
                f"groups: a group named {name!r} already runs (made for its model)", 422
            )
    _check_moved_endpoints(old, new)
    return new


def _check_moved_endpoints(old: DeploymentConfig, new: DeploymentConfig) -> None:
    """A URL is one group's worker at a time, and the groups move one after another: a URL the
    new config puts in another group would be taken by two groups at once."""
    was = {u.rstrip("/"): g.name for g in old.groups for u in g.endpoints or []}
    for index, g in enumerate(new.groups):
        for url in g.endpoints or []:
            other = was.get(url.rstrip("/"))
            if other is not None and other != g.name:
                raise UpdateRefused(
                    f"groups.{index}.endpoints: {url} moves from group {other} to group"
                    f" {g.name}; a server is one group's worker at a time (drop it from {other}"
                    f" in one update and add it to {g.name} in the next)",
                    422,
                )


def _work(group: GroupConfig) -> tuple[Any, ...]:
    """What a group's workers run, whatever its name and bounds (a rename keeps it)."""
    endpoints = sorted(u.rstrip("/") for u in group.endpoints or [])
    return group.model, group.worker_command, endpoints, group.task


def group_steps(old: DeploymentConfig, new: DeploymentConfig) -> list[GroupStep]:
    """Each group's part of the update, in the order the rollout takes them."""
    old_by = {g.name: g for g in old.groups}
    new_by = {g.name: g for g in new.groups}
    steps = [GroupStep(n, "add") for n in new_by if n not in old_by]
    steps += [
        GroupStep(n, "update")
        for n, g in new_by.items()
        if n in old_by and runs(old, old_by[n]) != runs(new, g)
    ]
    steps += [GroupStep(n, "remove") for n in old_by if n not in new_by]
    if not steps:
        raise UpdateRefused("groups: the new config changes no group", 422)
    return steps


def what_runs(old: DeploymentConfig, new: DeploymentConfig, rollout: Rollout) -> DeploymentConfig:
    """The config that runs once ``rollout`` ended: the new version's definition of every group
    whose part succeeded (or that did not change), the old one's of the rest."""
    if rollout.state == "succeeded":
        return new
    done = {s.name for s in rollout.steps if s.state == "succeeded"}
    changes = {s.name: s.change for s in rollout.steps}
    old_by = {g.name: g for g in old.groups}
    groups: list[GroupConfig] = []
    for g in new.groups:
        if g.name not in changes or g.name in done:
            groups.append(g)
        elif changes[g.name] == "update":
            groups.append(old_by[g.name])
    groups += [old_by[n] for n, c in changes.items() if c == "remove" and n not in done]
    return new.model_copy(update={"groups": groups})
