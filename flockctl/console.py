"""How every flockctl command talks to its caller, in one place.

stdout carries data (an endpoint, a table, JSON) so a script can read it; anything for the person
at the terminal is one line on stderr starting with ``flockctl:``; a failure is that line and an
exit code of ``flockctl.exitcodes.ExitCode``. The top-level commands and ``flockctl engine`` both
use these, so the conventions cannot drift between them.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer

from flockctl.exitcodes import ExitCode


def say(message: str) -> None:
    """A diagnostic for the person at the terminal (stderr, so stdout stays data)."""
    print(f"flockctl: {message}", file=sys.stderr)


def fail(message: str, code: ExitCode) -> NoReturn:
    """Say what was wrong (and what to do next) and exit with ``code``."""
    say(message)
    raise typer.Exit(int(code))


def emit_json(data: Any, indent: int | None = None) -> None:
    """One JSON document on stdout, flushed, so a reader of a stream of them sees each at once;
    ``indent`` for the documents a person is as likely to read as a script."""
    print(json.dumps(data, indent=indent), flush=True)
