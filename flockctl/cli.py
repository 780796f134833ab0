"""The ``flockctl`` command line: the app that puts the commands together, and ``main``.

Each command lives in its own module (``flockctl.commands.*``, the dashboard's launcher in
``flockctl.tui.launch``, ``flockctl engine`` in ``flockctl.engine.cli``). stdout carries data (an
endpoint, a table, JSON); diagnostics go to stderr as one line starting with ``flockctl:`` (see
``flockctl.console``); exit codes are those of ``flockctl.exitcodes.ExitCode``. The scripting
commands (``up``, ``status``, ``logs``, ``down``) never import textual or torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flockctl import __version__
from flockctl.commands.down import down
from flockctl.commands.logs import logs
from flockctl.commands.simulate import simulate
from flockctl.commands.status import status
from flockctl.commands.up import up
from flockctl.commands.update import update
from flockctl.engine.cli import engine_app
from flockctl.exitcodes import exit_codes_help
from flockctl.tui.launch import dashboard

app = typer.Typer(
    name="flockctl",
    help="Turn LLM inference servers into one production endpoint: balancing, retries,"
    " autoscaling and status, from the terminal.\n\n" + exit_codes_help(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(engine_app, name="engine")


def version_callback(value: bool) -> None:
    if value:
        print(f"flockctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """flockctl: a control plane for serving large language models."""


app.command()(up)
app.command()(dashboard)
app.command()(status)
app.command()(logs)
app.command()(down)
app.command()(update)
app.command()(simulate)


def main() -> None:
    app()
