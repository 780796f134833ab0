"""Token-tree shapes for speculative decoding (``--spec-tree``); no torch here, the CLI uses it."""

from __future__ import annotations

from collections.abc import Sequence

MAX_DEPTH = 16
MAX_NODES = 256
DEFAULT_TREE = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer's expansion for its evaluation


def parse_tree(text: str) -> tuple[int, ...]:
    """``"1,1,3,1"`` -> ``(1, 1, 3, 1)``: children per node at each depth."""
    try:
        widths = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(
            f"--spec-tree {text!r}: expected comma-separated widths such as 1,1,3,1"
        ) from None
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"--spec-tree {text!r}: every width must be at least 1")
    if len(widths) > MAX_DEPTH:
        raise ValueError(f"--spec-tree {text!r}: at most {MAX_DEPTH} levels")
    if tree_nodes(widths) > MAX_NODES:
        raise ValueError(
            f"--spec-tree {text!r} has {tree_nodes(widths)} nodes; at most {MAX_NODES}"
        )
    return widths


def tree_nodes(widths: Sequence[int]) -> int:
    """Nodes of one SSM's full tree, the root included."""
    total, level = 1, 1
    for width in widths:
        level *= width
        total += level
    return total


def format_tree(widths: Sequence[int]) -> str:
    return ",".join(str(w) for w in widths)
