"""Where flockctl keeps its files on this machine: state, config and cache, each in one place.

- State (deployments' records and logs, what the dashboard remembers): ``$FLOCKCTL_HOME`` if set,
  else ``$XDG_STATE_HOME/flockctl``, else the platform's (``~/.local/state/flockctl`` on Linux).
- Config (``config.toml``, the user's own ``themes/``): ``$XDG_CONFIG_HOME/flockctl``, else the
  platform's (``~/.config/flockctl`` on Linux). flockctl only reads it.
- Cache (the demo model): ``$FLOCKCTL_CACHE`` if set, else ``$XDG_CACHE_HOME/flockctl``, else the
  platform's (``~/.cache/flockctl`` on Linux).

The XDG variables are honoured on every platform, so one setting works on Linux and macOS alike;
an empty variable counts as unset. Nothing here creates a directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "flockctl"


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def state_dir() -> Path:
    """flockctl's state directory: one sub-directory per deployment, and the dashboard's file."""
    home = _from_env("FLOCKCTL_HOME")
    if home is not None:
        return home
    xdg = _from_env("XDG_STATE_HOME")
    if xdg is not None:
        return xdg / APP
    return Path(platformdirs.user_state_dir(APP, appauthor=False))


def config_dir() -> Path:
    """flockctl's config directory (``config.toml``, ``themes/``): the user's to write."""
    xdg = _from_env("XDG_CONFIG_HOME")
    if xdg is not None:
        return xdg / APP
    return Path(platformdirs.user_config_dir(APP, appauthor=False))


def cache_dir() -> Path:
    """flockctl's cache directory: what can be built again (the demo model)."""
    cache = _from_env("FLOCKCTL_CACHE")
    if cache is not None:
        return cache
    xdg = _from_env("XDG_CACHE_HOME")
    if xdg is not None:
        return xdg / APP
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))
