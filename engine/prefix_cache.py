"""Automatic prefix caching: which KV blocks hold which token prefix, so a new job whose prompt
starts like an earlier one's reuses those keys and values instead of computing them again.

A full block is named by a hash chained block by block (vLLM's automatic prefix caching): block
``i``'s key covers the block's own tokens and its parent's key, so equal keys mean the whole
prefix up to the end of the block is equal, not only the block. SHA-256 makes a collision (two
prefixes taken for one) practically impossible. Only full blocks are named: a partial block is
still being written and is never shared.

The cache knows which block holds each key and keeps the cached blocks that no job holds any more
in least-recently-used order; the pool hands those out (forgetting their key) only when it has no
free block left. Reference counts and block tables stay in :class:`~flockctl.engine.kv.KVPool`.
Pure bookkeeping: no torch, no clock.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence

BlockKey = bytes

_ROOT = b"flockctl-prefix-cache-v1"


def block_keys(
    tokens: Sequence[int], block_size: int, start: int = 0, parent: BlockKey | None = None
) -> list[BlockKey]:
    """Keys of the full blocks ``start, start + 1, ...`` of ``tokens``, chained from ``parent``
    (the key of block ``start - 1``; None when ``start`` is 0)."""
    keys: list[BlockKey] = []
    key = parent if parent is not None else _ROOT
    for block in range(start, len(tokens) // block_size):
        span = tokens[block * block_size : (block + 1) * block_size]
        key = hashlib.sha256(key + array("q", span).tobytes()).digest()
        keys.append(key)
    return keys


class PrefixCache:
    """Key -> block for every cached block, the idle ones in LRU order, and the hit counters."""

    def __init__(self) -> None:
        self.blocks: dict[BlockKey, int] = {}
        self.keys: dict[int, BlockKey] = {}
        # cached blocks no job references, least recently used first: the first to be reused
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.queries = 0  # tokens looked up for jobs that had nothing cached
        self.hits = 0  # of those, tokens found cached (their prefill was skipped)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def match(self, keys: Sequence[BlockKey]) -> list[int]:
        """The blocks holding the longest cached run of ``keys`` from the first."""
        found: list[int] = []
        for key in keys:
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def add(self, block: int, key: BlockKey) -> bool:
        """``block`` now holds the prefix named ``key``; False when another block already holds
        it (two jobs computed the same prefix at once): this one stays private."""
        if key in self.blocks or block in self.keys:
            return False
        self.blocks[key] = block
        self.keys[block] = key
        return True

    def holds(self, block: int) -> bool:
        return block in self.keys

    def park(self, block: int) -> None:
        """No job references cached ``block`` any more: it is the most recently used idle one."""
        self.idle[block] = None

    def claim(self, block: int) -> None:
        """A job references ``block`` again: it cannot be evicted while it does."""
        self.idle.pop(block, None)

    def evict(self) -> int | None:
        """Forget the least recently used idle block and hand it out; None when none is idle."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        del self.blocks[self.keys.pop(block)]
        self.evictions += 1
        return block

    def count(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def stats(self) -> dict[str, int | float | None]:
        """What ``/stats`` shows as ``prefix_cache``."""
        return {
            "queries": self.queries,
            "hits": self.hits,
            "hit_rate": round(self.hits / self.queries, 4) if self.queries else None,
            "cached_blocks": len(self.blocks),
            "idle_blocks": len(self.idle),
            "evictions": self.evictions,
        }
