"""Where flockctl keeps its files: one module decides, and every part asks it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flockctl import paths
from flockctl.engine.demo.cache import cache_root
from flockctl.state import state_dir
from flockctl.tui.launch import user_themes
from flockctl.tui.settings import config_path, remember, remembered, state_path

VARS = ("FLOCKCTL_HOME", "FLOCKCTL_CACHE", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory with none of flockctl's or XDG's variables set."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_linux_defaults_are_the_xdg_ones(home: Path) -> None:
    assert paths.state_dir() == home / ".local" / "state" / "flockctl"
    assert paths.config_dir() == home / ".config" / "flockctl"
    assert paths.cache_dir() == home / ".cache" / "flockctl"


def test_xdg_variables_move_each_directory(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert paths.state_dir() == tmp_path / "state" / "flockctl"
    assert paths.config_dir() == tmp_path / "config" / "flockctl"
    assert paths.cache_dir() == tmp_path / "cache" / "flockctl"
    monkeypatch.setenv("XDG_STATE_HOME", "")  # empty counts as unset
    assert paths.state_dir() == home / ".local" / "state" / "flockctl"


def test_flockctl_variables_come_before_xdg_and_expand_the_home(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOCKCTL_HOME", "~/flock")
    monkeypatch.setenv("FLOCKCTL_CACHE", str(tmp_path / "mine"))
    assert paths.state_dir() == home / "flock"
    assert paths.cache_dir() == tmp_path / "mine"


def test_every_part_asks_the_same_place(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOCKCTL_HOME", str(tmp_path / "flock"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert state_dir("prod") == tmp_path / "flock" / "prod"
    assert state_path() == tmp_path / "flock" / "dashboard.json"
    assert config_path() == tmp_path / "config" / "flockctl" / "config.toml"
    assert user_themes() == tmp_path / "config" / "flockctl" / "themes"
    assert cache_root() == home / ".cache" / "flockctl"


def test_the_dashboard_remembers_its_theme_under_flockctl_home(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOCKCTL_HOME", str(tmp_path / "flock"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    remember(theme="flockctl-light")
    assert (tmp_path / "flock" / "dashboard.json").exists()
    assert not (tmp_path / "state").exists()
    assert remembered() == {"theme": "flockctl-light"}
