"""Speculative decoding in the model loop (SpecInfer): the draft models (SSMs) with their own KV
caches, and one speculative iteration for the decoding jobs.

The SSMs draft a token tree for each job the policy picks (one batched SSM forward per depth),
then one LLM forward verifies every tree at once; a job that does not speculate is a one-node tree
in that forward. The accepted path's keys and values are kept where the next step expects them,
in the LLM's cache and in each SSM's. Trees and verification are pure and live in
:mod:`flockctl.engine.spec`; how deep each job drafts (0: not at all) is decided by
:mod:`flockctl.engine.spec_policy` from the acceptance and the step costs measured here. A
Llama-shaped SSM runs :mod:`flockctl.engine.draft_forward`'s lean forward.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flockctl.engine import fused_forward, fused_spec
from flockctl.engine.config import EngineConfig
from flockctl.engine.draft_forward import lean_forward
from flockctl.engine.job import Job, JobSpec, SamplingParams
from flockctl.engine.kv import KVPool, OutOfBlocks, num_layers
from flockctl.engine.runner import FUSED_MAX_ROWS, Feed, Runner
from flockctl.engine.sampling import Sampler, is_greedy, probabilities
from flockctl.engine.spec import TokenTree, draft_children, verify_greedy, verify_stochastic
from flockctl.engine.spec_policy import SpecPolicy, SpecState
from flockctl.engine.tree import default_tree, tree_nodes


@dataclass
class Drafter:
    """One speculative model (SSM) with its own KV pool; it must share the LLM's tokenizer."""

    name: str
    model: torch.nn.Module
    pool: KVPool
    runner: Runner


@dataclass
class _Draft:
    """One SSM's own tree for one job this iteration, and where its nodes went in the merged one."""

    tree: TokenTree
    merged: list[int]  # local node -> merged node
    fed: set[int]  # local nodes the SSM has run (their keys/values are in its cache)


@dataclass
class Accepted:
    """One job's outcome of a speculative iteration."""

    tokens: list[int]  # the accepted drafts, then the LLM's own token
    cached: int  # the job's tokens whose keys and values the LLM's cache now holds


@dataclass(frozen=True)
class RunRequest:
    """What the model loop allows a lone job's speculative steps: up to ``steps`` of them in a
    pipelined run (:func:`fused_spec.pipelined_run`), ending after a token in ``stops`` (1-D)
    or the step during which ``interrupt[0]`` was set."""

    steps: int
    stops: np.ndarray
    interrupt: np.ndarray


@torch.inference_mode()
def _allocate_cache(runner: Runner) -> None:
    """Create an SSM's cache now with one short forward, as the LLM's is while the engine
    calibrates: on the CPU it is zeroed whole once, every page resident, and left for its first
    forward that took the first speculative request 0.57 s against 0.05 (demo pair); an engine
    without the memory for it fails at start, not under load."""
    job = Job([0] * 8, SamplingParams(max_tokens=1, temperature=0))
    runner.pool.reserve(job.id, job.total_tokens)
    try:
        runner.run([job.id], [Feed.linear(job.tokens(0), 0)])
    finally:
        runner.pool.release(job.id)


