"""flockctl's own inference engine (``flockctl engine serve``).

Must not import ``flockctl.server``, ``flockctl.tui`` or textual: the engine runs as a worker,
possibly on another machine, and talks to the control plane over HTTP only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flockctl.engine.llm import LLM, SSM, GenerationConfig, GenerationResult

__all__ = ["LLM", "SSM", "GenerationConfig", "GenerationResult"]


def __getattr__(name: str) -> Any:
    # torch loads only when the Python API is used: the CLI imports this package too
    if name in __all__:
        from flockctl.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'flockctl.engine' has no attribute {name!r}")
