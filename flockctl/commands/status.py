"""``flockctl status``: the deployment's snapshot as a table, JSON, or a live view."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from flockctl.client import AdminClient, ClientError
from flockctl.commands.common import JsonOpt, NameOpt, check_name
from flockctl.console import emit_json, fail


def status(
    name: NameOpt = "default",
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide",
            help="Never cut or wrap a line, on a terminal too (piped output is cut only where"
            " COLUMNS sets a width).",
        ),
    ] = False,
) -> None:
    """Show the deployment's workers, autoscaler and traffic (exit 3 when not running)."""
    check_name(name)
    try:
        client = AdminClient.for_name(name)
    except ClientError as exc:
        fail(str(exc), exc.code)
    from flockctl.render import status_console, status_view

    try:
        with client:
            if not watch:
                snap = client.status()
                if as_json:
                    emit_json(snap, indent=2)
                else:
                    status_console(wide).print(status_view(snap))
                return
            _watch(client, as_json, interval, wide)
    except ClientError as exc:
        fail(str(exc), exc.code)


def _watch(client: AdminClient, as_json: bool, interval: float, wide: bool) -> None:
    """Until Ctrl-C: one JSON line per poll, or a table redrawn in place."""
    from rich.live import Live

    from flockctl.render import status_console, status_view

    try:
        if as_json:
            while True:
                emit_json(client.status())
                time.sleep(interval)
        console = status_console(wide)
        with Live(status_view(client.status()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(status_view(client.status()), refresh=True)
    except KeyboardInterrupt:
        return
