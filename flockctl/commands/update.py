"""``flockctl update``: move a running deployment to its next version (a new model, engine flags,
worker command, endpoints or bounds) without refusing a request, rolling or blue-green, and
follow it until the new version serves or the old one serves again (rolled back).

The new config is resolved as ``flockctl up`` resolves one (defaults, SPEC, flags), over the
config the deployment runs now: what the SPEC and the flags leave out stays as it is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flockctl.client import AdminClient, ClientError
from flockctl.commands.common import JsonOpt, NameOpt, check_name
from flockctl.commands.config_flags import config_flags, flag_names, takes_config_flags
from flockctl.commands.up import resolve_or_exit
from flockctl.commands.up_options import SpecOpt
from flockctl.console import emit_json, fail, say
from flockctl.exitcodes import ExitCode
from flockctl.schema import UpdateView
from flockctl.state import read_json, state_dir

U = "Update"

ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        help="rolling: one new worker READY, then one old worker drains, and so on; blue-green:"
        " a full new set, then the old set drains at once.",
        rich_help_panel=U,
    ),
]
MaxSurgeOpt = Annotated[
    int,
    typer.Option(
        "--max-surge", min=1, help="Workers above the target at once (rolling).", rich_help_panel=U
    ),
]
UpdateTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--update-timeout",
        min=0.001,
        help="Seconds a new worker has to become READY before the update is rolled back.",
        rich_help_panel=U,
    ),
]
RollbackOpt = Annotated[
    bool,
    typer.Option(
        "--rollback", help="Go back to the version that served before this one.", rich_help_panel=U
    ),
]
GroupOpt = Annotated[
    str | None,
    typer.Option(
        "--group",
        help="With worker groups: update this group alone (its definition from the SPEC, or the"
        " worker flags applied to it).",
        rich_help_panel=U,
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Show what the update would do, group by group (what changes, and what happens to"
        " the workers), and start nothing.",
        rich_help_panel=U,
    ),
]
WaitUpdateOpt = Annotated[
    bool,
    typer.Option("--wait/--no-wait", help="Follow the update until it ends.", rich_help_panel=U),
]

#: Config fields that say what runs on a worker: given anew, none of the old ones stays.
_WHAT_RUNS = ("model", "worker_command", "engine_args", "draft_models")
#: The config fields an update takes as flags: what runs on the workers, and how many.
UPDATE_FIELDS = (
    *_WHAT_RUNS,
    "endpoints",
    "min_workers",
    "max_workers",
    "replicas",
    "autoscaler",
    "target_qps_per_replica",
)


@takes_config_flags(UPDATE_FIELDS)
def update(
    spec: SpecOpt = None,
    name: NameOpt = "default",
    mode: ModeOpt = "rolling",
    max_surge: MaxSurgeOpt = 1,
    update_timeout: UpdateTimeoutOpt = 600.0,
    rollback: RollbackOpt = False,
    group: GroupOpt = None,
    flags: dict[str, Any] | None = None,
    wait: WaitUpdateOpt = True,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Update a running deployment to its next version, without refusing a request.

    New workers start from the new config; old ones drain once new ones are READY. New workers
    that fail (crash loop, not READY within --update-timeout) roll the update back: the old
    version keeps serving and the command exits 9 with the reason.

    Examples:

      flockctl update --model Qwen/Qwen2.5-1.5B-Instruct

      flockctl update --worker-command 'vllm serve M --port {port}' --mode blue-green

      flockctl update --endpoint http://10.0.0.7:8000 --endpoint http://10.0.0.8:8000

      flockctl update --rollback

      flockctl update --group chat --model Qwen/Qwen2.5-3B-Instruct

      flockctl update service.yaml --dry-run
    """
    check_name(name)
    if mode not in ("rolling", "blue-green"):
        fail(f"--mode: {mode!r} is not rolling or blue-green", ExitCode.USAGE)
    flags = flags or {}
    given = {key for key, value in flags.items() if value is not None}
    if rollback and (spec is not None or given):
        fail(
            "--rollback takes no SPEC or worker flags: it brings back the previous"
            " version's config",
            ExitCode.USAGE,
        )
    if rollback and group is not None:
        fail(
            "--rollback takes no --group: it brings back the whole previous version", ExitCode.USAGE
        )
    if not rollback and spec is None and not given:
        fail("say what changes: a SPEC, worker flags (--model, ...), or --rollback", ExitCode.USAGE)
    if rollback and dry_run:
        fail("--dry-run takes no --rollback: give the SPEC or flags to compare", ExitCode.USAGE)
    try:
        with AdminClient.for_name(name) as client:
            config = None if rollback else _new_config(name, spec, flags, group)
            if config is not None and dry_run:
                _dry_run(client, name, config, group, mode, as_json)
                return
            try:
                started = client.update(config, mode, max_surge, update_timeout, rollback, group)
            except ClientError as exc:
                if exc.status in (409, 422):
                    fail(f"update refused: {exc}", ExitCode.UPDATE_FAILED)
                raise
            say(
                f"update {started['id']}: version {started['from_version']} ->"
                f" {started['to_version']} ({mode})"
            )
            if not wait:
                _report(started, as_json)
                return
            ended = _follow(client, started["id"])
    except ClientError as exc:
        fail(str(exc), exc.code)
    _report(ended, as_json)
    if ended["state"] != "succeeded":
        fail(
            f"update {ended['id']} to version {ended['to_version']} was"
            f" {ended['state'].replace('_', ' ')}: {ended['reason']}; {_serving(ended)}",
            ExitCode.UPDATE_FAILED,
        )


