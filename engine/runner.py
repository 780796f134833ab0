"""One batched forward for a set of jobs of different lengths over the paged KV cache.

Each job feeds the tokens not yet in its cache: the whole prompt the first time (or prompt and
output after its cache was dropped), one token afterwards. Rows are left-padded to the longest
feed, so the last column is every job's last real token and ``logits_to_keep=1`` gives the next
token's logits for all of them. A 4D additive mask lets each query see its own job's positions
up to itself; explicit ``position_ids`` carry each job's true positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flockctl.engine.job import Job
from flockctl.engine.kv import SCRATCH, KVPool


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
        """Run one forward for ``jobs`` (KV blocks reserved by the caller); returns float32 logits
        ``[len(jobs), vocab]`` for each job's next token and marks the fed tokens cached."""
        pool = self.pool
        bs = pool.block_size
        feeds = [self.tokens(job) for job in jobs]
        q = max(len(f) for f in feeds)
        batch = len(jobs)
        tables = [pool.tables[job.id] for job in jobs]
        kv_len = max(len(t) for t in tables) * bs

        ids = torch.zeros((batch, q), dtype=torch.long)
        pos = torch.zeros((batch, q), dtype=torch.long)
        write = torch.full((batch, q), SCRATCH * bs, dtype=torch.long)
        limit = torch.full((batch, q), 0, dtype=torch.long)  # last kv position each query sees
        for row, (job, feed, table) in enumerate(zip(jobs, feeds, tables, strict=True)):
            n = len(feed)
            start = job.cached_tokens
            ids[row, q - n :] = torch.tensor(feed, dtype=torch.long)
            positions = torch.arange(start, start + n, dtype=torch.long)
            pos[row, q - n :] = positions
            limit[row, q - n :] = positions
            blocks = torch.tensor(table, dtype=torch.long)
            write[row, q - n :] = blocks[positions // bs] * bs + positions % bs
        kv = torch.arange(kv_len, dtype=torch.long)
        mask = torch.where(kv[None, None, :] <= limit[:, :, None], 0.0, self.mask_min)

        cache = pool.view(tables, write.view(-1).to(self.device, non_blocking=True))
        out = self.model(
            input_ids=ids.to(self.device, non_blocking=True),
            attention_mask=mask[:, None].to(self.device, dtype=pool.dtype, non_blocking=True),
            position_ids=pos.to(self.device, non_blocking=True),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for job, feed in zip(jobs, feeds, strict=True):
            job.cached_tokens += len(feed)
        self.forwards += 1
        return out.logits[:, -1, :].float()
