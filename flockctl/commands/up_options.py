"""The options of ``flockctl up`` that set no config field: its SPEC argument and how it runs
the daemon. The config's own flags are made from its fields (``flockctl.commands.config_flags``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: The ``--help`` panel of the daemon's own config flags (``flockctl.server.flags.DAEMON``).
D = "Daemon"

SpecOpt = Annotated[
    Path | None,
    typer.Argument(
        help="Deployment YAML: a SkyPilot task (each worker is a cluster launched from"
        " it), SkyServe's `service:` section (readiness_probe, replicas, replica_policy,"
        " load_balancing_policy, ports) and/or a `flockctl:` section. Flags override it.",
        show_default=False,
    ),
]

ForegroundOpt = Annotated[
    bool,
    typer.Option(
        help="Run the daemon attached to this terminal, logging to stderr.", rich_help_panel=D
    ),
]

WaitOpt = Annotated[bool, typer.Option(help="Wait until the daemon answers.", rich_help_panel=D)]

TimeoutOpt = Annotated[
    float, typer.Option(help="Seconds to wait for the daemon.", rich_help_panel=D)
]

WatchOpt = Annotated[
    bool,
    typer.Option(
        "--dashboard",
        help="Once it is up, watch it full-screen (flockctl dashboard).",
        rich_help_panel=D,
    ),
]

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the resolved plan (provisioner, workers, autoscaler, probe, balancer,"
        " resources per worker) and start nothing; needs no cloud credentials.",
    ),
]
