"""A deployment's versions on disk, so that a daemon restarted after it died goes on counting.

The state dir holds each version's resolved config (``config.v1.json``, ``config.v2.json``, ...)
and ``versions.json``: the version that serves, the versions that served in turn (``flockctl
update --rollback`` goes back along them), each group's version, each live worker's version,
and the last update as the status snapshot showed it. The daemon rewrites it whenever one of
these changes.

A daemon that stops (``flockctl down``, SIGTERM) removes its ``daemon.json``, and ``down`` removes
the one a dead daemon left. So a ``daemon.json`` whose process is gone means the last daemon was
killed and its workers may live on: only then does the next daemon take these files up
(``restore``). Any other start is a new deployment at version 1.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flockctl.schema import UpdateView
from flockctl.server.config import DeploymentConfig
from flockctl.state import DaemonRecord, read_json, write_json_atomic

log = logging.getLogger("flockctl.versions")
VERSIONS_FILE = "versions.json"
_CONFIG = re.compile(r"^config\.v([0-9]+)\.json$")


@dataclass
class Versions:
    """What ``versions.json`` holds, with the configs of ``config.vN.json`` beside it."""

    version: int = 1
    served: list[int] = field(default_factory=lambda: [1])
    configs: dict[int, DeploymentConfig] = field(default_factory=dict)
    #: Each group's version, by group name (``default``: the deployment's own workers).
    groups: dict[str, int] = field(default_factory=dict)
    #: Each worker's version, by worker id.
    workers: dict[str, int] = field(default_factory=dict)
    #: The last update as the snapshot showed it (``deployment.update``), else None.
    update: UpdateView | None = None


def was_killed(state_dir: Path) -> bool:
    """Whether the last daemon of this state dir died without stopping (its record is left)."""
    record = DaemonRecord.load(state_dir)
    return record is not None and not record.alive()


def config_path(state_dir: Path, version: int) -> Path:
    return state_dir / f"config.v{version}.json"


def forget(state_dir: Path) -> None:
    """Remove an earlier deployment's versions: this one starts at version 1."""
    for path in state_dir.glob("config.v*.json"):
        path.unlink(missing_ok=True)
    (state_dir / VERSIONS_FILE).unlink(missing_ok=True)


def save(state_dir: Path, versions: Versions) -> None:
    write_json_atomic(
        state_dir / VERSIONS_FILE,
        {
            "version": versions.version,
            "served": versions.served,
            "groups": versions.groups,
            "workers": versions.workers,
            "update": versions.update,
        },
    )


def save_config(state_dir: Path, version: int, cfg: DeploymentConfig, current: bool) -> None:
    """Keep the config of ``version``; ``current``: it serves now (``config.json``, which a
    daemon started without ``flockctl up`` runs)."""
    data = cfg.model_dump(mode="json")
    write_json_atomic(config_path(state_dir, version), data)
    if current:
        write_json_atomic(state_dir / "config.json", data)


def restore(state_dir: Path) -> Versions | None:
    """The versions a killed daemon left, or None when there are none to take up (it was not
    killed, or its files are missing or unreadable: then the deployment starts at version 1)."""
    if not was_killed(state_dir):
        return None
    data = read_json(state_dir / VERSIONS_FILE)
    if not isinstance(data, dict):
        return None
    configs: dict[int, DeploymentConfig] = {}
    for path in state_dir.glob("config.v*.json"):
        found = _CONFIG.match(path.name)
        raw = read_json(path)
        if found is None or not isinstance(raw, dict):
            continue
        try:
            configs[int(found.group(1))] = DeploymentConfig.model_validate(raw)
        except ValidationError as exc:
            log.warning("%s is not a config this daemon reads (%s); skipped", path, exc)
    try:
        versions = Versions(
            version=int(data["version"]),
            served=[int(v) for v in data["served"]],
            configs=configs,
            groups={str(k): int(v) for k, v in dict(data.get("groups") or {}).items()},
            workers={str(k): int(v) for k, v in dict(data.get("workers") or {}).items()},
            update=_update_view(data.get("update")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s is unreadable (%s); the deployment starts at version 1", VERSIONS_FILE, exc)
        return None
    if versions.version not in configs:
        log.warning(
            "no config of version %d is left; the deployment starts at version 1", versions.version
        )
        return None
    return versions


def _update_view(value: Any) -> UpdateView | None:
    if not isinstance(value, dict) or not {"id", "from_version", "to_version", "state"} <= set(
        value
    ):
        return None
    return value  # type: ignore[return-value]
