"""Build the offline demo model before the first ``flockctl up`` that serves it.

The demo is trained on this machine the first time it is used (two to three minutes on two CPU
cores; cached after that). Built by the workers, that time passes after ``up`` has returned,
behind a STARTING state; built here, it passes in front of the person who typed ``up``, with a
progress bar, and the workers then load it in seconds. ``up --no-wait`` and ``--foreground`` skip
this and let the workers build it (their reason in ``status`` says how far it got).

Nothing here imports torch: the check reads the build's manifest, and the build runs in a child
process (``python -m flockctl.engine.demo``) whose stderr is the user's terminal.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any


def serves_demo(cfg: Any) -> bool:
    """Whether local engine workers of this deployment will serve (or draft with) the demo."""
    if cfg.provisioner != "local" or cfg.worker_command:
        return False
    return cfg.model == "demo" or "demo" in cfg.draft_models


def demo_missing() -> bool:
    from flockctl.engine.demo import DEFAULT_RECIPE, demo_is_built

    return not demo_is_built(DEFAULT_RECIPE)


def build_demo() -> int:
    """Build it in a child process, its progress on our stderr; the child's exit code."""
    return subprocess.call(
        [sys.executable, "-m", "flockctl.engine.demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # it prints the build's paths there; ours is for data
    )
