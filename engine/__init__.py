"""flockctl's own inference engine (``flockctl engine serve``).

Must not import ``flockctl.server``, ``flockctl.tui`` or textual: the engine runs as a worker,
possibly on another machine, and talks to the control plane over HTTP only.
"""

from __future__ import annotations
