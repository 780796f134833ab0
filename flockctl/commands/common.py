"""Options and checks that several commands share, so each reads and fails the same way."""

from __future__ import annotations

from typing import Annotated

import typer

from flockctl.console import fail
from flockctl.exitcodes import ExitCode
from flockctl.state import valid_name

NameOpt = Annotated[
    str, typer.Option("--name", "-n", help="Deployment name.", envvar="FLOCKCTL_NAME")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def check_name(name: str) -> None:
    """Refuse a deployment name that could not be a state directory (exit 2)."""
    if not valid_name(name):
        fail(
            f"invalid deployment name {name!r}: use letters, digits, '_', '.', '-' (max 63)",
            ExitCode.USAGE,
        )
