"""``flockctl engine demo``, which ``python -m flockctl.engine.demo`` runs too: one command.

``flockctl up`` runs the second name in a child process, to build the demo in front of the person
who typed ``up``, so both names must take the same options and build, print and fail the same
way: ``flockctl engine`` registers :func:`demo` and ``__main__`` runs it on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flockctl.engine.demo.cache import cache_root, ensure_demo, read_manifest
from flockctl.engine.demo.recipe import DEFAULT_RECIPE, DEMO_VERSION, DemoBuildError, DemoRecipe
from flockctl.exitcodes import ExitCode


def demo(
    root: Annotated[
        Path | None,
        typer.Option(
            help="Cache directory (default: $FLOCKCTL_CACHE, else $XDG_CACHE_HOME/flockctl, else"
            " ~/.cache/flockctl).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a build is cached.")] = False,
) -> None:
    """Build the offline demo model pair (target and speculative draft) that --model demo
    serves, or find the cached build; print their directories on stdout.

    Exit codes: 0 built or found cached, 1 it cannot be built here.
    """
    code = build_and_report(root, force=force)
    if code is not ExitCode.OK:
        raise typer.Exit(int(code))


def build_and_report(
    root: Path | None, recipe: DemoRecipe = DEFAULT_RECIPE, *, force: bool = False
) -> ExitCode:
    """Build (or find) ``recipe`` under ``root``: its two directories on stdout, one line about
    it on stderr, or one line saying why it cannot be built here."""
    try:
        paths = ensure_demo(root, recipe, force=force)
    except DemoBuildError as exc:
        _say(str(exc))
        return ExitCode.ERROR
    except OSError as exc:
        _say(f"cannot build the demo under {root or cache_root()}: {exc}")
        return ExitCode.ERROR
    manifest = read_manifest(paths)
    params = manifest["params"]
    _say(
        f"demo v{DEMO_VERSION}: target {params['target'] / 1e6:.1f}M and draft"
        f" {params['draft'] / 1e6:.1f}M parameters, built in {manifest['build_seconds']:.0f} s;"
        f" the draft picks the target's next token {manifest['draft_agreement']:.0%} of the time"
    )
    print(f"target {paths.target}")
    print(f"draft {paths.draft}")
    return ExitCode.OK


def _say(message: str) -> None:
    """One line for the person at the terminal; stdout stays the two paths."""
    print(f"flockctl: {message}", file=sys.stderr)
