"""A cap on the tokens one iteration feeds the model (FlexFlow Serve's ``max_tokens_per_batch``,
vLLM's ``max_num_batched_tokens``): a long prompt's prefill then runs beside fewer other jobs, so
one forward's memory and time stay bounded.

The cap filters the scheduler's order before the batcher admits from it: jobs are taken in
priority order while the tokens they feed this iteration (a prefill: every token not yet cached; a
decode step: one) fit; one that does not fit waits, and lower-priority jobs that fit still run.
The highest-priority job always runs, however long its prompt, so nothing waits for ever.
"""

from __future__ import annotations

from flockctl.engine.batcher import Batcher, Plan
from flockctl.engine.config import EngineConfig
from flockctl.engine.job import Job
from flockctl.engine.kv import KVPool


def within_budget(order: list[Job], max_tokens: int) -> list[Job]:
    """The jobs of ``order`` (in order) whose next step fits ``max_tokens`` fed tokens together;
    the first job always."""
    taken: list[Job] = []
    used = 0
    for job in order:
        feed = max(job.total_tokens - job.cached_tokens, 1)
        if taken and used + feed > max_tokens:
            continue
        taken.append(job)
        used += feed
    return taken


class BudgetBatcher(Batcher):
    """A :class:`Batcher` that admits only what fits the iteration's token budget."""

    def __init__(self, pool: KVPool, max_batch_size: int, max_tokens: int):
        super().__init__(pool, max_batch_size)
        self.max_tokens = max_tokens

    def plan(self, order: list[Job]) -> Plan:
        return super().plan(within_budget(order, self.max_tokens))


def make_batcher(pool: KVPool, config: EngineConfig) -> Batcher:
    if config.max_tokens_per_batch is None:
        return Batcher(pool, config.max_batch_size)
    return BudgetBatcher(pool, config.max_batch_size, config.max_tokens_per_batch)
