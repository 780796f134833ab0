"""Paged KV cache: a token budget on the device, swap to host memory, and the per-forward view
that stock transformers models write into.

Every job owns a list of fixed-size blocks in one pool per layer (``[blocks * block_size, heads,
head_dim]``). A batched forward gets a :class:`BatchView`, a transformers ``Cache`` whose
``update`` scatters the new keys/values into each job's blocks and gathers each job's whole
history back as a ``[batch, heads, blocks * block_size, head_dim]`` tensor. Positions a job does
not own are masked by the caller's 4D additive mask, so jobs of any length share one forward.

Block 0 is scratch: padding positions write there and short block tables are padded with it.
The pool is allocated empty and blocks are zeroed when handed out, so masked positions never
hold NaN from uninitialised memory (``0 * NaN`` would leak through the softmax).

With prefix caching (:mod:`flockctl.engine.prefix_cache`) a block may sit in several jobs' tables:
each block has a reference count, and a full block whose keys and values are all written is named
by the hash of the prefix it ends, so a later job with the same prefix takes a reference instead of
computing it. A job only ever writes past its cached tokens, and only full cached blocks are
shared, so a shared block is never written (:meth:`KVPool.check_private` guards the writers). A
cached block no job references stays cached, idle, until the pool has no free block left; then
the least recently used idle block is handed out instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from flockctl.engine.config import EngineLoadError
from flockctl.engine.prefix_cache import BlockKey, PrefixCache, block_keys

SCRATCH = 0


class OutOfBlocks(RuntimeError):
    pass


def num_layers(config: Any) -> int:
    """Layers of a transformers model config, whatever the architecture calls them."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise EngineLoadError("cannot tell how many layers this model has")


def _size(config: Any, *names: str) -> int | None:
    """The first of ``names`` a model config sets (to a non-zero int): architectures name these
    sizes differently, and some set one to None."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value:
            return value
    return None


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Device bytes one cached token costs this model: keys and values in every layer."""
    heads = _size(config, "num_attention_heads", "n_head") or 1
    kv_heads = _size(config, "num_key_value_heads") or heads
    hidden = _size(config, "hidden_size", "n_embd") or 64
    head_dim = _size(config, "head_dim") or hidden // heads
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 2 * num_layers(config) * kv_heads * head_dim * itemsize


#: Of a GPU's free memory, the part an engine leaves for its CUDA context, activations and
#: the allocator's slack (at least ``CUDA_MARGIN_MIN`` bytes); the KV cache gets the rest.
CUDA_MARGIN_SHARE = 0.2
CUDA_MARGIN_MIN = 256 << 20


class KVBudgetTooSmall(EngineLoadError):
    """The device's free memory cannot hold one request of the context asked for."""


def cuda_kv_budget(
    free_bytes: int,
    per_token: int,
    max_model_len: int,
    ceiling: int,
    block_size: int,
    *,
    required: bool,
) -> int:
    """KV tokens for an engine on its own GPU: the device's free memory less a margin, at most
    ``ceiling`` tokens. When ``required`` (``--max-model-len`` was given) and that cannot hold
    one request of ``max_model_len`` tokens, the engine must not start: a KVBudgetTooSmall says
    what is free and what is needed."""
    margin = max(int(free_bytes * CUDA_MARGIN_SHARE), CUDA_MARGIN_MIN)
    tokens = max(0, free_bytes - margin) // max(1, per_token)
    if required and tokens < max_model_len:
        raise KVBudgetTooSmall(
            f"--max-model-len {max_model_len} needs {_gib(max_model_len * per_token)} of KV"
            f" cache, but this GPU has {_gib(free_bytes)} free, {_gib(max(0, free_bytes - margin))}"
            f" after a {_gib(margin)} margin ({tokens} tokens): lower --max-model-len, or give"
            " each worker more of a GPU (--gpus-per-worker)"
        )
    return max(block_size, min(tokens, ceiling))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class HostCopy:
    """A swapped-out job's cache in host memory (pinned on CUDA)."""

    tokens: int
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [tokens, heads, dim]
    values: list[torch.Tensor] = field(default_factory=list)
    # prefix keys of its leading full blocks: on the way back, those still cached on the device
    # are shared again instead of copied
    prefix_keys: list[BlockKey] = field(default_factory=list)


