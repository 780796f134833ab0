"""The launcher of ``flockctl dashboard``: it checks the theme, the key map and the daemon, then
runs the Textual app. ``flockctl.cli`` imports this module to register the command, so Textual is
imported only inside ``run_dashboard``, when the dashboard really runs; ``flockctl up --dashboard``
comes here too.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from flockctl import paths
from flockctl.client import ClientError
from flockctl.commands.common import NameOpt, check_name
from flockctl.console import fail
from flockctl.exitcodes import ExitCode
from flockctl.state import running_daemon, state_dir


def user_themes() -> Path:
    """Where a user's own theme files live: ``themes/`` in flockctl's config directory
    (``$XDG_CONFIG_HOME/flockctl/themes``, else the platform's; ``flockctl.paths``)."""
    return paths.config_dir() / "themes"


def dashboard(
    name: NameOpt = "default",
    theme: Annotated[
        str | None,
        typer.Option(
            envvar="FLOCKCTL_THEME",
            help="Colour theme: flockctl-dark, flockctl-light, flockctl-colorblind,"
            " flockctl-terminal (the terminal's own palette), a Textual theme, or one of yours in"
            " $XDG_CONFIG_HOME/flockctl/themes/*.toml [default: the last one picked with t, else"
            " flockctl-dark].",
            show_default=False,
        ),
    ] = None,
    readonly: Annotated[
        bool,
        typer.Option(
            "--readonly", help="Watch only: the actions that change the deployment are off."
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between status polls.", min=0.1, max=3600)
    ] = 1.0,
) -> None:
    """Watch and steer the deployment full-screen: workers, autoscaler, engine jobs, logs.

    Keys: enter a worker's detail, l logs, / filter, p pause, a add a worker, d drain,
    x remove, m start an engine worker with a model, b min/max workers, X shut down,
    t theme, ? every key, ctrl+p command palette, q quit. Remap any key by its binding id in
    $XDG_CONFIG_HOME/flockctl/config.toml under [dashboard.keys].

    When no daemon runs under the name, a terminal gets an offer to start one (demo engine
    workers, or a SPEC file); elsewhere the exit status is 3.
    """
    check_name(name)
    run_dashboard(name, theme, readonly, interval, offer_start=sys.stdin.isatty())


def run_dashboard(
    name: str, theme: str | None, readonly: bool, interval: float, offer_start: bool
) -> None:
    """Check the theme and the key map (exit 2 naming the problem), find the daemon, and run
    the dashboard on it; without one, offer to start it when ``offer_start``, else exit 3."""
    from flockctl.themes import DEFAULT_THEME, ThemeError, load_themes
    from flockctl.tui.settings import SettingsError, load_keymap, remembered

    try:
        themes = load_themes(user_themes())
    except ThemeError as exc:
        fail(str(exc), ExitCode.USAGE)
    from textual.theme import BUILTIN_THEMES

    known = {*themes, *BUILTIN_THEMES}
    if theme is not None and theme not in known:
        fail(f"--theme {theme!r}: no such theme; known: {', '.join(sorted(known))}", ExitCode.USAGE)
    last = remembered().get("theme")
    chosen = theme or (last if last in known else DEFAULT_THEME)

    from flockctl.tui.app import Dashboard, binding_ids
    from flockctl.tui.feed import Feed

    try:
        keymap = load_keymap(binding_ids())
    except SettingsError as exc:
        fail(str(exc), ExitCode.USAGE)
    record = running_daemon(name)
    if record is None and not offer_start:
        fail(
            f'no daemon named "{name}" is running; start one with flockctl up --name {name}',
            ExitCode.NOT_RUNNING,
        )
    app = Dashboard(
        Feed(record.endpoint, record.token) if record is not None else None,
        interval,
        themes,
        chosen,
        readonly=readonly,
        keymap=keymap,
        remember_theme=True,
        name=name,
        starter=None if record is not None else partial(start_deployment, name),
    )
    app.run()


def start_deployment(name: str, spec: Path | None, workers: int) -> tuple[str, str]:
    """Start deployment ``name`` from ``spec``, or with ``workers`` local engine workers serving
    the demo model; returns its endpoint and admin token, or raises ClientError."""
    from flockctl import daemon
    from flockctl.server.config import ConfigError
    from flockctl.server.spec_file import resolve

    flags: dict[str, Any] = {"name": name, "workdir": os.getcwd()}
    if spec is None:
        flags.update(model="demo", min_workers=workers, max_workers=max(workers, 2))
    try:
        cfg = resolve(spec, flags, {"name": "--name"})
    except ConfigError as exc:
        raise ClientError("; ".join(exc.problems), ExitCode.USAGE) from None
    record = daemon.launch(cfg.model_dump(mode="json"), state_dir(cfg.name), 60.0)
    return record.endpoint, record.token
