"""An approximate radix tree of the prompt text each worker has seen, for prefix-aware routing.

One tree holds every worker's prompts; each node keeps the workers that were sent text through
it, with when they last were (a counter, not a clock). A worker's entry on a node implies its
entry on every ancestor, so the longest match of a prompt for a worker is the depth of the
deepest node on the prompt's path that still names the worker.

It is approximate on purpose, as SGLang's cache-aware router's tree is: it records what was
sent, not what a worker's KV cache still holds, and it matches characters, not tokens. Each
worker's share is bounded (``max_chars``); past it the worker's least recently used leaves go
first, until it holds 90% of the bound, so eviction runs rarely and in batches.

Edges are compared with ``str.startswith`` (C speed); the hot path never walks a prompt one
character at a time in Python.
"""

from __future__ import annotations

import heapq

#: After an eviction a worker holds at most this share of its bound, so the next one is far off.
_EVICT_TO = 0.9


class _Node:
    __slots__ = ("children", "parent", "text", "workers")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}
        #: worker id -> the tick of its last insert through this node
        self.workers: dict[str, int] = {}


def _common(text: str, pos: int, edge: str) -> int:
    """How many characters of ``edge`` match ``text`` from ``pos`` (binary search, C compares)."""
    if text.startswith(edge, pos):
        return len(edge)
    lo, hi = 0, min(len(edge), len(text) - pos)  # edge[:lo] matches; edge[:hi+1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """Prompt text per worker: longest matches, inserts, per-worker LRU bound, worker removal."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, not {max_chars}")
        self.max_chars = max_chars
        self._root = _Node("", None)
        self._tick = 0
        #: worker id -> characters of text the tree holds for it
        self.chars: dict[str, int] = {}

    def match(self, text: str) -> dict[str, int]:
        """The longest prefix of ``text`` each worker was sent, in characters (absent: none)."""
        found: dict[str, int] = {}
        node = self._root
        pos = 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            n = _common(text, pos, child.text)
            pos += n
            for w in child.workers:
                found[w] = pos
            if n < len(child.text):
                break
            node = child
        return found

    def insert(self, text: str, worker: str) -> None:
        """Record that ``worker`` was sent ``text``; evicts its oldest text past the bound."""
        if not text:
            return
        self._tick += 1
        tick = self._tick
        added = 0
        node = self._root
        pos = 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                child = _Node(text[pos:], node)
                node.children[text[pos]] = child
                n = len(child.text)
            else:
                n = _common(text, pos, child.text)
                if n < len(child.text):
                    child = self._split(child, n)
            if worker not in child.workers:
                added += len(child.text)
            child.workers[worker] = tick
            pos += n
            node = child
        held = self.chars.get(worker, 0) + added
        self.chars[worker] = held
        if held > self.max_chars:
            self._evict(worker, int(self.max_chars * _EVICT_TO))

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut ``child``'s edge after ``n`` characters; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.text[:n], parent)
        upper.workers = dict(child.workers)
        parent.children[upper.text[0]] = upper
        child.text = child.text[n:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    def _evict(self, worker: str, target: int) -> None:
        """Drop ``worker``'s least recently used leaves until it holds ``target`` characters."""
        heap: list[tuple[int, int, _Node]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            deeper = [c for c in node.children.values() if worker in c.workers]
            if node is not self._root and not deeper:
                heap.append((node.workers[worker], id(node), node))
            stack.extend(deeper)
        heapq.heapify(heap)
        held = self.chars[worker]
        while heap and held > target:
            _, _, node = heapq.heappop(heap)
            held -= len(node.text)
            self._drop(node, worker)
            parent = node.parent
            if (
                parent is not None
                and parent is not self._root
                and not any(worker in c.workers for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.workers[worker], id(parent), parent))
        self.chars[worker] = held

    def _drop(self, node: _Node, worker: str) -> None:
        """Take ``worker`` off a node none of whose children name it; unlink it if unused."""
        del node.workers[worker]
        if not node.workers and node.parent is not None:
            del node.parent.children[node.text[0]]
            node.parent = None

    def remove(self, worker: str) -> None:
        """Forget everything ``worker`` was sent (it left READY: its cache is not to be trusted)."""
        if self.chars.pop(worker, None) is None:
            return
        stack = [self._root]
        order: list[_Node] = []
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(c for c in node.children.values() if worker in c.workers)
        for node in reversed(order):  # children before their parents
            if node is not self._root:
                self._drop(node, worker)

    def nodes(self) -> int:
        """How many nodes the tree has (the root excluded)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count
