"""``flockctl down``: drain and stop a deployment, and say what could not be torn down."""

from __future__ import annotations

from typing import Annotated

import typer

from flockctl.commands.common import JsonOpt, NameOpt, check_name
from flockctl.console import emit_json, say
from flockctl.exitcodes import ExitCode
from flockctl.state import state_dir


def down(
    name: NameOpt = "default",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the drain before stopping by force.")
    ] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Drain and stop every worker and the daemon (exit 0 when nothing was running)."""
    check_name(name)
    from flockctl import daemon

    directory = state_dir(name)
    result = daemon.stop(name, directory, timeout)
    if as_json:
        emit_json(
            {
                "name": name,
                "was_running": result.was_running,
                "forced": result.forced,
                "orphans_stopped": result.orphans,
                "problems": result.problems,
            }
        )
    for problem in result.problems:
        say(f"could not tear down {problem}; run `sky down` on it, then flockctl down again")
    if not result.was_running:
        extra = f"; stopped {result.orphans} worker(s) it had left" if result.orphans else ""
        say(f'no daemon named "{name}" is running{extra}')
        if result.problems:
            raise typer.Exit(int(ExitCode.ERROR))
        return
    how = " (forced after the drain timed out)" if result.forced else ""
    say(f'deployment "{name}" stopped{how}')
    if result.problems:
        raise typer.Exit(int(ExitCode.ERROR))
