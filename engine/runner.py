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

import torch

from flockctl.engine.job import Job
from flockctl.engine.kv import SCRATCH, KVPool


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
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device):
        self.model = model
        self.pool = pool
        self.device = device
        self.mask_min = torch.finfo(pool.dtype).min
        self.forwards = 0

    def tokens(self, job: Job) -> list[int]:
        return (job.prompt_ids + job.output_ids)[job.cached_tokens :]

    @torch.inference_mode()
    def forward(self, jobs: Sequence[Job]) -> torch.Tensor:
        """Feed each job the tokens not yet in its cache (KV blocks reserved by the caller);
        returns float32 logits ``[len(jobs), vocab]`` for each job's next token. Afterwards every
        token of each job is cached; the caller records that (the batcher owns the count)."""
        feeds = [Feed.linear(self.tokens(job), job.cached_tokens) for job in jobs]
        return self._forward([job.id for job in jobs], feeds)[:, -1]

    @torch.inference_mode()
    def run(self, job_ids: Sequence[str], feeds: Sequence[Feed]) -> list[torch.Tensor]:
        """One forward of ``feeds`` into the blocks of ``job_ids``; returns, per job, float32
        logits ``[feed.keep, vocab]`` for its last ``keep`` tokens."""
        logits = self._forward(job_ids, feeds)
        keep = logits.shape[1]
        return [logits[row, keep - feed.keep :] for row, feed in enumerate(feeds)]

    def _forward(self, job_ids: Sequence[str], feeds: Sequence[Feed]) -> torch.Tensor:
        pool = self.pool
        bs = pool.block_size
        q = max(len(f.tokens) for f in feeds)
        keep = max(f.keep for f in feeds)
        tables = [pool.tables[job_id] for job_id in job_ids]
        kv_len = max(len(t) for t in tables) * bs

        scratch = SCRATCH * bs
        ids, pos, write, limit = [], [], [], []  # rows left-padded to q
        trees = []
        for row, (feed, table) in enumerate(zip(feeds, tables, strict=True)):
            if feed.slots:  # a block shared through the prefix cache is never written
                pool.check_private(job_ids[row], min(feed.slots))
            pad = q - len(feed.tokens)
            ids.append([0] * pad + feed.tokens)
            pos.append([0] * pad + feed.positions)
            limit.append([0] * pad + feed.limits)  # padding sees slot 0 only: no empty rows
            write.append([scratch] * pad + [table[s // bs] * bs + s % bs for s in feed.slots])
            if feed.tree is not None:
                trees.append((row, pad, feed.tree_base, feed.tree))
        limits = torch.tensor(limit, dtype=torch.long)
        kv = torch.arange(kv_len, dtype=torch.long)
        allowed = kv[None, None, :] <= limits[:, :, None]
        for row, first, base, tree in trees:
            allowed[row, first:, base : base + tree.shape[1]] |= tree
        mask = torch.where(allowed, 0.0, self.mask_min)

        slots = torch.tensor(write, dtype=torch.long).view(-1)
        cache = pool.view(tables, slots.to(self.device, non_blocking=True))
        out = self.model(
            input_ids=torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            attention_mask=mask[:, None].to(self.device, dtype=pool.dtype, non_blocking=True),
            position_ids=torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        self.forwards += 1
        return out.logits.float()
