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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from flockctl.engine.config import EngineLoadError
from flockctl.engine.kv_io import LayersIO, store_and_read
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
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see _ensure_layer
        # jobs whose cache changed outside a forward (moved, swapped, released): a runner's
        # dense rows of them are stale (see DenseRows)
        self.changed: set[str] = set()
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
        self.changed.add(job_id)
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
        self.changed.add(job_id)
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
        self.changed.add(job_id)
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
        # On CPU the whole budget is written once here (zeros), so that every page is resident
        # from the start: left empty, each block's first use faulted its pages in, 160 us a
        # block against 45 to zero it again (16 layers), a tenth of a fresh engine's decode
        # iterations at 32 jobs; and an engine without the memory for its budget fails at
        # start, not under load. Elsewhere the device's allocator hands out memory that is
        # resident already. The blocks handed out so far are zeroed here; blocks handed out
        # later are zeroed by _zero_fresh before the forward that uses them.
        # Every layer's store is a slice of one tensor [layers, slots, heads, dim] when they
        # all have the first one's shape (a compiled forward takes the whole pool in one array)
        shape = (self.num_blocks * self.block_size, heads, dim)
        make = torch.zeros if self.device.type == "cpu" else torch.empty
        if self.device.type == "cpu" and all(k is None for k in self.keys):
            stacked = (self.num_layers, *shape)
            self._stacked = (
                make(stacked, dtype=self.dtype, device=self.device),
                make(stacked, dtype=self.dtype, device=self.device),
            )
        owned = [SCRATCH, *(b for table in self.tables.values() for b in table)]
        index = self._positions(owned, len(owned) * self.block_size)
        stacks = self._stacked or (None, None)
        for pools, stack in zip((self.keys, self.values), stacks, strict=True):
            if stack is not None and tuple(stack.shape[1:]) == shape:
                pool = stack[layer]
            else:
                pool = make(shape, dtype=self.dtype, device=self.device)
                self._stacked = None
            pool.index_fill_(0, index, 0)
            pools[layer] = pool
        self._fresh = []  # all owned now: zeroed here, and in later layers when they appear

    def stacked(self, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every layer's keys and values as one tensor each, ``[layers, slots, heads, dim]``
        (created first, with ``heads`` heads of ``dim``); None where the layers' stores differ
        in shape. Blocks handed out since the last forward are zeroed first, as
        :meth:`view` does."""
        if self.keys[-1] is None:  # layers are created in order
            for layer in range(self.num_layers):
                self._ensure_layer(layer, heads, dim)
        self._zero_fresh()
        return self._stacked

    def _zero_fresh(self) -> None:
        if not self._fresh:
            return
        # each run of consecutive blocks as one slice of slots: at 32 decoding jobs about two
        # blocks a step are new, and an index_fill over the stacked layers (with the index
        # tensor built for it) took 4x the time of zeroing the slices
        bs = self.block_size
        runs: list[tuple[int, int]] = []
        for block in sorted(self._fresh):
            if runs and runs[-1][1] == block * bs:
                runs[-1] = (runs[-1][0], (block + 1) * bs)
            else:
                runs.append((block * bs, (block + 1) * bs))
        if self._stacked is not None:  # every layer at once: a speculative step's tree often
            for stack in self._stacked:  # takes a new block, and one op a layer was a twelfth
                for start, end in runs:  # of the step (demo model, 16 layers)
                    stack[:, start:end].zero_()
        else:
            for layer in range(self.num_layers):
                for pool in (self.keys[layer], self.values[layer]):
                    if pool is not None:  # a layer not created yet zeroes owned blocks itself
                        for start, end in runs:
                            pool[start:end].zero_()
        self._fresh = []

    # -- one forward ---------------------------------------------------------------------------

    def view(
        self,
        tables: list[list[int]],
        write: torch.Tensor,
        dense: DenseWrite | None = None,
    ) -> BatchView:
        """A Cache for one forward over jobs with these block ``tables``; the new tokens' keys
        and values go to the flat slots ``write`` (``[batch * q]``, scratch for padding). With
        ``dense`` the histories are read from the runner's :class:`DenseRows`, not gathered."""
        self._zero_fresh()
        width = max(len(t) for t in tables)
        bs = self.block_size
        if dense is not None:
            return BatchView(self, None, len(tables), width * bs, write, dense)
        if reads_in_place(tables):
            first = tables[0]
            return BatchView(self, slice(first[0] * bs, (first[-1] + 1) * bs), 1, width * bs, write)
        # every job's slots in order, padded with scratch: one index_select per layer gathers all
        blocks = torch.tensor([[*t, *[SCRATCH] * (width - len(t))] for t in tables])
        read = (blocks[:, :, None] * bs + torch.arange(bs)).view(-1)
        index = read.to(self.device, non_blocking=True)
        return BatchView(self, index, len(tables), width * bs, write)

    def slots_of(self, table: list[int]) -> torch.Tensor:
        """The flat pool slots of every position of ``table``, in order."""
        return self._positions(table, len(table) * self.block_size)


def reads_in_place(tables: list[list[int]]) -> bool:
    """Whether a forward over jobs with these block ``tables`` reads their history as a slice
    of the pool, no gather at all: one job whose blocks follow each other (the usual case for a
    job alone, as blocks are handed out in order)."""
    if len(tables) != 1 or not tables[0]:
        return False
    first = tables[0]
    return first == list(range(first[0], first[0] + len(first)))


#: Slots a runner's dense rows may hold at least, whatever the KV budget (a small budget's rows
#: would otherwise fall back to gathering for a handful of jobs).
DENSE_MIN_SLOTS = 4096


@dataclass
class DenseWrite:
    """Where one forward's tokens go in the dense rows: ``write``, ``row * width + slot`` per
    token of the batch (``[batch * q]``; the scratch column for padding), and the rows it fills
    from the pool first (``fill_src``: pool slots, ``fill_dst``: ``row * width + slot``)."""

    rows: DenseRows
    write: torch.Tensor
    fill_src: torch.Tensor | None
    fill_dst: torch.Tensor | None
    batch: int
    lengths: torch.Tensor | None = None  # per row, for the decode attention kernel (runner)
    _by_heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def flat(self, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``write`` and ``fill_dst`` as rows of a layer's ``[rows * heads * width, dim]`` view,
        in the order of the values written: ``(batch, head, q)`` and ``(slot, head)``."""
        done = self._by_heads.get(heads)
        if done is None:
            width = self.rows.width
            offsets = torch.arange(heads, device=self.write.device) * width

            def spread(at: torch.Tensor) -> torch.Tensor:  # row * width + c -> (row, head, c)
                return at + (at // width) * (heads - 1) * width

            write = spread(self.write).view(self.batch, 1, -1) + offsets.view(1, heads, 1)
            fill = None
            if self.fill_dst is not None:
                fill = (spread(self.fill_dst)[:, None] + offsets[None, :]).reshape(-1)
            done = self._by_heads[heads] = (write.reshape(-1), fill)
        return done


class DenseRows:
    """The running batch's keys and values kept per layer as dense rows across forwards, so a
    decode step reads its history in place instead of gathering every job's blocks again.

    Row ``r`` holds the job at ``jobs[r]``, slot ``s`` of its block table at column ``s`` of
    each head; the last column is scratch (padding writes there, masked). The pool stays the
    truth: a forward writes both, and a job that enters a row (new to the batch, or its cache
    changed outside a forward: moved, swapped, released) is copied in from its blocks once. The
    rows cover at most ``max_slots`` (jobs times columns); a batch wider than that gathers.
    """

    def __init__(self, pool: KVPool, max_slots: int):
        self.pool = pool
        self.max_slots = max_slots
        self.jobs: list[str] = []  # the job in each row, as the last forward left them
        self.rows = 0  # rows and columns the layers are (being) allocated with
        self.width = 0
        self.keys: list[torch.Tensor | None] = [None] * pool.num_layers
        self.values: list[torch.Tensor | None] = [None] * pool.num_layers

    def place(self, job_ids: Sequence[str], kv_len: int) -> tuple[list[str], list[int]] | None:
        """Rows for one forward of ``job_ids`` with histories of ``kv_len`` slots: the jobs in
        row order (rows ``0 .. len - 1``) and the rows to fill from the pool. A job keeps the
        row it had when nothing changed its cache; None when the rows would be too large."""
        pool = self.pool
        changed, pool.changed = pool.changed, set()
        batch = len(job_ids)
        if batch * (kv_len + 1) > self.max_slots:
            self.jobs = []
            return None
        wanted = set(job_ids)
        order: list[str | None] = [None] * batch
        for row, job_id in enumerate(self.jobs[:batch]):
            if job_id in wanted and job_id not in changed:
                order[row] = job_id
        kept = {j for j in order if j is not None}
        free = (row for row, j in enumerate(order) if j is None)
        fills = []
        for job_id in job_ids:
            if job_id not in kept:
                row = next(free)
                order[row] = job_id
                fills.append(row)
        self.jobs = [j for j in order if j is not None]
        # sized to the batch, with room to grow: reading a few columns of wide rows is slower
        # than reading them packed, so rows far wider (or more) than needed are reallocated
        rows, width = -(-batch // 8) * 8, -(-(kv_len + 1) // 64) * 64
        if not rows <= self.rows <= 2 * rows + 8:
            self.rows = rows
        if not width <= self.width <= 2 * width:
            self.width = width + 64
        return self.jobs, fills

    def write(self, slots: list[list[int]], fills: list[int]) -> DenseWrite:
        """The dense side of one forward: ``slots[r]`` the slots row ``r`` writes (-1:
        padding); ``fills``: rows copied in from the pool first."""
        width = self.width
        scratch = width - 1
        flat = [r * width + (s if s >= 0 else scratch) for r, row in enumerate(slots) for s in row]
        device = self.pool.device
        src = dst = None
        if fills:
            parts = [self.pool.slots_of(self.pool.tables[self.jobs[r]]) for r in fills]
            src = torch.cat(parts)
            dst = torch.cat(
                [
                    r * width + torch.arange(len(p), device=device)
                    for r, p in zip(fills, parts, strict=True)
                ]
            )
        index = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
        return DenseWrite(self, index, src, dst, len(slots))

    def layer(self, index: int, keys: bool, heads: int, dim: int) -> torch.Tensor:
        """Layer ``index``'s keys (or values) ``[rows, heads, width, dim]`` (each head's history
        contiguous, as attention reads it), grown to the size the current forward placed (what
        was there is kept)."""
        store = self.keys if keys else self.values
        old = store[index]
        if old is not None and (old.shape[0], old.shape[2]) == (self.rows, self.width):
            return old
        new = torch.zeros(
            (self.rows, heads, self.width, dim), dtype=self.pool.dtype, device=self.pool.device
        )
        if old is not None:  # the rows in use fit both; the scratch column is not kept
            rows, width = min(old.shape[0], self.rows), min(old.shape[2], self.width) - 1
            new[:rows, :, :width] = old[:rows, :, :width]
        store[index] = new
        return new

    def clear(self) -> None:
        """Forget which job is in which row (a forward did not write the rows)."""
        self.jobs = []


class BatchView(Cache):
    """The transformers ``Cache`` one batched forward writes into (see the module docstring)."""

    def __init__(
        self,
        pool: KVPool,
        read: torch.Tensor | slice | None,
        batch: int,
        kv_length: int,
        write: torch.Tensor,
        dense: DenseWrite | None = None,
    ):
        # Deliberately not Cache.__init__: no per-layer objects, everything lives in the pool.
        self.pool = pool
        # [batch * kv_length] flat slots, each job's history in order; or a slice; None: dense
        self.read = read
        self.batch = batch
        self.write = write
        self.dense = dense
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.kv_length = kv_length
        self._io: dict[int, LayersIO] = {}  # by key/value heads

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # layer by layer, each with its own head count: transformers' models need not share one
        _, heads, _, dim = key_states.shape
        pool = self.pool
        pool._ensure_layer(layer_idx, heads, dim)
        io = self._indices(heads)
        rows: list[torch.Tensor | None] = [None, None]
        if self.dense is not None:
            rows = [self.dense.rows.layer(layer_idx, keys, heads, dim) for keys in (True, False)]
        keys, values = pool.keys[layer_idx], pool.values[layer_idx]
        assert keys is not None and values is not None
        return (
            store_and_read(key_states, keys, rows[0], io),
            store_and_read(value_states, values, rows[1], io),
        )

    def layers_io(self, heads: int, dim: int) -> LayersIO:
        """Every layer's stores, created or grown first (each with ``heads`` key/value heads of
        ``dim``), and this forward's indices: what :func:`store_and_read` takes."""
        pool = self.pool
        for layer in range(pool.num_layers):
            pool._ensure_layer(layer, heads, dim)
        io = self._indices(heads)._replace(
            pool_keys=[k for k in pool.keys if k is not None],
            pool_values=[v for v in pool.values if v is not None],
        )
        if self.dense is not None:
            rows = self.dense.rows
            io = io._replace(
                dense_keys=[rows.layer(i, True, heads, dim) for i in range(pool.num_layers)],
                dense_values=[rows.layer(i, False, heads, dim) for i in range(pool.num_layers)],
            )
        return io

    def _indices(self, heads: int) -> LayersIO:
        """This forward's indices for layers of ``heads`` key/value heads (no stores)."""
        io = self._io.get(heads)
        if io is None:
            dense_write = fill_src = fill_dst = None
            if self.dense is not None:
                dense_write, fill_dst = self.dense.flat(heads)
                if fill_dst is not None:
                    fill_src = self.dense.fill_src
            read, start, end = self.read, 0, 0
            if isinstance(read, slice):
                start, end, read = read.start, read.stop, None
            io = LayersIO(
                [], [], self.write, [], [], dense_write, fill_src, fill_dst,
                read, start, end, self.kv_length,
                self.dense.lengths if self.dense is not None else None,
            )  # fmt: skip
            self._io[heads] = io
        return io

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.kv_length

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.pool.num_layers
