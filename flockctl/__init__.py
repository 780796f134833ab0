"""flockctl: a control plane for serving large language models.

The ``flockctl`` package holds the command line and the daemon lifecycle; the daemon itself is
``flockctl.server``, the inference engine ``flockctl.engine`` and the dashboard themes
``flockctl.themes``. Importing this package is cheap: it pulls in neither torch nor textual.

Layers, and what each may import (``tests/test_import_contract.py`` holds the code to them):

- The shared layer, ``SHARED_LAYER`` below: state and paths, exit codes, net helpers, cores, the
  console's output conventions, the typed status snapshot and the admin routes. The daemon, the
  engine and the CLI all build on it, so it imports no other flockctl module, nor torch,
  transformers or textual.
- The daemon, ``flockctl.server``: its own modules and the shared layer; never the engine, the
  CLI, the dashboard, torch, transformers, textual or aiohttp. It reaches workers over HTTP only.
- The engine, ``flockctl.engine``: its own modules and the shared layer; never the daemon, the
  CLI or the dashboard, nor textual.
- The CLI and the daemon's launcher (``flockctl.cli``, ``flockctl.commands``, ``flockctl.daemon``,
  ...) sit on top. At module level the commands import neither torch nor textual nor the daemon,
  so ``flockctl status`` starts fast; what a command needs of them it imports when it runs.
- Only the dashboard, ``flockctl.tui``, and its themes, ``flockctl.themes``, import textual.

A new module of the shared layer is added to ``SHARED_LAYER``.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: The bottom layer of ``flockctl/``, which the daemon, the engine and the CLI may all import.
SHARED_LAYER: tuple[str, ...] = (
    "flockctl",
    "flockctl.admin_routes",
    "flockctl.console",
    "flockctl.cores",
    "flockctl.exitcodes",
    "flockctl.net",
    "flockctl.paths",
    "flockctl.request_log_reader",
    "flockctl.schema",
    "flockctl.state",
    "flockctl.telemetry",
)
