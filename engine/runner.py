"""One batched forward for a set of jobs of different lengths over the paged KV cache.

Each job brings a :class:`Feed`: the tokens it adds this forward, their position ids, the slots of
its block table their keys and values go to, and what each of them may attend to. An incremental
feed is the tokens not yet cached (the whole prompt the first time, one token afterwards), at
slots equal to their positions, each seeing everything up to itself. A token-tree feed (speculative
decoding) puts tree node ``i`` at slot ``root + i`` with position ``root + depth``; a node sees the
committed prefix and, inside the tree, only its ancestors and itself.

Rows are left-padded to the longest feed, so every job's last ``keep`` tokens are the batch's last
columns and ``logits_to_keep`` gives exactly the logits asked for. One 4D additive mask (0 attend,
dtype min masked; a boolean mask is silently wrong with eager attention) and explicit
``position_ids`` let jobs of any length and shape share the forward.

A job whose prompt starts with a cached prefix begins its first feed after it: its first tokens'
keys and values are read from blocks it shares with other jobs and never written again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flockctl.engine import decode_attention, fused_forward, fused_spec
from flockctl.engine.job import Job
from flockctl.engine.kv import DENSE_MIN_SLOTS, SCRATCH, DenseRows, KVPool, reads_in_place
from flockctl.engine.lean_forward import exact_forward

#: Decode steps of at least this many jobs take the decode attention kernel (with ``attention=
#: "fast"``). Each layer's call into it costs about 12 us and takes the GIL back; below this it
#: bought nothing on the demo model (runner alone, histories of 20-110 tokens: 2.8-3.0 against
#: 2.6-2.8 ms a step at 2 jobs, either way at 4; 4.9-5.0 against 5.4-5.8 ms at 8, 7.2-7.9
#: against 8.9-9.1 at 16), and served one job at a time it ran a fifth slower.
KERNEL_MIN_BATCH = 8

#: Forwards of at most this many token rows run :mod:`flockctl.engine.fused_forward` (with
#: ``attention="fast"`` and one torch thread). Above it MKL's products win: on the demo model a
#: prefill of 64 rows took 6.9 ms fused against 7.7, of 128 (4 prompts of 32) 13.0 against 11.9.
FUSED_MAX_ROWS = 64
#: With the fused forward split over two threads, forwards whose halves have at most this many
#: rows run fused too: a prefill of 10 prompts of 25 tokens took 15.1 ms against MKL's 19.4 on
#: one thread, 4 of 64 tokens 14.2 against 19.5 (a single 250-token chunk, which does not
#: split, 38.8 against 22.4: it keeps MKL)
SPLIT_MAX_ROWS = 160


@dataclass
class Feed:
    """What one job adds to one forward. ``limits[i]``: the last slot token ``i`` sees in order;
    ``tree``: extra visibility, a bool ``[len(tokens), width]`` over slots ``tree_base ...``."""

    tokens: list[int]
    positions: list[int]
    slots: list[int]
    limits: list[int]
    keep: int = 1
    tree_base: int = 0
    tree: torch.Tensor | None = None

    @classmethod
    def linear(cls, tokens: list[int], start: int, keep: int = 1) -> Feed:
        """Tokens at positions (and slots) ``start ...``, each seeing everything up to itself."""
        span = list(range(start, start + len(tokens)))
        return cls(tokens, span, span, span, keep)

    @classmethod
    def token_tree(
        cls,
        tokens: list[int],
        depths: list[int],
        nodes: list[int],
        root: int,
        ancestry: torch.Tensor,
    ) -> Feed:
        """Tree nodes ``nodes`` (indices in their tree, with these tokens and depths); the tree's
        root sits at slot and position ``root``. ``ancestry``: bool ``[tree size, tree size]``,
        ``[i, j]`` true when node ``j`` is node ``i`` or one of its ancestors."""
        index = torch.tensor(nodes, dtype=torch.long)
        return cls(
            tokens,
            [root + d for d in depths],
            [root + i for i in nodes],
            [root - 1] * len(nodes),
            keep=len(nodes),
            tree_base=root,
            tree=ancestry.index_select(0, index),
        )


class Runner:
    """Forwards over the paged KV cache. On CPU the running batch's histories are kept as dense
    rows across forwards (:class:`DenseRows`); elsewhere each forward gathers them (a second
    copy of the batch's cache would come out of the KV budget's device memory).

    A model :func:`exact_forward` covers runs its lean forward (the same logits, bit for bit,
    without transformers' module machinery); any other runs through transformers. With
    ``attention="fast"`` the lean forward's decode steps over dense rows attend with
    :mod:`flockctl.engine.decode_attention` (each row read to its own length; the logits'
    last bits then differ from transformers'), and with ``fused`` too, forwards of at most
    ``FUSED_MAX_ROWS`` token rows run :mod:`flockctl.engine.fused_forward` instead."""

    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        device: torch.device,
        dense: bool | None = None,
        lean: bool = True,
        attention: str = "exact",
        fused: bool = False,
        fused_threads: int = 1,
    ):
        self.model = model
        # the served model's forward: its exact lean forward where it has one (unless ``lean``
        # is off), else transformers'
        self.lean = exact_forward(model) if lean else None
        self._call: Any = self.lean or model
        self.pool = pool
        self.device = device
        self.mask_min = torch.finfo(pool.dtype).min
        self.forwards = 0
        # decode steps over dense rows take the decode attention kernel
        self.fast_decode = (
            attention == "fast"
            and self.lean is not None
            and decode_attention.usable(pool.dtype, device)
        )
        # with ``fused``, forwards of up to FUSED_MAX_ROWS token rows run as one compiled call
        # (fused_forward.py); it runs on one core, so the engine asks for it with one torch
        # thread only (with more, MKL's products share the work)
        self.fused = (
            fused_forward.FusedLlama(model, fused_threads)
            if fused and self.fast_decode and fused_forward.usable(model, pool.dtype, device)
            else None
        )
        self.fused_forwards = 0
        if dense is None:
            dense = device.type == "cpu"
        self.dense = DenseRows(pool, max(pool.budget_tokens, DENSE_MIN_SLOTS)) if dense else None
        self._columns = torch.arange(0, dtype=torch.long)  # 0 .. n-1, grown as needed

    def close(self) -> None:
        """Stop the fused forward's second thread, if it has one."""
        if self.fused is not None:
            self.fused.close()

    def tokens(self, job: Job, count: int | None = None) -> list[int]:
        """The job's tokens not yet in its cache (the first ``count`` of them, if given)."""
        start = job.cached_tokens
        return job.tokens(start, None if count is None else start + count)

    @torch.inference_mode()
    def forward(
        self, jobs: Sequence[Job], counts: Sequence[int | None] | None = None
    ) -> torch.Tensor:
        """Feed each job the tokens not yet in its cache (``counts[i]`` of them where given: a
        prefill chunk; KV blocks reserved by the caller); returns float32 logits
        ``[len(jobs), vocab]`` for each job's last token fed. Afterwards those tokens are
        cached; the caller records that (the batcher owns the count)."""
        if counts is None:
            feeds = [Feed.linear(self.tokens(job), job.cached_tokens) for job in jobs]
        else:
            feeds = [
                Feed.linear(self.tokens(job, n), job.cached_tokens)
                for job, n in zip(jobs, counts, strict=True)
            ]
        return self._forward([job.id for job in jobs], feeds)[:, -1]

    @torch.inference_mode()
    def run(self, job_ids: Sequence[str], feeds: Sequence[Feed]) -> list[torch.Tensor]:
        """One forward of ``feeds`` into the blocks of ``job_ids``; returns, per job, float32
        logits ``[feed.keep, vocab]`` for its last ``keep`` tokens."""
        logits = self._forward(job_ids, feeds)
        keep = logits.shape[1]
        return [logits[row, keep - feed.keep :] for row, feed in enumerate(feeds)]

    def chainable(self) -> bool:
        """Whether :meth:`draft_chain` runs here: the fused forward, over a stacked pool."""
        return (
            self.fused is not None
            and self.pool.stacked(self.fused.kv_heads, self.fused.head_dim) is not None
        )

    def draft_chain(
        self, job_ids: Sequence[str], roots: list[int], first: list[int], steps: list[int],
        vocab: int,
    ) -> list[list[int]]:  # fmt: skip
        """Greedy drafting as one compiled call (:meth:`FusedLlama.chain`): job ``i`` feeds
        ``first[i]`` after its token at ``roots[i]``, then each token it picks, ``steps[i]``
        forwards of one token a job, the keys and values going to its blocks; returns each
        job's picks (argmax over the first ``vocab`` logits). Only where :meth:`chainable`."""
        assert self.fused is not None
        stores = self.pool.stacked(self.fused.kv_heads, self.fused.head_dim)
        assert stores is not None
        tables = fused_forward.table_array([self.pool.tables[job_id] for job_id in job_ids])
        bs = self.pool.block_size
        drafted = self.fused.chain(first, roots, steps, tables, bs, vocab, *stores)
        self.fused_done(max(steps, default=0))
        return drafted

    def greedy(
        self,
        jobs: Sequence[Job],
        steps: Sequence[int] | None = None,
        stops: np.ndarray | None = None,
        interrupt: np.ndarray | None = None,
    ) -> list[list[int]] | None:
        """Feed each job its one token not yet cached and return the model's argmax after it,
        straight from the compiled forward (:func:`fused_spec.greedy_run`: the tokens
        :meth:`forward` and a greedy sampler would give); with ``steps[i]`` above 1, job ``i``
        goes on feeding each token it picks, up to that many picks in all, stopping after one in
        ``stops[i]`` (-1 pads), every job after the forward during which ``interrupt[0]`` was
        set. Each job's table must cover the positions it feeds. None, having fed nothing, where
        that forward does not take this step (a job with more to feed, or not
        :meth:`chainable`)."""
        if not self.chainable() or not self._fits_fused([1] * len(jobs)):
            return None
        last: list[int] = []
        for job in jobs:
            unfed = self.tokens(job)
            if len(unfed) != 1:
                return None
            last.append(unfed[0])
        count = len(jobs)
        return fused_spec.greedy_run(
            self,
            [job.id for job in jobs],
            last,
            [job.cached_tokens for job in jobs],
            steps or [1] * count,
            stops if stops is not None else np.full((count, 1), -1, dtype=np.int64),
            interrupt if interrupt is not None else np.zeros(1, dtype=np.int8),
        )

    def _fits_fused(self, counts: Sequence[int]) -> bool:
        """Whether a forward of jobs feeding ``counts`` tokens each runs fused: up to
        ``FUSED_MAX_ROWS`` token rows, or, split over two threads, up to ``SPLIT_MAX_ROWS`` in
        each half."""
        assert self.fused is not None
        rows = sum(counts)
        if rows <= FUSED_MAX_ROWS:
            return True
        if self.fused.threads < 2:
            return False
        cut = fused_forward.split_point(np.repeat(np.arange(len(counts)), counts))
        return cut > 0 and max(cut, rows - cut) <= SPLIT_MAX_ROWS

    def fused_done(self, forwards: int = 1) -> None:
        """Compiled forwards ran outside :meth:`run` (or inside it): their counts, and the dense
        rows, which did not get their tokens, are stale."""
        if self.dense is not None:
            self.dense.clear()  # the rows did not get this forward's tokens
        self.forwards += forwards
        self.fused_forwards += forwards

    def _arange(self, n: int) -> torch.Tensor:
        if self._columns.shape[0] < n:
            self._columns = torch.arange(max(n, 2 * self._columns.shape[0]), dtype=torch.long)
        return self._columns[:n]

    def _fused(
        self,
        feeds: Sequence[Feed],
        tables: list[list[int]],
        keep: int,
        stores: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`_forward` as one compiled call (:mod:`flockctl.engine.fused_forward`): each
        token a row, histories read from the pool's blocks (the dense rows are left stale)."""
        assert self.fused is not None
        bs = self.pool.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows_job: list[int] = []
        limits: list[int] = []
        bases: list[int] = []
        out: list[int] = []
        width = max((f.tree.shape[1] for f in feeds if f.tree is not None), default=0)
        tree = np.zeros((sum(len(f.tokens) for f in feeds), width), dtype=np.bool_)
        for j, (feed, table) in enumerate(zip(feeds, tables, strict=True)):
            n = len(feed.tokens)
            if feed.tree is not None:
                tree[len(ids) : len(ids) + n, : feed.tree.shape[1]] = feed.tree.numpy()
            ids += feed.tokens
            positions += feed.positions
            slots += [table[s // bs] * bs + s % bs for s in feed.slots]
            rows_job += [j] * n
            limits += feed.limits
            bases += [feed.tree_base] * n
            first_kept = j * keep + keep - feed.keep  # its kept tokens end the job's logits
            out += [-1] * (n - feed.keep) + list(range(first_kept, first_kept + feed.keep))
        rows = {
            "ids": np.array(ids, dtype=np.int64),
            "positions": np.array(positions, dtype=np.int64),
            "slots": np.array(slots, dtype=np.int64),
            "jobs": np.array(rows_job, dtype=np.int64),
            "limits": np.array(limits, dtype=np.int64),
            "tree_base": np.array(bases, dtype=np.int64),
            "tree": tree,
            "keep": np.array(out, dtype=np.int64),
        }
        logits = self.fused(rows, fused_forward.table_array(tables), bs, *stores, len(feeds) * keep)
        self.fused_done()
        return logits.view(len(feeds), keep, -1)

    def _forward(self, job_ids: Sequence[str], feeds: Sequence[Feed]) -> torch.Tensor:
        """Logits ``[len(feeds), keep, vocab]``, rows in the order of ``job_ids``."""
        pool = self.pool
        bs = pool.block_size
        q = max(len(f.tokens) for f in feeds)
        keep = max(f.keep for f in feeds)
        tables = [pool.tables[job_id] for job_id in job_ids]
        for job_id, feed in zip(job_ids, feeds, strict=True):
            if feed.slots:  # a block shared through the prefix cache is never written
                pool.check_private(job_id, min(feed.slots))
        if self.fused is not None and self._fits_fused([len(f.tokens) for f in feeds]):
            stores = pool.stacked(self.fused.kv_heads, self.fused.head_dim)
            if stores is not None:
                return self._fused(feeds, tables, keep, stores)
        if self.fused is not None:
            self.fused.hand_over()  # not compiled this time: what waits for it goes now
        kv_len = max(len(t) for t in tables) * bs

        # with dense rows, the batch runs in the rows' order; ``back`` maps it to the caller's.
        # Jobs none of which has a row (a prefill beside a decoding batch) read their histories
        # from the pool and leave the rows to the jobs in them, which would otherwise be copied
        # in again at their next step. A job alone whose blocks follow each other reads its
        # history as a slice of the pool (KVPool.view): rows would only add a second write of
        # every token
        placed = None
        # rows held by other jobs still in the pool are kept; a finished job's row is not held
        held = {j for j in self.dense.jobs if j in pool.tables} if self.dense is not None else set()
        beside = bool(held) and held.isdisjoint(job_ids)
        # with the fused forward serving the small decode steps, a prefill's tokens would go to
        # rows no later step reads
        if self.dense is not None and not beside and (self.fused is None or q == 1):
            if reads_in_place(tables):
                self.dense.clear()  # this forward leaves the job's row behind
            else:
                placed = self.dense.place(job_ids, kv_len)
        back: list[int] | None = None
        if placed is not None:
            order = placed[0]
            where = {job_id: i for i, job_id in enumerate(job_ids)}
            index = [where[job_id] for job_id in order]
            if index != list(range(len(index))):
                feeds = [feeds[i] for i in index]
                tables = [tables[i] for i in index]
                job_ids = order
                back = [0] * len(index)
                for row, i in enumerate(index):
                    back[i] = row

        scratch = SCRATCH * bs
        ids, pos, write, limit, dense_slots = [], [], [], [], []  # rows left-padded to q
        trees = []
        for row, (feed, table) in enumerate(zip(feeds, tables, strict=True)):
            pad = q - len(feed.tokens)
            if pad:
                ids.append([0] * pad + feed.tokens)
                pos.append([0] * pad + feed.positions)
                limit.append([0] * pad + feed.limits)  # padding sees slot 0 only: no empty rows
            else:
                ids.append(feed.tokens)
                pos.append(feed.positions)
                limit.append(feed.limits)
            write.append([scratch] * pad + [table[s // bs] * bs + s % bs for s in feed.slots])
            if placed is not None:
                dense_slots.append([-1] * pad + feed.slots)
            if feed.tree is not None:
                trees.append((row, pad, feed.tree_base, feed.tree))
        limits = torch.tensor(limit, dtype=torch.long)
        allowed = self._arange(kv_len)[None, None, :] <= limits[:, :, None]
        for row, first, base, tree in trees:
            allowed[row, first:, base : base + tree.shape[1]] |= tree
        mask = torch.zeros(allowed.shape, dtype=pool.dtype).masked_fill_(~allowed, self.mask_min)

        slots = torch.tensor(write, dtype=torch.long).view(-1)
        dense = None
        if placed is not None and self.dense is not None:
            dense = self.dense.write(dense_slots, placed[1])
            if self.fast_decode and q == 1 and not trees and len(feeds) >= KERNEL_MIN_BATCH:
                dense.lengths = limits[:, 0] + 1  # a decode row sees its slots 0 .. limit
            self.dense.clear()  # until the forward has written the rows
        cache = pool.view(tables, slots.to(self.device, non_blocking=True), dense)
        out = self._call(
            input_ids=torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            attention_mask=mask[:, None].to(self.device, non_blocking=True),
            position_ids=torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        if placed is not None and self.dense is not None:
            self.dense.jobs = list(job_ids)
        self.forwards += 1
        logits = out.logits.float()
        return logits if back is None else logits[back]