def _serving(ended: UpdateView) -> str:
    """What serves after an update that did not succeed: the old version, or with groups, the
    new version in the groups whose part succeeded before one rolled back."""
    kept = [g["name"] for g in ended.get("groups", []) if g["state"] == "succeeded"]
    if not kept:
        return f"version {ended['from_version']} serves"
    return (
        f"version {ended['to_version']} serves in group{'s' if len(kept) > 1 else ''}"
        f" {', '.join(kept)}; version {ended['from_version']} in the others"
    )


def _new_config(
    name: str, spec: Path | None, flags: dict[str, Any], group: str | None = None
) -> dict[str, Any]:
    """The new version's config: the SPEC and flags resolved as ``up`` does, over the config
    the deployment runs now (its fields stand where neither says otherwise). With ``group`` and
    no SPEC, the flags apply to that group's definition."""
    from flockctl.server.config import ConfigError
    from flockctl.server.spec_file import load_spec

    current = read_json(state_dir(name) / "config.json")
    if not isinstance(current, dict):
        raise ClientError(f"the deployment {name!r} has no readable config.json in its state dir")
    if group is not None and spec is None:
        return _group_changed(current, group, flags)
    try:
        said = set(load_spec(spec)[0]) if spec is not None else set()
    except ConfigError as exc:
        fail("; ".join(exc.problems), ExitCode.USAGE)
    said |= {key for key, value in flags.items() if value is not None}
    kept = dict(current)
    if said & {"model", "worker_command"}:
        for key in _WHAT_RUNS:
            kept.pop(key, None)
    if said & {"replicas", "target_qps_per_replica"} and "autoscaler" not in said:
        kept.pop("autoscaler", None)
    merged = {key: value for key, value in kept.items() if key not in said}
    merged.update({key: value for key, value in flags.items() if value is not None})
    merged["workdir"] = os.getcwd()
    names = {key: f"the running config's {key}" for key in kept}
    spelled = flag_names(config_flags(UPDATE_FIELDS))
    names |= {key: spelled[key] for key, value in flags.items() if value is not None}
    cfg = resolve_or_exit(spec, merged, names)
    return cfg.model_dump(mode="json")


def _group_changed(current: dict[str, Any], group: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The running config with the flags applied to group ``group``'s definition."""
    from flockctl.server.config import GroupConfig

    groups = current.get("groups") or []
    entry = next((g for g in groups if g.get("name") == group), None)
    if entry is None:
        names = ", ".join(str(g.get("name")) for g in groups) or "none"
        fail(
            f"--group: the deployment has no group {group!r} (its groups: {names})", ExitCode.USAGE
        )
    given = {key: value for key, value in flags.items() if value is not None}
    wrong = sorted(set(given) - (set(GroupConfig.model_fields) - {"name"}))
    if wrong:
        spelled = flag_names(config_flags(UPDATE_FIELDS))
        fail(f"{spelled[wrong[0]]}: a group does not set it; give it in a SPEC", ExitCode.USAGE)
    changed = dict(entry)
    if given.keys() & {"model", "worker_command"}:
        changed.pop("model", None), changed.pop("worker_command", None)
    if given.keys() & {"replicas", "target_qps_per_replica"} and "autoscaler" not in given:
        changed.pop("autoscaler", None)
    changed.update(given)
    return {**current, "groups": [changed if g is entry else g for g in groups]}


def _dry_run(
    client: AdminClient,
    name: str,
    config: dict[str, Any],
    group: str | None,
    mode: str,
    as_json: bool,
) -> None:
    """Print what the update to ``config`` would do, group by group, as the daemon would decide
    it (the same refusals, exit 9), from the running config; nothing is started."""
    from flockctl.server import update_plan
    from flockctl.server.config import DeploymentConfig
    from flockctl.server.update import UpdateRefused

    snapshot = client.status()
    old = DeploymentConfig.model_validate(read_json(state_dir(name) / "config.json"))
    new = DeploymentConfig.model_validate(config)
    taken = [g["name"] for g in snapshot["groups"]]
    try:
        resolved, steps = update_plan.resolve(old, new, group, taken)
    except UpdateRefused as exc:
        fail(f"update refused: {exc}", ExitCode.UPDATE_FAILED)
    plans = update_plan.plan(old, resolved, steps)
    deployment = snapshot["deployment"]
    version = deployment["version"]
    last = deployment.get("update")
    following = max(version, last["to_version"] if last else 0) + 1
    if as_json:
        emit_json(
            {
                "dry_run": True,
                "from_version": version,
                "to_version": following,
                "mode": mode,
                "groups": [p.to_dict() for p in plans],
            },
            indent=2,
        )
        return
    print(f"version {version} -> {following} ({mode}); dry run, nothing started")
    for part in plans:
        print(f"group {part.name}: {part.change}")
        for line in part.changes:
            print(f"  {line}")
        print(f"  workers: {part.workers}")


def _follow(client: AdminClient, update_id: str) -> UpdateView:
    """Poll the status snapshot until the update ends, saying each step of its progress."""
    last = None
    while True:
        snapshot = client.status()
        current = snapshot["deployment"].get("update")
        if current is None or current["id"] != update_id:
            raise ClientError(f"the daemon no longer reports update {update_id}")
        p = current["progress"]
        line = (
            f"new {p['new_ready']}/{p['target']} READY ({p['new_live']} live),"
            f" old {p['old_live']} serving, {p['old_draining']} draining"
        )
        group = next((g for g in current["groups"] if g["state"] == "running"), None)
        if group is not None:
            line = f"group {group['name']} ({group['change']}): {line}"
        if line != last and current["state"] == "running":
            say(line)
            last = line
        if current["state"] != "running":
            return current
        time.sleep(0.25)


def _report(view: UpdateView, as_json: bool) -> None:
    if as_json:
        emit_json(view)
    elif view["state"] == "succeeded":
        print(f"version {view['to_version']}")
