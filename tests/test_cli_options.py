"""The flags that set config fields are made from the fields: every field a flag may set has one
on ``flockctl up`` and every such flag sets a field, and what a flag is given reaches the config.

Whether a field has a flag is read from its metadata (a ``Flag`` or a ``NoFlag`` in its
annotation), so a new field that says neither fails here; the checker is run on a small made-up
model too, so a check that stopped finding anything would fail.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from flockctl.cli import app
from flockctl.commands.config_flags import config_flags, flag_of
from flockctl.commands.simulate import simulated_fields
from flockctl.commands.up_options import D
from flockctl.commands.update import UPDATE_FIELDS
from flockctl.server.config import DeploymentConfig
from flockctl.server.flags import DAEMON, SPEC_ONLY, Flag, NoFlag
from flockctl.server.limits import parse_size

#: up's options that set no config field.
UP_OWN = {"spec", "foreground", "wait", "timeout", "watch", "dry_run", "as_json"}


def field_paths(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every field of ``model`` and of the models nested in it, by dotted path."""
    found: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            found |= field_paths(nested, f"{prefix}{name}.")
        else:
            found[f"{prefix}{name}"] = info
    return found


def undecided(model: type[BaseModel]) -> list[str]:
    """Fields that carry neither a ``Flag`` nor a ``NoFlag``, or both."""
    problems = []
    for path, info in field_paths(model).items():
        flag = flag_of(info) is not None
        no_flag = any(isinstance(m, NoFlag) for m in info.metadata)
        if flag and no_flag:
            problems.append(f"{path}: both a Flag and a NoFlag")
        elif not (flag or no_flag):
            problems.append(f"{path}: neither a Flag nor a NoFlag")
    return problems


def params(command: str) -> dict[str, Any]:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]


def test_every_config_field_has_a_flag_or_is_said_to_have_none() -> None:
    assert undecided(DeploymentConfig) == []


def test_the_check_finds_a_field_that_says_nothing() -> None:
    class Probe(BaseModel):
        path: Annotated[str, Flag()] = "/"
        headers: dict[str, str] = Field(default_factory=dict)

    class Made(BaseModel):
        port: Annotated[int, Flag(DAEMON)] = 1
        task: Annotated[dict[str, str] | None, SPEC_ONLY] = None
        twice: Annotated[int, Flag(), SPEC_ONLY] = 2
        probe: Probe = Field(default_factory=Probe)

    assert undecided(Made) == [
        "twice: both a Flag and a NoFlag",
        "probe.headers: neither a Flag nor a NoFlag",
    ]


def test_up_has_a_flag_for_every_flagged_field_and_no_other() -> None:
    flagged = {path for path, info in field_paths(DeploymentConfig).items() if flag_of(info)}
    made = config_flags()
    assert {flag.field for flag in made} == flagged
    up = params("up")
    assert set(up) - UP_OWN == {flag.param for flag in made}
    for flag in made:
        assert up[flag.param].opts[0] == flag.option
        assert up[flag.param].default is None, f"{flag.option} must leave a SPEC's value be"


@pytest.mark.parametrize(
    ("command", "fields"), [("update", UPDATE_FIELDS), ("simulate", simulated_fields())]
)
def test_update_and_simulate_spell_their_config_flags_as_up_does(
    command: str, fields: tuple[str, ...]
) -> None:
    up, own = params("up"), params(command)
    for flag in config_flags(fields):
        mine, ups = own[flag.param], up[flag.param]
        assert (mine.opts, mine.help, mine.rich_help_panel) == (
            ups.opts,
            ups.help,
            ups.rich_help_panel,
        )


def test_help_states_each_fields_default() -> None:
    """A default ``--help`` states is the field's: written from it, or, where the flag says it
    in words, a number or size that means the same value."""
    fields = field_paths(DeploymentConfig)
    up = params("up")
    checked = 0
    for flag in config_flags():
        assert fields[flag.field].description, f"{flag.option}: its field has no description"
        stated = re.search(r"\[default: ([^\]]+)\]", up[flag.param].help or "")
        default = fields[flag.field].get_default(call_default_factory=True)
        if stated is None:
            assert default in (None, False, []), f"{flag.option} does not state {default!r}"
            continue
        text = stated.group(1)
        if re.fullmatch(r"[0-9]+[KMG]", text):
            assert parse_size(text) == default, flag.option
        elif re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
            assert float(text) == default, flag.option
        elif default is not None:
            assert text == default, flag.option
        checked += 1
    assert checked >= 35


def test_up_and_its_own_daemon_flags_share_the_daemon_panel() -> None:
    up = params("up")
    assert D == DAEMON
    assert up["foreground"].rich_help_panel == up["port"].rich_help_panel == DAEMON


def test_given_flags_reach_the_config_and_left_out_ones_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOCKCTL_NAME", "from-env")
    result = CliRunner().invoke(
        app,
        ["up", "--dry-run", "--json", "--port", "8080", "--readiness-path", "/ready",
         "--probe-interval", "5", "--endpoint", "http://10.0.0.1:80",
         "--endpoint", "http://10.0.0.2:80", "--max-body-size", "1K", "--policy", "round-robin"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["name"] == "from-env"
    assert plan["endpoint"] == "http://127.0.0.1:8080"
    assert plan["worker"]["endpoints"] == ["http://10.0.0.1:80", "http://10.0.0.2:80"]
    # The probe flags given set their fields; the others keep the config's defaults.
    assert plan["probe"]["path"] == "/ready" and plan["probe"]["interval_seconds"] == 5.0
    assert plan["probe"]["timeout_seconds"] == 15.0
    assert plan["balancer"]["max_body_size"] == 1024
    assert plan["balancer"]["policy"] == "round-robin"
    assert plan["balancer"]["max_queue"] == 1000


def test_a_refused_flag_is_named_as_typed() -> None:
    result = CliRunner().invoke(app, ["up", "--dry-run", "--max-body-size", "12Q"])
    assert result.exit_code == 2
    assert "--max-body-size: '12Q' is not a size" in result.stderr
