"""The dashboard's settings: key bindings from the user's config file, and the theme it remembers.

``config.toml`` in flockctl's config directory (``$XDG_CONFIG_HOME/flockctl``, by default
``~/.config/flockctl`` on Linux; see ``flockctl.paths``) is the user's to write; the dashboard
only reads it::

    [dashboard.keys]
    pause = "space"          # a binding id = the key(s) that trigger it, comma-separated
    drain = "D"

``dashboard.json`` in flockctl's state directory (``$FLOCKCTL_HOME``, else
``$XDG_STATE_HOME/flockctl``, by default ``~/.local/state/flockctl`` on Linux) is the dashboard's
own: the theme last picked in the app, so the next start uses it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from flockctl import paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class SettingsError(Exception):
    """The config file cannot be used; the message names the file and the problem."""


def config_path() -> Path:
    """The user's config file, read only."""
    return paths.config_dir() / "config.toml"


def state_path() -> Path:
    """What the dashboard remembers, beside the deployments' state directories."""
    return paths.state_dir() / "dashboard.json"


def load_keymap(known: set[str], path: Path | None = None) -> dict[str, str]:
    """``[dashboard.keys]`` of the config file as a Textual keymap (binding id -> keys).

    An id that is not one of ``known``, or a value that is not a non-empty string, is an error
    naming it; a missing file is no keymap at all.
    """
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    dashboard = data.get("dashboard", {})
    if not isinstance(dashboard, dict):
        raise SettingsError(f"{path}: [dashboard] must be a table")
    unknown = sorted(set(dashboard) - {"keys"})
    if unknown:
        raise SettingsError(f"{path}: [dashboard] has unknown field(s): {', '.join(unknown)}")
    keys = dashboard.get("keys", {})
    if not isinstance(keys, dict):
        raise SettingsError(f"{path}: [dashboard.keys] must be a table")
    keymap: dict[str, str] = {}
    for binding_id, value in keys.items():
        if binding_id not in known:
            raise SettingsError(
                f"{path}: [dashboard.keys] {binding_id!r} is not a binding id; known:"
                f" {', '.join(sorted(known))}"
            )
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(
                f"{path}: [dashboard.keys] {binding_id}: must be a key name such as"
                ' "ctrl+r" or "space" (several: "a,ctrl+a")'
            )
        keymap[binding_id] = value.replace(" ", "")
    return keymap


def remembered() -> dict[str, Any]:
    """What the dashboard saved last time; empty when nothing (or nothing readable) was."""
    try:
        data = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(**values: Any) -> None:
    """Save ``values`` over what was remembered (best effort: a read-only home is no error)."""
    path = state_path()
    data = {**remembered(), **values}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass
