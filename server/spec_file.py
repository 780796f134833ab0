"""A SPEC YAML file and the flags of ``flockctl up``, resolved into one validated config.

Precedence, lowest first: built-in defaults, the SPEC's SkyServe ``service:`` section, the SPEC's
``flockctl:`` section, command-line flags. Every error names where the bad value came from
(``spec.yaml: service.replica_policy.min_replicas``, ``--max-workers``), so the user can fix it
without guessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flockctl.server.config import MODEL_OR_COMMAND, WHAT_RUNS, ConfigError, DeploymentConfig
from flockctl.server.provisioners.sky_task import SKYPILOT_TASK_KEYS
from flockctl.server.service_spec import fill_envs, service_overrides


def load_spec(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a SPEC YAML into config overrides and, for each field, where it came from."""
    where = f"{path}: "
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    problems = [
        f"{where}{key}: unknown top-level field (expected flockctl, service, or SkyPilot task"
        " fields)"
        for key in data
        if key not in SKYPILOT_TASK_KEYS and key not in ("flockctl", "service")
    ]
    if problems:
        raise ConfigError(problems)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if "service" in data:
        out, origin = service_overrides(fill_envs(data["service"], data), where)
    task = {key: value for key, value in data.items() if key in SKYPILOT_TASK_KEYS}
    if task:
        out["task"] = task
        origin["task"] = path.name
    section = data.get("flockctl")
    if section is not None:
        if not isinstance(section, dict):
            raise ConfigError([f"{where}flockctl: must be a mapping"])
        for key, value in section.items():
            if key == "probe" and isinstance(value, dict) and isinstance(out.get("probe"), dict):
                value = {**out["probe"], **value}
            out[key] = value
            origin[key] = f"{where}flockctl.{key}"
    return out, origin


def resolve(
    spec: Path | None = None,
    flags: dict[str, Any] | None = None,
    flag_names: dict[str, str] | None = None,
) -> DeploymentConfig:
    """Merge defaults, SPEC and flags into a validated config, or raise ConfigError.

    ``flags`` holds only the flags the user actually gave (None means "not given");
    ``flag_names`` maps a field to its flag spelling for error messages.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if spec is not None:
        values, origin = load_spec(spec)
    given = {key for key, value in (flags or {}).items() if value is not None}
    if len(given & WHAT_RUNS) == 1:
        # The model and the worker command are two answers to one question (what runs on a
        # worker): a flag giving one overrides the file's answer, whichever form it took.
        (flag,) = given & WHAT_RUNS
        dropped = ("model", "engine_args", "draft_models")
        for key in dropped if flag == "worker_command" else ("worker_command",):
            if key not in given:
                values.pop(key, None)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "probe" and isinstance(value, dict):
            base = values.get("probe")
            value = {**(base if isinstance(base, dict) else {}), **value}
        values[key] = value
        origin[key] = (flag_names or {}).get(key, f"--{key.replace('_', '-')}")
    if flags and flags.get("autoscaler") is None:
        # A flag that only one autoscaler reads selects it (the file's choice gives way).
        if flags.get("replicas") is not None:
            values["autoscaler"] = "fixed"
            origin["autoscaler"] = _label(origin, "replicas")
        elif flags.get("target_qps_per_replica") is not None:
            values["autoscaler"] = "request-rate"
            origin["autoscaler"] = _label(origin, "target_qps_per_replica")
    if values.get("model") is not None and values.get("worker_command"):
        both = f"{_label(origin, 'model')} and {_label(origin, 'worker_command')}"
        raise ConfigError([f"{both} cannot be used together: {MODEL_OR_COMMAND}"])
    try:
        return DeploymentConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError([_describe(err, origin) for err in exc.errors()]) from None


def _label(origin: dict[str, str], key: str) -> str:
    """Where a field's value came from, as the user wrote it (a flag, or a SPEC path)."""
    return origin.get(key, key)


def _describe(err: Any, origin: dict[str, str]) -> str:
    """One validation error as the line the user reads, named by where the value came from."""
    loc = [str(part) for part in err.get("loc", ())]
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if not loc:
        # A check across fields names the field it is about first; say where that came from.
        # It may name a part of a field (``groups.1.min_workers``): say where the field came from.
        field, sep, rest = msg.partition(": ")
        head, dot, tail = field.partition(".")
        if sep and head in origin and not origin[head].startswith("--"):
            return f"{origin[head]}{dot}{tail}: {rest}"
        return msg
    head = loc[0]
    where = origin.get(head, head)
    if head in origin and origin[head].startswith("--"):
        label = where
    elif head in origin:
        label = where + "".join(f".{part}" for part in loc[1:])
    else:
        label = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif head == "groups" and len(loc) == 2:
        # A group's own check names its field first: ``groups.0.model: give model or ...``.
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier():
            label, msg = f"{label}.{field}", rest
    return f"{label}: {msg}"
