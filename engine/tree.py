"""Token-tree shapes for speculative decoding (``--spec-tree``); no torch here, the CLI uses it."""

from __future__ import annotations

from collections.abc import Sequence

MAX_DEPTH = 16
MAX_NODES = 256
# SpecInfer's expansion from its evaluation: on a GPU verifying a few dozen nodes costs about what
# one token does, so a wide tree is nearly free and raises the accepted length.
GPU_TREE = (1, 1, 3, 1, 1, 1, 1, 1)
# On a CPU each verified node costs real arithmetic and each depth one draft forward: a chain of
# four measured fastest for the demo pair (bench/speculative.py) at a fixed depth.
CPU_TREE = (1, 1, 1, 1)
# Under --spec auto the depth is chosen job by job and cut where it stops paying, so the chain may
# be long: a draft the text agrees with drafts up to eight tokens.
CPU_AUTO_TREE = (1,) * 8


def default_tree(device_type: str, adaptive: bool = False) -> tuple[int, ...]:
    """The expansion ``--spec-tree auto`` uses on a device of this type; ``adaptive``: for
    ``--spec auto``, which drafts only as deep as pays."""
    if device_type == "cuda":
        return GPU_TREE
    return CPU_AUTO_TREE if adaptive else CPU_TREE


def parse_tree(text: str) -> tuple[int, ...] | None:
    """``"1,1,3,1"`` -> ``(1, 1, 3, 1)``: children per node at each depth; ``"auto"`` -> None
    (the device's default, :func:`default_tree`)."""
    if text.strip() == "auto":
        return None
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
