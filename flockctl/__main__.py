"""``python -m flockctl`` runs the command line."""

from __future__ import annotations

from flockctl.cli import main

main()