class Speculator:
    def __init__(
        self,
        drafts: list[tuple[str, torch.nn.Module]],
        runner: Runner,
        sampler: Sampler,
        config: EngineConfig,
        budget: int,
        max_model_len: int,
        vocab_size: int,
    ):
        self.runner = runner  # the LLM's: one forward verifies every job's tree
        self.pool = runner.pool
        self.sampler = sampler
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        device, dtype = runner.device, self.pool.dtype
        # each SSM keeps every job's cache too, with room for one tree per running job on top
        self.tree = config.spec_tree or default_tree(device.type, adaptive=config.spec == "auto")
        draft_budget = budget + config.max_batch_size * tree_nodes(self.tree)
        self.drafters: list[Drafter] = []
        for name, draft in drafts:
            pool = KVPool(
                num_layers(draft.config), draft_budget, device, dtype, block_size=config.block_size
            )
            if runner.fused is not None and fused_forward.usable(draft, dtype, device):
                # the LLM's small forwards run fused: so do the SSM's (its drafts are one token
                # a job a step), with the lean forward above the fused forward's rows
                drafter = Runner(draft, pool, device, attention="fast", fused=True)
                if drafter.fused is not None:  # compiled now, not in the first request
                    drafter.fused.warm_up_chain()
                    fused_spec.warm_up(runner.fused, drafter.fused)
            else:  # a Llama-shaped SSM runs a leaner forward with the same arithmetic
                drafter = Runner(lean_forward(draft) or draft, pool, device)
            _allocate_cache(drafter)
            self.drafters.append(Drafter(name, draft, pool, drafter))
        self.policy = SpecPolicy(
            config.spec if self.drafters else "off", self.tree, max(1, len(self.drafters))
        )
        fused = runner.fused
        if (
            len(self.drafters) == 1
            and self.drafters[0].runner.fused is not None
            and fused is not None
            and fused.threads > 1
            and config.num_scheduler_steps > 1
            and set(self.tree) == {1}
        ):  # a lone job's chains run pipelined (_chain_run): its drafting costs no step time
            self.policy.overlapped.add(1)
        self.planned: dict[str, int] = {}  # job -> the depth the policy chose this iteration
        self.depth: dict[str, int] = {}  # job -> tree depth this iteration (room permitting)
        self._holding: dict[str, Job] = {}  # jobs that may have a cache in an SSM's pool
        self._deeper = 0.0
        self.steps = 0
        self.runs = 0  # pipelined runs, and the speculative steps they took
        self.run_steps = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.accepted_per_pos = [0] * len(self.tree)

    def job_spec(self) -> JobSpec | None:
        """A new job's speculation counters; None without draft models."""
        if not self.drafters:
            return None
        # a new job waits as long before its first probe as the engine's latest losing round
        return SpecState(draft_cached=[0] * len(self.drafters), backoff=self.policy.backoff)

    def can_speculate(self, job: Job) -> bool:
        """Whether ``job`` may take part in speculative iterations.

        Not when its params need an incremental step (``SamplingParams.speculable``), nor, under
        ``--spec auto``, when it samples with a seed: there, whether a step speculates depends on
        measured timings, and a speculative step draws other random numbers than an incremental
        one, so the seed would not reproduce its text. With ``--spec on`` every step of every job
        speculates, and a seed reproduces the text whatever else runs beside it.
        """
        if not self.drafters or not job.params.speculable:
            return False
        return not (
            self.policy.mode == "auto" and job.params.seed is not None and not is_greedy(job.params)
        )

    def choose(self, jobs: list[Job]) -> list[Job]:
        """The decoding jobs that speculate this iteration (none: a plain decode step), each
        at the depth the policy chose for it."""
        if not self.drafters:
            return []
        self.planned = self.policy.choose(jobs)
        return [job for job in jobs if job.id in self.planned]

    def observe_plain(self, jobs: list[Job], seconds: float) -> None:
        """A decode iteration without speculation took ``seconds``: the policy's baseline."""
        if not self.drafters:
            return
        self.policy.observe_incremental(len(jobs), seconds)
        for job in jobs:
            self.policy.observe_job(job, 0, 0, 0)

    def release(self, job_id: str) -> None:
        """The job is finished: its SSM caches go."""
        for drafter in self.drafters:
            drafter.pool.release(job_id)
        self.depth.pop(job_id, None)
        self.planned.pop(job_id, None)
        self._holding.pop(job_id, None)

    def stats(self) -> dict[str, Any] | None:
        """Speculative decoding's figures; None without draft models."""
        if not self.drafters:
            return None
        steps, drafted, accepted = self.steps, self.draft_tokens, self.accepted_tokens
        return {
            **self.policy.describe(),
            "draft_models": [d.name for d in self.drafters],
            "tree": list(self.tree),
            "num_drafts": steps,
            "num_draft_tokens": drafted,
            "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": list(self.accepted_per_pos),
            "pipelined_runs": {"runs": self.runs, "steps": self.run_steps},
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "mean_accepted_length": round(1 + accepted / steps, 4) if steps else None,
        }

    # -- one speculative iteration --------------------------------------------------------------

    def step(
        self,
        jobs: list[Job],
        chosen: list[Job],
        generators: Mapping[str, torch.Generator | None],
        running: Collection[str],
        run: RunRequest | None = None,
    ) -> list[Accepted]:
        """One speculative iteration for the decoding ``jobs``: the SSMs draft a token tree for
        each job in ``chosen`` (one batched SSM forward per depth), then one LLM forward verifies
        every tree at once; a job that does not speculate is a one-node tree in that forward.
        ``running``: the jobs in this iteration's batch (the SSM caches of others may go).
        ``run``: a lone job's greedy chains may take several steps in a pipelined run
        (:meth:`_chain_run`)."""
        start = time.perf_counter()
        self.depth = {}
        drafting = [j for j in chosen if self._reserve_tree(j, running)]
        self._deeper = 0.0  # seconds of the SSMs' forwards past their first (see _draft)
        # tokens each SSM's first forward feeds a job to catch up (1 or 2 in a run of speculative
        # steps; more after incremental ones, which the SSMs did not see)
        catchup = max(
            (
                j.total_tokens - j.spec.draft_cached[s]
                for j in drafting
                if j.spec is not None
                for s in range(len(self.drafters))
            ),
            default=0,
        )
        if drafting and self._chains(jobs, drafting):
            if run is not None and len(jobs) == 1 and len(drafting) == 1:
                accepted = self._chain_run(jobs[0], run)
                if accepted is not None:
                    return [accepted]
            return self._chain_step(jobs, drafting, start, catchup)
        trees = {
            j.id: TokenTree(j.output_ids[-1] if j.output_ids else j.prompt_ids[-1]) for j in jobs
        }
        drafts = (
            [
                self._draft(drafter, s, drafting, trees, generators)
                for s, drafter in enumerate(self.drafters)
            ]
            if drafting
            else []
        )
        feeds = []
        for job in jobs:
            tree = trees[job.id]
            nodes = list(range(len(tree)))
            feeds.append(
                Feed.token_tree(
                    tree.tokens, tree.depths, nodes, job.total_tokens - 1, tree.ancestry()
                )
            )
        logits = self.runner.run([j.id for j in jobs], feeds)
        plain = [i for i, j in enumerate(jobs) if len(trees[j.id]) == 1]
        sampled = (
            self.sampler.sample(
                torch.cat([logits[i] for i in plain]),
                [jobs[i].params for i in plain],
                [generators[jobs[i].id] for i in plain],
            )
            if plain
            else []
        )
        picks = dict(zip(plain, sampled, strict=True))
        results: list[Accepted] = []
        for i, job in enumerate(jobs):
            tree = trees[job.id]
            if i in picks:
                path, token = [0], picks[i]
            elif is_greedy(job.params):
                path, token = verify_greedy(tree, logits[i].argmax(dim=-1).tolist())
            else:
                probs = probabilities(logits[i], job.params)
                path, token = verify_stochastic(tree, probs, generators[job.id])
            cached = self._keep_path(job, tree, path, drafts)
            results.append(Accepted([*tree.path_tokens(path[1:]), token], cached))
        if drafting:  # else it was incremental after all
            # the SSMs' forwards past their first are what a depth adds; the rest of the step
            # (each SSM's first forward, the trees' Python, verification) is its fixed cost
            self.policy.observe_speculative(
                len(jobs),
                len(self.drafters) * (max(self.depth.values()) - 1),
                self._deeper,
                max(len(tree) for tree in trees.values()),
                time.perf_counter() - start - self._deeper,
                catchup,
            )
        return results

    def _chains(self, jobs: list[Job], drafting: list[Job]) -> bool:
        """Whether this step drafts greedy chains that :meth:`_chain_step` runs: one SSM, a
        tree of width 1 to the deepest job's depth, every job greedy, both models fused, and
        the catch-up and the verification each within one fused forward."""
        if len(self.drafters) != 1 or not all(is_greedy(j.params) for j in jobs):
            return False
        drafter = self.drafters[0].runner
        if not (drafter.chainable() and self.runner.chainable()):
            return False
        deepest = max(self.depth[j.id] for j in drafting)
        catchup = 0
        for job in drafting:
            assert job.spec is not None
            catchup += job.total_tokens - job.spec.draft_cached[0]
        verify = len(jobs) + sum(self.depth[j.id] for j in drafting)
        return (
            all(w == 1 for w in self.tree[:deepest])
            and catchup <= FUSED_MAX_ROWS
            and verify <= FUSED_MAX_ROWS
        )

    def _chain_step(
        self, jobs: list[Job], drafting: list[Job], start: float, catchup: int
    ) -> list[Accepted]:
        """:meth:`step` where every draft is a greedy chain (:meth:`_chains`): the SSM catches
        up and drafts each chain in one compiled call, and the LLM verifies every chain in
        another, each job's chain fed as a run of tokens after its last (a chain's tree mask is
        the causal one; :func:`fused_spec.greedy_chains`). No token trees: the same tokens,
        caches and counts as the tree path, with little Python a step."""
        drafter = self.drafters[0]
        assert drafter.runner.fused is not None
        drafts = {j.id for j in drafting}
        spans: list[tuple[list[int], int] | None] = []
        given: list[list[int] | None] = []
        for job in jobs:
            spec = job.spec
            if job.id not in drafts or spec is None:
                spans.append(None)
                given.append(None)
                continue
            if (
                spec.ahead and spec.ahead_at == job.total_tokens == spec.draft_cached[0]
            ):  # drafted while the last chain was verified, and that chain held
                chain = spec.ahead[: self.depth[job.id]]
                self.depth[job.id] = len(chain)
                given.append(chain)
                spans.append(None)
            else:
                cached = spec.draft_cached[0]
                spans.append((job.tokens(cached), cached))
                given.append(None)
                spec.draft_cached[0] = job.total_tokens
            spec.ahead = []
        ahead = self._ahead(jobs, drafting)
        out = fused_spec.greedy_chains(
            self.runner,
            drafter.runner,
            [j.id for j in jobs],
            spans,
            [self.depth[j.id] if j.id in drafts else 0 for j in jobs],
            [j.output_ids[-1] if j.output_ids else j.prompt_ids[-1] for j in jobs],
            [j.total_tokens - 1 for j in jobs],
            min(self.vocab_size, drafter.runner.fused.vocab),
            given,
            ahead,
        )
        chains = {j.id: chain for j, chain in zip(jobs, out.chains, strict=True) if chain}
        picks = out.picks
        results: list[Accepted] = []
        for job, target in zip(jobs, picks, strict=True):
            chain = chains.get(job.id, [])
            accepted = 0
            while accepted < len(chain) and chain[accepted] == target[accepted]:
                accepted += 1
            # the LLM's cache keeps the root and the accepted drafts, where the verification
            # wrote them; the SSM's, the accepted drafts it ran (all but a chain's last)
            kept = job.total_tokens + accepted + 1
            self.pool.truncate(job.id, kept)
            spec = job.spec
            if chain and spec is not None:
                if ahead and accepted == len(chain) and target[accepted] == out.ahead[0]:
                    # the model's next token is the draft's first pick after the chain: the
                    # rest of what it drafted meanwhile is the next step's chain. The draft's
                    # cache holds the text up to here, and past it that chain's tokens but its
                    # last (to be verified: not counted as cached)
                    spec.ahead, spec.ahead_at = out.ahead[1:], kept
                    spec.draft_cached[0] = kept
                    drafter.pool.truncate(job.id, kept + len(spec.ahead) - 1)
                else:
                    spec.draft_cached[0] = job.total_tokens + min(accepted, len(chain) - 1)
                    drafter.pool.truncate(job.id, kept)
            self._count(job, len(chain), accepted)
            results.append(Accepted([*chain[:accepted], target[accepted]], kept - 1))
        deepest = max(len(chain) for chain in chains.values())
        # the draft's forwards past its first are what a depth adds: in one compiled call with
        # the first, each counted as a like share of the drafting (a token a job each). Chains
        # drafted during the last verification cost none here: no draft timing from them
        drafted = any(span is not None for span in spans)
        deeper = out.draft_seconds * (deepest - 1) / deepest if drafted else 0.0
        self.policy.observe_speculative(
            len(jobs), deepest - 1 if drafted else 0, deeper, deepest + 1,
            time.perf_counter() - start - deeper, catchup,
        )  # fmt: skip
        return results

    def _chain_run(self, job: Job, run: RunRequest) -> Accepted | None:
        """Up to ``run.steps`` greedy speculative steps of a lone job at its chosen depth in
        one pipelined run (:func:`fused_spec.pipelined_run`): the model verifies each chain on
        the model loop's thread while the draft drafts the next on the fused forward's second
        thread, with no Python between the steps; None (nothing fed) without two threads, or
        where fewer than two steps fit the job's ``max_tokens``, the context or the pools.

        A single step with the draft ahead made 1.07x plain decoding's tokens a second served
        at batch 1 on the demo pair, whose runs of plain steps have no Python between them
        either; its own Python (the scheduler, the batch, the streams) was a quarter of it."""
        drafter = self.drafters[0]
        fused = self.runner.fused
        if fused is None or fused.threads < 2 or drafter.runner.fused is None:
            return None
        depth = self.depth[job.id]
        context = self.max_model_len - job.total_tokens
        room = min(job.params.max_tokens - len(job.output_ids), context)
        root = job.total_tokens - 1
        # a step makes at least one token and feeds the model depth + 1 positions from its
        # root, which stays under root + room: the last step's may pass room by depth, and the
        # draft's next chain by depth + 1 more. Where that would pass the context, every step
        # (each made of up to depth + 1 tokens) stays under it
        steps = min(run.steps, room)
        fed = min(steps * (depth + 1), room + depth)
        if room + 2 * depth + 1 > context:
            steps = min(run.steps, (room - 1) // (depth + 1))
            fed = steps * (depth + 1)
        if steps < 2:
            return None
        try:
            self.pool.reserve(job.id, root + fed)
            drafter.pool.reserve(job.id, root + fed + depth + 1)
        except OutOfBlocks:
            return None
        spec = job.spec
        assert spec is not None
        given = None
        if (
            len(spec.ahead) >= depth and spec.ahead_at == job.total_tokens == spec.draft_cached[0]
        ):  # drafted by the last run (or step) from the model's token now last: no catch-up
            given, catchup = spec.ahead[:depth], None
        else:
            cached = min(spec.draft_cached[0], root)
            catchup = (job.tokens(cached, root), cached) if cached < root else None
        spec.ahead = []
        assert drafter.runner.fused is not None
        out = fused_spec.pipelined_run(
            self.runner,
            drafter.runner,
            job.id,
            catchup,
            depth,
            job.output_ids[-1] if job.output_ids else job.prompt_ids[-1],
            root,
            steps,
            room,
            run.stops,
            run.interrupt,
            min(self.vocab_size, drafter.runner.fused.vocab),
            given,
        )
        # the model's cache holds each step's root and accepted drafts; so does the draft's,
        # which fed every chain from a state the model confirmed
        kept = job.total_tokens + len(out.tokens)
        self.pool.truncate(job.id, kept)
        if out.tokens and out.carry_at == (kept - 1, out.tokens[-1]):
            # the draft's last guess was the model's last token: what it drafted from there
            # is the next step's chain, the guess fed and the chain's tokens but its last
            spec.ahead, spec.ahead_at = out.carry, kept
            spec.draft_cached[0] = kept
            drafter.pool.truncate(job.id, kept + len(out.carry) - 1)
        else:
            spec.draft_cached[0] = kept - 1
            drafter.pool.truncate(job.id, kept)
        for accepted in out.accepted:
            self._count(job, depth, accepted)
        # a step's cost as the policy compares it: the run's seconds a step (the drafting, on
        # the other thread, costs none of them but where the guess failed)
        per_step = out.seconds / max(1, len(out.accepted))
        for _ in out.accepted:
            self.policy.observe_speculative(1, 0, 0.0, depth + 1, per_step)
        self.runs += 1
        self.run_steps += len(out.accepted)
        return Accepted(out.tokens, kept - 1)

    def _ahead(self, jobs: list[Job], drafting: list[Job]) -> int:
        """Forwards the draft runs on past a lone job's chain while the model verifies it, on the
        fused forward's second thread (0: none): the chain's depth and one, room permitting.
        With more jobs that thread verifies half of them. Only at a fixed depth (``--spec on``):
        under ``auto`` the policy's costs do not tell such steps apart, and served with it
        auto made 3-5% fewer tokens a second (demo and weaker pair, four runs each)."""
        fused = self.runner.fused
        if self.policy.mode != "on" or len(jobs) != 1 or len(drafting) != 1:
            return 0
        if fused is None or fused.threads < 2:
            return 0
        job = jobs[0]
        depth = self.depth[job.id]
        # the draft's keys and values up to position total + 2 * depth - 1
        need = job.total_tokens + 2 * depth
        if need > self.max_model_len:
            return 0
        try:
            self.drafters[0].pool.reserve(job.id, need)
        except OutOfBlocks:
            return 0
        return depth + 1

    def _count(self, job: Job, drafted: int, accepted: int) -> None:
        """A job's step for the figures and the policy: ``drafted`` tokens (0: it decoded
        incrementally), ``accepted`` of them accepted."""
        if job.spec is None:
            return
        self.policy.observe_job(job, self.depth.get(job.id, 0) if drafted else 0, drafted, accepted)
        if drafted:
            self.steps += 1
            self.draft_tokens += drafted
            self.accepted_tokens += accepted
            for i in range(accepted):
                self.accepted_per_pos[i] += 1

    def _reserve_tree(self, job: Job, running: Collection[str]) -> bool:
        """Room for this job's tree in the LLM's cache and every SSM's; False: not this time."""
        remaining = min(
            job.params.max_tokens - len(job.output_ids), self.max_model_len - job.total_tokens
        )
        depth = min(self.planned.get(job.id, len(self.tree)), remaining - 1)
        if depth < 1:
            return False
        local = tree_nodes(self.tree[:depth])
        root = job.total_tokens - 1
        try:
            self.pool.reserve(job.id, root + 1 + len(self.drafters) * (local - 1))
        except OutOfBlocks:
            return False
        self._holding[job.id] = job
        for s, drafter in enumerate(self.drafters):
            try:
                drafter.pool.reserve(job.id, root + local)
            except OutOfBlocks:
                # SSM caches are cheap to rebuild: drop those of jobs not running now
                for other in list(drafter.pool.tables):
                    if other not in running:
                        drafter.pool.release(other)
                        held = self._holding.get(other)
                        if held is not None and held.spec is not None:
                            held.spec.draft_cached[s] = 0
                try:
                    drafter.pool.reserve(job.id, root + local)
                except OutOfBlocks:
                    return False
        self.depth[job.id] = depth
        return True

    def _draft(
        self,
        drafter: Drafter,
        s: int,
        jobs: list[Job],
        trees: dict[str, TokenTree],
        generators: Mapping[str, torch.Generator | None],
    ) -> dict[str, _Draft]:
        """SSM ``s`` grows its tree for each job and merges it into ``trees``: one forward to
        catch its cache up to the root, then one per depth for the new frontier."""
        widths = self.tree
        ids = [j.id for j in jobs]
        feeds = []
        for job in jobs:
            assert job.spec is not None
            cached = job.spec.draft_cached[s]
            feeds.append(Feed.linear(job.tokens(cached), cached))
        rows = dict(zip(ids, drafter.runner.run(ids, feeds), strict=True))
        out: dict[str, _Draft] = {}
        frontier: dict[str, list[int]] = {}
        for job in jobs:
            assert job.spec is not None
            job.spec.draft_cached[s] = job.total_tokens
            out[job.id] = _Draft(TokenTree(trees[job.id].tokens[0]), [0], {0})
            frontier[job.id] = [0]
        deepest = max(self.depth[j.id] for j in jobs)
        if (
            all(w == 1 for w in widths[:deepest])
            and all(is_greedy(j.params) for j in jobs)
            and drafter.runner.chainable()
        ):
            self._draft_chain(drafter, s, jobs, trees, rows, out)
            return out
        for depth in range(1, len(widths) + 1):
            grown: list[Job] = []
            for job in jobs:
                if self.depth[job.id] < depth or not frontier[job.id]:
                    continue
                mine, merged = out[job.id], trees[job.id]
                logits = _fit_vocab(rows[job.id], self.vocab_size)
                children = draft_children(logits, widths[depth - 1], job.params, generators[job.id])
                nodes = []
                for node, (tokens, q) in zip(frontier[job.id], children, strict=True):
                    nodes += _add_children(mine, merged, s, node, tokens, q)
                frontier[job.id] = nodes
                if self.depth[job.id] > depth:
                    grown.append(job)
            if not grown:
                break
            feeds = []
            for job in grown:
                mine = out[job.id]
                nodes = frontier[job.id]
                tree = mine.tree
                feeds.append(
                    Feed.token_tree(
                        [tree.tokens[n] for n in nodes],
                        [depth] * len(nodes),
                        nodes,
                        job.total_tokens - 1,
                        tree.ancestry(),
                    )
                )
                mine.fed.update(nodes)
            grown_ids = [j.id for j in grown]
            forward = time.perf_counter()
            rows.update(zip(grown_ids, drafter.runner.run(grown_ids, feeds), strict=True))
            self._deeper += time.perf_counter() - forward
        return out

    def _draft_chain(
        self,
        drafter: Drafter,
        s: int,
        jobs: list[Job],
        trees: dict[str, TokenTree],
        rows: dict[str, torch.Tensor],
        out: dict[str, _Draft],
    ) -> None:
        """:meth:`_draft` for greedy jobs drafting a chain (one token a depth): the drafts
        after the first come from one compiled call (:meth:`Runner.draft_chain`), not a
        forward and its Python a depth. The trees are the same as :meth:`_draft` grows."""
        vocab = min(self.vocab_size, int(rows[jobs[0].id].shape[-1]))
        first = [int(rows[j.id][-1, :vocab].argmax()) for j in jobs]
        forward = time.perf_counter()
        more = drafter.runner.draft_chain(
            [j.id for j in jobs],
            [j.total_tokens - 1 for j in jobs],
            first,
            [self.depth[j.id] - 1 for j in jobs],
            vocab,
        )
        self._deeper += time.perf_counter() - forward
        for job, token, rest in zip(jobs, first, more, strict=True):
            mine, merged = out[job.id], trees[job.id]
            node = 0
            for depth, drafted in enumerate([token, *rest], start=1):
                (node,) = _add_children(mine, merged, s, node, [drafted], None)
                if depth < self.depth[job.id]:  # its keys and values are in the SSM's cache
                    mine.fed.add(node)

    def _keep_path(
        self, job: Job, tree: TokenTree, path: list[int], drafts: list[dict[str, _Draft]]
    ) -> int:
        """Keep the accepted path's keys and values (LLM and SSMs) where the next step expects
        them, drop the rest, and count the step. Returns how many of the job's tokens the LLM's
        cache holds now; the caller records it (the batcher owns that count)."""
        root = job.total_tokens - 1
        self.pool.move(job.id, [(root + node, root + i) for i, node in enumerate(path)])
        self.pool.truncate(job.id, job.total_tokens + len(path))
        speculated = len(tree) > 1
        for s, by_job in enumerate(drafts):
            mine = by_job.get(job.id)
            if mine is None:
                continue
            local = {m: n for n, m in enumerate(mine.merged)}
            moves = []
            for i, node in enumerate(path[1:], start=1):
                n = local.get(node)
                if n is None or n not in mine.fed:
                    break
                moves.append((root + n, root + i))
            pool = self.drafters[s].pool
            pool.move(job.id, moves)
            assert job.spec is not None
            job.spec.draft_cached[s] = root + 1 + len(moves)
            pool.truncate(job.id, job.total_tokens + len(path))
        self._count(job, len(tree) - 1 if speculated else 0, len(path) - 1)
        return root + len(path)


def _add_children(
    mine: _Draft, merged: TokenTree, s: int, node: int, tokens: list[int], q: torch.Tensor | None
) -> list[int]:
    """SSM ``s`` drafted ``tokens`` (from ``q``; None: greedy) under its node ``node``: they join
    its own tree and the merged one; returns their nodes in its own tree."""
    parent = mine.merged[node]
    merged.drafts[parent][s] = (tokens, q)
    nodes = []
    for token in tokens:
        nodes.append(mine.tree.add(node, token))
        mine.merged.append(merged.add(parent, token))
    return nodes


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """SSM logits over the LLM's vocabulary: rows past it cut, missing ones never drafted."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