class KVPool:
    def __init__(
        self,
        num_layers: int,
        budget_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = 16,
        host_budget_tokens: int | None = None,
        prefix_caching: bool = False,
    ):
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_blocks = max(2, -(-budget_tokens // block_size) + 1)  # + scratch
        self.device = device
        self.dtype = dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.free: list[int] = list(range(self.num_blocks - 1, 0, -1))  # pop() hands out 1, 2, ...
        self.refs = [0] * self.num_blocks  # tables holding each block
        self.tables: dict[str, list[int]] = {}
        self.prefix = PrefixCache() if prefix_caching else None
        # per job, the prefix keys of its leading full blocks offered to the cache so far
        self.chains: dict[str, list[BlockKey]] = {}
        self.host: dict[str, HostCopy] = {}
        self.host_budget_tokens = (
            host_budget_tokens if host_budget_tokens is not None else budget_tokens
        )
        self._fresh: list[int] = []  # blocks handed out but not yet zeroed
        self.swap_outs = 0
        self.swap_ins = 0
        self.drops = 0

    # -- accounting ----------------------------------------------------------------------------

    @property
    def budget_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def used_tokens(self) -> int:
        """Device tokens in blocks some job references (a shared block counts once)."""
        return (self.num_blocks - 1 - self.available) * self.block_size

    @property
    def available(self) -> int:
        """Blocks a reservation can take: the free ones and the idle cached ones."""
        return len(self.free) + (len(self.prefix.idle) if self.prefix is not None else 0)

    @property
    def host_tokens(self) -> int:
        return sum(h.tokens for h in self.host.values())

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def shortfall(self, job_id: str, tokens: int) -> int:
        """Blocks still to find before ``job_id`` can hold ``tokens`` tokens on the device."""
        have = len(self.tables.get(job_id, ()))
        return max(0, self.blocks_for(tokens) - have - self.available)

    def resident(self, job_id: str) -> bool:
        return job_id in self.tables

    # -- allocation ----------------------------------------------------------------------------

    def reserve(self, job_id: str, tokens: int) -> None:
        """Make ``job_id``'s table cover ``tokens`` positions."""
        table = self.tables.setdefault(job_id, [])
        need = self.blocks_for(tokens) - len(table)
        if need > self.available:
            raise OutOfBlocks(f"{job_id} needs {need} more blocks, {self.available} free")
        for _ in range(need):
            table.append(self._take())

    def release(self, job_id: str) -> None:
        """Forget the job everywhere (finished, aborted, or dropped for recompute). Its cached
        blocks stay cached, idle, for later jobs with the same prefix."""
        self._let_go(job_id)
        self.host.pop(job_id, None)

    def _take(self) -> int:
        """A block for one table: a free one, else the least recently used idle cached one."""
        if self.free:
            block = self.free.pop()
        else:
            evicted = self.prefix.evict() if self.prefix is not None else None
            if evicted is None:
                raise OutOfBlocks("no free block")
            block = evicted
        self.refs[block] = 1
        self._fresh.append(block)
        return block

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0 and self.prefix is not None:
            self.prefix.claim(block)
        self.refs[block] += 1

    def _put(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] > 0:
            return
        if self.prefix is not None and self.prefix.holds(block):
            self.prefix.park(block)
        else:
            self.free.append(block)

    def _let_go(self, job_id: str) -> list[int]:
        """Drop the job's references to its device blocks; returns its table. The tail goes
        first, so a prefix's end is evicted before its start, which more jobs share."""
        table = self.tables.pop(job_id, [])
        for block in reversed(table):
            self._put(block)
        self.chains.pop(job_id, None)
        return table

    # -- prefix caching ------------------------------------------------------------------------

    def match(self, job_id: str, tokens: list[int], limit: int) -> int:
        """Share the cached blocks holding the longest prefix of ``tokens`` (at most ``limit``
        tokens, whole blocks only) as ``job_id``'s first blocks; returns how many tokens they
        hold. The job must hold no blocks yet."""
        if self.prefix is None or job_id in self.tables:
            return 0
        keys = block_keys(tokens[: max(0, limit)], self.block_size)
        blocks = self.prefix.match(keys)
        for block in blocks:
            self._hold(block)
        self.tables[job_id] = list(blocks)
        self.chains[job_id] = keys[: len(blocks)]
        return len(blocks) * self.block_size

    def committed_blocks(self, job_id: str) -> int:
        """Leading full blocks of the job already offered to the prefix cache."""
        return len(self.chains.get(job_id, ()))

    def commit(self, job_id: str, tokens: list[int], blocks: int) -> None:
        """The job's first ``blocks`` blocks hold the keys and values of ``tokens`` (at least
        that many full blocks of them): name them in the prefix cache so later jobs share them."""
        table = self.tables.get(job_id)
        if self.prefix is None or table is None:
            return
        chain = self.chains.setdefault(job_id, [])
        blocks = min(blocks, len(table))
        if blocks <= len(chain):
            return
        parent = chain[-1] if chain else None
        new = block_keys(tokens[: blocks * self.block_size], self.block_size, len(chain), parent)
        for index, key in enumerate(new, start=len(chain)):
            self.prefix.add(table[index], key)
        chain.extend(new)

    def check_private(self, job_id: str, first_slot: int) -> None:
        """Raise unless every block of the job from slot ``first_slot`` on is the job's alone
        and unnamed: what a forward or a move is about to write must never be shared."""
        table = self.tables[job_id]
        for block in table[first_slot // self.block_size :]:
            if self.refs[block] != 1 or (self.prefix is not None and self.prefix.holds(block)):
                raise RuntimeError(
                    f"{job_id} would write KV block {block}, which holds a cached prefix"
                )

    def drop(self, job_id: str) -> None:
        self.release(job_id)
        self.drops += 1

    def move(self, job_id: str, moves: list[tuple[int, int]]) -> None:
        """Copy the keys and values at slot ``src`` to slot ``dst`` for each ``(src, dst)``, in
        order (speculative decoding keeps an accepted tree path this way)."""
        moves = [(s, d) for s, d in moves if s != d]
        if not moves or self.keys[0] is None:
            return
        self.check_private(job_id, min(d for _, d in moves))
        blocks = torch.tensor(self.tables[job_id], dtype=torch.long)
        slots = torch.tensor(moves, dtype=torch.long)
        flat = blocks[slots // self.block_size] * self.block_size + slots % self.block_size
        src, dst = flat[:, 0].to(self.device), flat[:, 1].to(self.device)
        for layer in range(self.num_layers):
            for pool in (self.keys[layer], self.values[layer]):
                if pool is not None:
                    pool.index_copy_(0, dst, pool.index_select(0, src))

    def truncate(self, job_id: str, tokens: int) -> None:
        """Give back the blocks of ``job_id`` past its first ``tokens`` slots."""
        table = self.tables.get(job_id)
        if table is None:
            return
        keep = max(1, self.blocks_for(tokens))
        while len(table) > keep:
            self._put(table.pop())
        chain = self.chains.get(job_id)
        if chain is not None:
            del chain[len(table) :]

    def host_room(self, tokens: int) -> bool:
        return self.host_tokens + tokens <= self.host_budget_tokens

    def swap_out(self, job_id: str, tokens: int) -> None:
        """Copy the job's first ``tokens`` cached positions to host memory, free its blocks.
        Shared blocks are copied too and only lose this job's reference: the host copy is whole
        whatever happens to them on the device meanwhile."""
        table = self.tables[job_id]
        copy = HostCopy(tokens, prefix_keys=list(self.chains.get(job_id, ())))
        if tokens and self.keys[0] is not None:
            index = self._positions(table, tokens)
            pin = self.device.type == "cuda"
            for layer in range(self.num_layers):
                for src, dst in ((self.keys[layer], copy.keys), (self.values[layer], copy.values)):
                    assert src is not None
                    part = src.index_select(0, index)
                    host = torch.empty(part.shape, dtype=part.dtype, pin_memory=pin)
                    host.copy_(part, non_blocking=pin)
                    dst.append(host)
            if pin:
                torch.cuda.current_stream(self.device).synchronize()
        self._let_go(job_id)
        self.host[job_id] = copy
        self.swap_outs += 1

    def swap_in(self, job_id: str) -> int:
        """Bring a swapped job's cache back; returns its cached token count. Leading blocks
        whose prefix is still cached on the device are shared again rather than copied."""
        copy = self.host[job_id]
        shared = 0
        if self.prefix is not None:
            blocks = self.prefix.match(copy.prefix_keys[: copy.tokens // self.block_size])
            for block in blocks:
                self._hold(block)
            self.tables[job_id] = list(blocks)
            self.chains[job_id] = copy.prefix_keys[: len(blocks)]
            shared = len(blocks) * self.block_size
        try:
            self.reserve(job_id, max(copy.tokens, 1))
        except OutOfBlocks:
            self._let_go(job_id)  # still swapped: the host copy stays
            raise
        if copy.tokens > shared and copy.keys:
            self._zero_fresh()
            index = self._positions(self.tables[job_id], copy.tokens)[shared:]
            for layer in range(self.num_layers):
                for dst, src in ((self.keys[layer], copy.keys), (self.values[layer], copy.values)):
                    assert dst is not None
                    part = src[layer][shared:]
                    dst.index_copy_(0, index, part.to(self.device, non_blocking=True))
        del self.host[job_id]
        self.swap_ins += 1
        return copy.tokens

    def _positions(self, table: list[int], tokens: int) -> torch.Tensor:
        blocks = torch.tensor(table, dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        flat = (blocks[:, None] * self.block_size + offsets[None, :]).reshape(-1)[:tokens]
        return flat.to(self.device)

    def _ensure_layer(self, layer: int, heads: int, dim: int) -> None:
        if self.keys[layer] is not None:
            return
        # empty, not zeros: on CPU untouched pages of a large budget never become resident.
        # The scratch block and the blocks handed out so far are zeroed here; blocks handed out
        # later are zeroed by _zero_fresh before the forward that uses them.
        shape = (self.num_blocks * self.block_size, heads, dim)
        owned = [SCRATCH, *(b for table in self.tables.values() for b in table)]
        index = self._positions(owned, len(owned) * self.block_size)
        for pools in (self.keys, self.values):
            pool = torch.empty(shape, dtype=self.dtype, device=self.device)
            pool.index_fill_(0, index, 0)
            pools[layer] = pool
        self._fresh = []  # all owned now: zeroed here, and in later layers when they appear

    def _zero_fresh(self) -> None:
        if not self._fresh:
            return
        index = self._positions(self._fresh, len(self._fresh) * self.block_size)
        for layer in range(self.num_layers):
            for pool in (self.keys[layer], self.values[layer]):
                if pool is not None:  # a layer not created yet zeroes owned blocks itself
                    pool.index_fill_(0, index, 0)
        self._fresh = []

    # -- one forward ---------------------------------------------------------------------------

    def view(self, tables: list[list[int]], write: torch.Tensor) -> BatchView:
        """A Cache for one forward over jobs with these block ``tables``; the new tokens' keys
        and values go to the flat slots ``write`` (``[batch * q]``, scratch for padding)."""
        self._zero_fresh()
        width = max(len(t) for t in tables)
        bs = self.block_size
        first = tables[0]
        if len(tables) == 1 and first == list(range(first[0], first[0] + len(first))):
            # one job whose blocks follow each other (the usual case alone: blocks are handed
            # out in order): its history is a slice of the pool, no gather at all
            return BatchView(self, slice(first[0] * bs, (first[-1] + 1) * bs), 1, width * bs, write)
        # every job's slots in order, padded with scratch: one index_select per layer gathers all
        read = [
            b * bs + o
            for t in tables
            for b in (*t, *[SCRATCH] * (width - len(t)))
            for o in range(bs)
        ]
        index = torch.tensor(read, dtype=torch.long).to(self.device, non_blocking=True)
        return BatchView(self, index, len(tables), width * bs, write)


class BatchView(Cache):
    """The transformers ``Cache`` one batched forward writes into (see the module docstring)."""

    def __init__(
        self,
        pool: KVPool,
        read: torch.Tensor | slice,
        batch: int,
        kv_length: int,
        write: torch.Tensor,
    ):
        # Deliberately not Cache.__init__: no per-layer objects, everything lives in the pool.
        self.pool = pool
        self.read = read  # [batch * kv_length] flat slots, each job's history in order; or a slice
        self.batch = batch
        self.write = write
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.kv_length = kv_length

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool
        batch, heads, q, dim = key_states.shape
        pool._ensure_layer(layer_idx, heads, dim)
        out = []
        for store, new in (
            (pool.keys[layer_idx], key_states),
            (pool.values[layer_idx], value_states),
        ):
            assert store is not None
            store.index_copy_(0, self.write, new.transpose(1, 2).reshape(batch * q, heads, dim))
            read = self.read
            history = store[read] if isinstance(read, slice) else store.index_select(0, read)
            out.append(history.view(batch, self.kv_length, heads, dim).transpose(1, 2))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.kv_length

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.pool.num_layers
