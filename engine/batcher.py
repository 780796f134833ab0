"""Which jobs run this iteration and where their KV caches live: admission into the batch, KV
residency, eviction, swap and prefetch, and the one place a preemption is counted.

Each iteration the scheduler orders the live jobs; :meth:`Batcher.plan` walks that order and takes
jobs into the batch while the batch has room and their KV fits the device budget, evicting
lower-priority caches when it is short: to host memory while the host budget has room (a swap),
else dropped, to be recomputed from the tokens when the job runs again. Every job that ran last
iteration and was not taken is preempted. After the iteration :meth:`Batcher.end_iteration`
brings the highest-priority swapped job back ahead of its turn when the device has room.

With prefix caching on, a job with nothing cached (new, or dropped for recompute) first shares
the cached blocks holding the longest prefix of its tokens and starts its prefill after them; it
always keeps its last token to compute, so its forward still yields the logits of its next one.
After every forward the job's new full blocks are named in the cache (:meth:`Batcher.mark_cached`),
so running jobs share with each other too, not only with finished ones.

With a token budget (``--max-num-batched-tokens``, vLLM's chunked prefill) an iteration feeds the
model at most that many tokens: the decoding jobs' one each first, then prefills in the order's
priority with what is left, a prompt that does not fit being fed in chunks across iterations beside
the running decodes (:attr:`Plan.chunks`), so a long prompt does not stall them. A job scoring its
prompt (``prompt_logprobs``) needs every position's logits from one forward: it is never chunked.

Pure bookkeeping over a :class:`KVPool`: no model and no clock, so tests drive it with a CPU pool
and hand-made jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flockctl.engine.job import Job, JobState, Preemption
from flockctl.engine.kv import KVPool


@dataclass
class Plan:
    """One iteration's batch and what making room for it did (each job once in each list)."""

    batch: list[Job] = field(default_factory=list)  # runs this iteration, highest priority first
    preempted: list[Job] = field(default_factory=list)  # ran last iteration, left the batch now
    swapped_out: list[Job] = field(default_factory=list)  # caches moved to host memory
    dropped: list[Job] = field(default_factory=list)  # caches dropped, to be recomputed
    swapped_in: list[Job] = field(default_factory=list)  # caches back from host memory
    # prefilling jobs fed only part of their uncached tokens this iteration: how many
    chunks: dict[str, int] = field(default_factory=dict)

    @property
    def chosen(self) -> set[str]:
        return {job.id for job in self.batch}


#: A job's prompt plus output as ``--max-batch-size auto`` sizes the batch: the KV budget holds
#: this many such jobs (at most the model's context each), between AUTO_BATCH_MIN and _MAX.
TYPICAL_JOB_TOKENS = 1024
AUTO_BATCH_MIN = 8
AUTO_BATCH_MAX = 256


