"""``python -m flockctl.engine.demo``: ``flockctl engine demo`` under the name ``flockctl up`` runs
in a child process (see flockctl/demo_first.py)."""

from __future__ import annotations

import typer

from flockctl.engine.demo.command import demo

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(demo)

if __name__ == "__main__":
    app(prog_name="python -m flockctl.engine.demo")