def auto_batch_size(budget_tokens: int, max_model_len: int, max_tokens: int | None) -> int:
    """Jobs in one batch for ``--max-batch-size auto``: as many as ``budget_tokens`` of KV hold
    at a typical length; at most half an iteration's token budget ``max_tokens``, so prefills
    always have room beside the decodes."""
    jobs = budget_tokens // max(1, min(max_model_len, TYPICAL_JOB_TOKENS))
    size = max(AUTO_BATCH_MIN, min(AUTO_BATCH_MAX, jobs))
    return max(1, min(size, max_tokens // 2)) if max_tokens is not None else size


#: Tokens an iteration feeds under ``--max-num-batched-tokens auto``: on CUDA a forward of a few
#: thousand tokens costs little more than one of a few hundred; on a CPU it costs in proportion,
#: and the running decodes wait for it. A burst of prompts is then best fed a few at a time, as
#: the first ones start answering while the others wait their turn: 32 prompts of 20-25 tokens
#: arriving at once on the demo model (2-core host) had their first tokens 73 ms after they
#: were sent on average with 256 (six rounds, 66-86), 86 ms with 512 (76-99), at the same
#: tokens/s; a prefill row costs about the same in a forward of 128 rows as in one of 512.
AUTO_BATCHED_TOKENS_CUDA = 2048
AUTO_BATCHED_TOKENS = 256


def default_batched_tokens(device: torch.device) -> int:
    """``--max-num-batched-tokens auto`` on ``device``."""
    return AUTO_BATCHED_TOKENS_CUDA if device.type == "cuda" else AUTO_BATCHED_TOKENS


class Batcher:
    def __init__(self, pool: KVPool, max_batch_size: int, batched_tokens: int | None = None):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.batched_tokens = batched_tokens  # fed to the model per iteration; None: no cap
        self.running: list[Job] = []  # the last batch, less the jobs that finished in it
        self.preemptions = dict.fromkeys(Preemption, 0)

    def plan(self, order: list[Job]) -> Plan:
        """Take jobs from ``order`` (highest priority first) while the batch has room, their
        next step's KV fits and the iteration's token budget has room for them (a prefill
        takes a chunk of what the decodes leave); preempt every running job left out. The
        batch is RUNNING after."""
        plan = Plan()
        chosen: set[str] = set()
        budget = self.batched_tokens
        if budget is not None:  # the decodes' tokens first: prefills take what they leave
            decoding = sum(1 for job in order[: self.max_batch_size] if not job.needs_prefill)
            left = budget - min(decoding, budget)
        for job in order:
            if len(plan.batch) >= self.max_batch_size:
                break
            prefill = job.needs_prefill
            if budget is not None and prefill and left < 1:
                continue
            if not self._make_resident(job, order, chosen, plan):
                break
            if budget is not None and job.needs_prefill:  # a prefix cache hit may end it
                need = job.total_tokens - job.cached_tokens
                if need > left and not _scores_prompt(job):
                    plan.chunks[job.id] = left
                left -= min(need, left)
            plan.batch.append(job)
            chosen.add(job.id)
        for job in self.running:
            if job.id not in chosen and job.state == JobState.RUNNING:
                self._preempt(job, Preemption.DESCHEDULED, JobState.PREEMPTED, plan)
        for job in plan.batch:
            job.state = JobState.RUNNING
        self.running = plan.batch
        return plan

    def end_iteration(self, order: list[Job], plan: Plan) -> Job | None:
        """The batch ran: keep the jobs still running, then prefetch. Returns the job whose
        cache came back from host memory, if one did."""
        self.running = [j for j in plan.batch if j.state == JobState.RUNNING]
        return self._prefetch(order, plan.chosen)

    def mark_cached(self, job: Job, tokens: int) -> None:
        """``job``'s first ``tokens`` tokens have their keys and values in its cache: the one
        place ``job.cached_tokens`` is written (after a forward, a swap-in, a drop, a prefix
        cache hit, and a speculative step that keeps its accepted path)."""
        job.cached_tokens = tokens
        self._commit(job)

    def release(self, job: Job) -> None:
        """The job is finished: give its blocks back, on the device and on the host. Its full
        blocks stay in the prefix cache for later jobs until the pool needs the room."""
        self._commit(job)
        self.pool.release(job.id)

    def _commit(self, job: Job) -> None:
        """Name the job's full blocks that hold known tokens in the prefix cache. A speculative
        step caches its accepted drafts before they join the job's tokens: those blocks wait
        for the next call."""
        pool = self.pool
        if pool.prefix is None:
            return
        full = min(job.cached_tokens, job.total_tokens) // pool.block_size
        if full > pool.committed_blocks(job.id):
            pool.commit(job.id, job.prompt_ids + job.output_ids, full)

    # -- residency ------------------------------------------------------------------------------

    def _make_resident(self, job: Job, order: list[Job], chosen: set[str], plan: Plan) -> bool:
        """Reserve blocks for ``job``'s next step, evicting lower-priority caches if needed."""
        pool = self.pool
        need = job.total_tokens
        matched = self._share_prefix(job)
        while pool.shortfall(job.id, need) > 0:
            victim = next(
                (
                    v
                    for v in reversed(order)
                    if v is not job and v.id not in chosen and pool.resident(v.id)
                ),
                None,
            )
            if victim is None:
                if matched is not None:  # not this time: the shared blocks go back
                    pool.release(job.id)
                    self.mark_cached(job, 0)
                return False
            self._evict(victim, plan)
        if job.state == JobState.SWAPPED:
            self._swap_in(job)
            plan.swapped_in.append(job)
        pool.reserve(job.id, need)
        if matched is not None and pool.prefix is not None:
            pool.prefix.count(need, matched)
        return True

    def _share_prefix(self, job: Job) -> int | None:
        """Start a job with nothing cached on the cached blocks of its longest cached prefix,
        its last token left to compute; returns the tokens shared (None: no lookup made). A job
        that is to score its prompt needs the logits of every prompt position: it computes all."""
        pool = self.pool
        if (
            pool.prefix is None
            or job.cached_tokens
            or job.state == JobState.SWAPPED
            or pool.resident(job.id)
            or (job.params.prompt_logprobs is not None and job.prompt_logprobs is None)
        ):
            return None
        tokens = job.prompt_ids + job.output_ids
        matched = pool.match(job.id, tokens, len(tokens) - 1)
        self.mark_cached(job, matched)
        return matched

    def _evict(self, job: Job, plan: Plan) -> None:
        """Free ``job``'s device blocks: to host memory if there is room, else drop them."""
        was_running = job.state == JobState.RUNNING
        if self.pool.host_room(job.cached_tokens):
            self.pool.swap_out(job.id, job.cached_tokens)
            job.swaps += 1
            kind, state = Preemption.SWAPPED, JobState.SWAPPED
            plan.swapped_out.append(job)
        else:
            self.pool.drop(job.id)
            self.mark_cached(job, 0)
            kind, state = Preemption.RECOMPUTED, JobState.PREEMPTED
            plan.dropped.append(job)
        if was_running:
            self._preempt(job, kind, state, plan)
        else:
            job.state = state

    def _preempt(self, job: Job, kind: Preemption, state: JobState, plan: Plan) -> None:
        """The one place a preemption is counted: an unfinished job left the batch."""
        job.state = state
        job.preemptions[kind] += 1
        self.preemptions[kind] += 1
        plan.preempted.append(job)

    def _swap_in(self, job: Job) -> None:
        self.mark_cached(job, self.pool.swap_in(job.id))
        job.state = JobState.PREEMPTED

    def _prefetch(self, order: list[Job], chosen: set[str]) -> Job | None:
        """Bring the highest-priority swapped job back while there is room, ahead of its turn,
        keeping a block per running job free for their next token."""
        pool = self.pool
        headroom = len(self.running) + 1
        for job in order:
            if job.state != JobState.SWAPPED or job.id in chosen:
                continue
            if pool.available - headroom >= pool.blocks_for(job.total_tokens):
                self._swap_in(job)
                return job
            return None
        return None


def _scores_prompt(job: Job) -> bool:
    """Whether ``job``'s next forward must score its whole prompt (asked, and not done yet)."""
    return job.params.prompt_logprobs is not None and job.prompt_logprobs is None
