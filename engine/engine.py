"""The engine: a model-loop thread that runs iterations, and the handles the API awaits.

Each iteration the scheduler orders the live jobs; the loop walks that order and takes jobs into
the batch while the batch has room and their KV fits the device budget (evicting lower-priority
caches to host memory, or dropping them for recompute, when it is short); every job that ran last
iteration and was not taken is preempted. Then one forward for jobs that need a prefill and one
for jobs that decode, one sampled token per job, text pieces out to the event loop.

The asyncio side never touches the model: ``submit`` and ``cancel`` post to an inbox under a
condition variable; results come back with one ``call_soon_threadsafe`` per iteration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from flockctl import __version__
from flockctl.engine.device import DeviceMemory, pick_device, pick_dtype
from flockctl.engine.job import (
    FinishReason,
    InvalidRequest,
    Job,
    JobSpec,
    JobState,
    Preemption,
)
from flockctl.engine.kv import KVPool, OutOfBlocks
from flockctl.engine.metrics import EngineMetrics
from flockctl.engine.profiler import Profile, calibrate
from flockctl.engine.runner import Feed, Runner
from flockctl.engine.sampling import Sampler, is_greedy, make_generator, probabilities
from flockctl.engine.scheduler import MLFQ, Scheduler, make_scheduler
from flockctl.engine.spec import (
    SpecPolicy,
    TokenTree,
    draft_children,
    verify_greedy,
    verify_stochastic,
)
from flockctl.engine.text import TextStream
from flockctl.engine.tree import default_tree, tree_nodes

log = logging.getLogger("flockctl.engine")

RECENT_JOBS = 512


class QueueFull(Exception):
    """Too many jobs waiting; the API answers 429."""


class EngineUnavailable(RuntimeError):
    """The model loop is not running (crashed or shutting down); the API answers 503."""


class EngineLoadError(RuntimeError):
    """The model could not be loaded; the message says which and why."""


@dataclass
class EngineConfig:
    model: str = "demo"
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    scheduler: str = "mlfq"
    max_batch_size: int = 8
    kv_budget: int | None = None
    max_model_len: int | None = None
    max_waiting: int = 256
    seed: int = 0
    block_size: int = 16
    mlfq_levels: int = 6
    starvation_limit: float = 5.0
    threads: int | None = None  # torch CPU threads; None: torch's default
    host_kv_budget: int | None = None  # tokens of swap space in host memory; default: kv budget
    draft_models: tuple[str, ...] = ()  # speculative models (SSMs); 'demo': the demo's draft
    spec_tree: tuple[int, ...] | None = None  # children per node at each depth; None: device's
    spec: str = "auto"  # auto | on | off

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        for name in ("max_batch_size", "max_waiting", "block_size", "mlfq_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_budget is not None and self.kv_budget < self.block_size:
            raise ValueError(f"kv_budget must be at least {self.block_size} tokens")
        if self.spec not in ("auto", "on", "off"):
            raise ValueError(f"spec must be auto, on or off, got {self.spec!r}")
        if self.spec == "on" and not self.draft_models:
            raise ValueError("--spec on needs at least one --draft-model")
        if self.spec_tree is not None and (
            not self.spec_tree or any(w < 1 for w in self.spec_tree)
        ):
            raise ValueError(f"spec_tree widths must be at least 1, got {self.spec_tree}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None


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


class JobHandle:
    """What a request holds while its job runs: an async stream of deltas and a cancel."""

    def __init__(self, engine: Engine, job: Job, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.job = job
        self.loop = loop
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.done = False
        # loop-thread side
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self.queue.get()
            if delta.finish_reason is not None:
                self.done = True
            yield delta
            if self.done:
                return

    def cancel(self) -> None:
        """Abort the job (its client went away) and free its cache; safe to call twice."""
        if not self.done:
            self.done = True
            self.engine._post(("abort", self.job.id))


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        model_name: str,
        max_model_len: int,
        drafts: list[tuple[str, torch.nn.Module]] | None = None,
    ):
        self.model = model
        self._draft_models = drafts or []
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.memory = DeviceMemory(device)
        self.started = time.time()

        budget = config.kv_budget or self._default_budget()
        self.pool = KVPool(
            _num_layers(model.config),
            budget,
            device,
            dtype,
            block_size=config.block_size,
            host_budget_tokens=config.host_kv_budget,
        )
        # a job can never be longer than the whole device budget
        self.max_model_len = min(max_model_len, self.pool.budget_tokens)
        self.runner = Runner(model, self.pool, device)
        # each SSM keeps every job's cache too, with room for one tree per running job on top
        self.spec_tree = config.spec_tree or default_tree(device.type)
        draft_budget = budget + config.max_batch_size * tree_nodes(self.spec_tree)
        self.drafters: list[Drafter] = []
        for name, draft in self._draft_models:
            layers = _num_layers(draft.config)
            pool = KVPool(layers, draft_budget, device, dtype, block_size=config.block_size)
            self.drafters.append(Drafter(name, draft, pool, Runner(draft, pool, device)))
        self.spec_policy = SpecPolicy(config.spec if self.drafters else "off")
        self.spec_depth: dict[str, int] = {}  # job -> tree depth this iteration
        self.spec_steps = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.spec_accepted_per_pos = [0] * len(self.spec_tree)
        self.sampler = Sampler()
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

        self.profile: Profile = calibrate(
            self.runner, min(self.pool.budget_tokens, max_model_len * 2), config.max_batch_size
        )
        self.scheduler: Scheduler = make_scheduler(
            config.scheduler,
            base_quantum=self.profile.decode_seconds,
            predict_prefill=self._predict_prefill,
            levels=config.mlfq_levels,
            starvation_limit=config.starvation_limit,
        )
        self.metrics = EngineMetrics(self.stats)

        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._stopping = False
        self._live: dict[str, JobHandle] = {}
        self._recent: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: list[Job] = []
        self.preemptions = dict.fromkeys(Preemption, 0)
        self.iterations = 0
        self.tokens_generated = 0
        self.decode_ewma: float | None = None
        self.failed: str | None = None  # set when the loop died; /health reports it
        self._thread = threading.Thread(target=self._loop, name="flockctl-engine", daemon=True)
        self._thread.start()

    # -- sizing --------------------------------------------------------------------------------

    def _default_budget(self) -> int:
        """KV tokens: 80% of free CUDA memory; on CPU/MPS a quarter of what is free, at most
        2 GiB; never more than every admissible job at full length could use."""
        per_token = _kv_bytes_per_token(self.model.config, self.dtype) + sum(
            _kv_bytes_per_token(m.config, self.dtype) for _, m in self._draft_models
        )
        free = self.memory.free_bytes()
        usable = free * 0.8 if self.device.type == "cuda" else min(free * 0.25, 2 * 2**30)
        ceiling = (self.config.max_batch_size + self.config.max_waiting) * self.max_model_len
        return max(self.config.block_size, min(int(usable // per_token), ceiling))

    # -- API side (event loop thread) ---------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: Any) -> JobHandle:
        if self.failed or self._stopping:
            raise EngineUnavailable(self.failed or "the engine is shutting down")
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", "prompt"
            )
        if n >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens",
                "prompt",
            )
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"this model's context is {self.max_model_len} tokens, but {n + params.max_tokens}"
                f" were requested ({n} in the prompt, {params.max_tokens} in max_tokens)",
                "max_tokens",
            )
        if n + params.max_tokens > self.pool.budget_tokens:
            raise InvalidRequest(
                f"{n + params.max_tokens} tokens requested ({n} prompt + {params.max_tokens}"
                f" max_tokens) exceed this engine's KV budget of {self.pool.budget_tokens}",
                "max_tokens",
            )
        waiting = len(self._live) - len(self._running)
        if waiting >= self.config.max_waiting:
            raise QueueFull(
                f"{waiting} jobs are already waiting (--max-waiting {self.config.max_waiting});"
                " retry later"
            )
        job = Job(list(prompt_ids), params)
        if self.drafters:
            job.spec = JobSpec(draft_cached=[0] * len(self.drafters))
        handle = JobHandle(self, job, asyncio.get_running_loop())
        handle.stream = TextStream(self.tokenizer, prompt_ids, params.stop)
        handle.generator = make_generator(params.seed, self.device)
        self._live[job.id] = handle
        self._post(("submit", handle))
        return handle

    def _post(self, item: tuple[str, Any]) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    def job_info(self, job_id: str) -> dict[str, Any] | None:
        handle = self._live.get(job_id)
        job = handle.job if handle else self._recent.get(job_id)
        return job.detail() if job else None

    def stats(self, detailed: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        jobs = [h.job for h in list(self._live.values())]
        states = collections.Counter(j.state for j in jobs)
        out: dict[str, Any] = {
            "engine": "flockctl",
            "version": __version__,
            "model": self.model_name,
            "scheduler": self.scheduler.name,
            "device": self.memory.read(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch_size": self.config.max_batch_size,
            "max_model_len": self.max_model_len,
            "queue_lengths": self.scheduler.queue_lengths(),
            "running": states[JobState.RUNNING],
            "waiting": states[JobState.WAITING] + states[JobState.PREEMPTED],
            "swapped": states[JobState.SWAPPED],
            "preemptions_total": {k.value: v for k, v in self.preemptions.items()},
            "kv": {
                "budget_tokens": self.pool.budget_tokens,
                "used_tokens": self.pool.used_tokens,
                "host_tokens": self.pool.host_tokens,
                "host_budget_tokens": self.pool.host_budget_tokens,
                "block_size": self.pool.block_size,
                "swap_outs": self.pool.swap_outs,
                "swap_ins": self.pool.swap_ins,
                "recomputes": self.pool.drops,
            },
            "speculation": self.spec_stats(),
            "iterations": self.iterations,
            "tokens_generated": self.tokens_generated,
            "uptime": round(time.time() - self.started, 3),
            "jobs": [j.summary(now) for j in jobs],
        }
        if detailed:
            out["jobs"] = [j.detail(now) for j in jobs]
            out["scheduler_detail"] = self.scheduler.describe()
            out["profile"] = self.profile.to_dict()
            out["decode_ms_recent"] = (
                round(self.decode_ewma * 1000, 3) if self.decode_ewma is not None else None
            )
            out["recent_jobs"] = [j.detail(now) for j in list(self._recent.values())[-20:]]
            out["process_rss"] = psutil.Process().memory_info().rss
        return out

    def spec_stats(self) -> dict[str, Any] | None:
        """Speculative decoding's figures; None without draft models."""
        if not self.drafters:
            return None
        steps, drafted, accepted = (
            self.spec_steps,
            self.spec_draft_tokens,
            self.spec_accepted_tokens,
        )
        return {
            **self.spec_policy.describe(),
            "draft_models": [d.name for d in self.drafters],
            "tree": list(self.spec_tree),
            "num_drafts": steps,
            "num_draft_tokens": drafted,
            "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": list(self.spec_accepted_per_pos),
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "mean_accepted_length": round(1 + accepted / steps, 4) if steps else None,
        }

    @property
    def closing(self) -> bool:
        return self._stopping

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- the model loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self.scheduler.jobs and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                for kind, item in inbox:
                    if kind == "submit":
                        self.scheduler.add(item.job, time.monotonic())
                    else:
                        self._abort(item)
                if self.scheduler.jobs:
                    self._iteration()
        except Exception as exc:  # a bug in the loop must not leave requests hanging forever
            log.exception("the engine loop crashed")
            self.failed = f"the engine loop crashed: {type(exc).__name__}: {exc}"
            raise
        finally:
            for job_id in list(self._live):
                self._abort(job_id, error=self.failed or "the engine is shutting down")

    def _abort(self, job_id: str, error: str | None = None) -> None:
        handle = self._live.get(job_id)
        if handle is None or handle.job.state == JobState.FINISHED:
            return
        deliveries: list[tuple[JobHandle, Delta]] = []
        self._finish(handle, FinishReason.ABORT, time.monotonic(), deliveries, error)
        self._deliver(deliveries)

    def _iteration(self) -> None:
        now = time.monotonic()
        order = self.scheduler.order(now)
        batch: list[Job] = []
        chosen: set[str] = set()
        for job in order:
            if len(batch) >= self.config.max_batch_size:
                break
            if not self._make_resident(job, order, chosen):
                break
            batch.append(job)
            chosen.add(job.id)
        for job in self._running:
            if job.id not in chosen and job.state == JobState.RUNNING:
                self._preempt(job, Preemption.DESCHEDULED, JobState.PREEMPTED)
        for job in batch:
            job.state = JobState.RUNNING
            if job.first_scheduled is None:
                job.first_scheduled = now
        self._running = batch
        if not batch:
            return

        prefill = [j for j in batch if j.needs_prefill]
        decode = [j for j in batch if not j.needs_prefill]
        deliveries: list[tuple[JobHandle, Delta]] = []
        if prefill:
            self._step(prefill, deliveries)
        if decode:
            speculating = self.spec_policy.choose(decode) if self.drafters else []
            if speculating:
                self._speculate(decode, speculating, deliveries)
            else:
                elapsed = self._step(decode, deliveries)
                if elapsed is not None:
                    self._observe_decode(elapsed)
                    if self.drafters:
                        self.spec_policy.observe_iteration(False, len(decode), elapsed)
                        for job in decode:
                            self.spec_policy.observe_job(job, 0, 0, speculated=False)
        self.iterations += 1
        self._deliver(deliveries)
        self._running = [j for j in batch if j.state == JobState.RUNNING]
        self._prefetch(order, chosen)

    def _step(self, jobs: list[Job], deliveries: list[tuple[JobHandle, Delta]]) -> float | None:
        """One forward and one sampled token per job; returns its seconds (None: it failed)."""
        start = time.perf_counter()
        try:
            logits = self.runner.forward(jobs)
            handles = [self._live[j.id] for j in jobs]
            tokens = self.sampler.sample(
                logits, [j.params for j in jobs], [h.generator for h in handles]
            )
        except Exception as exc:  # e.g. out of device memory: fail these jobs, keep serving
            self._fail(jobs, exc, deliveries)
            return None
        elapsed = time.perf_counter() - start
        now = time.monotonic()
        for job, handle, token in zip(jobs, handles, tokens, strict=True):
            self.scheduler.charge(job, elapsed, now)
            self._emit(job, handle, [token], now, deliveries)
        return elapsed

    def _fail(
        self, jobs: list[Job], exc: Exception, deliveries: list[tuple[JobHandle, Delta]]
    ) -> None:
        log.exception("forward failed for %d jobs", len(jobs))
        now = time.monotonic()
        for job in jobs:
            handle = self._live.get(job.id)
            if handle is not None:
                self._finish(handle, FinishReason.ABORT, now, deliveries, f"engine error: {exc}")

    def _emit(
        self,
        job: Job,
        handle: JobHandle,
        tokens: list[int],
        now: float,
        deliveries: list[tuple[JobHandle, Delta]],
    ) -> None:
        """Append ``tokens`` to the job's output in order, up to the first that finishes it."""
        job.iterations += 1
        if job.first_token is None:
            job.first_token = now
        stream = handle.stream
        assert stream is not None
        text = ""
        emitted: list[int] = []
        reason: FinishReason | None = None
        for token in tokens:
            job.output_ids.append(token)
            emitted.append(token)
            self.tokens_generated += 1
            eos = token in self.eos_ids and not job.params.ignore_eos
            if not eos:
                text += stream.push([token])
            if eos or stream.stopped:
                reason = FinishReason.STOP
            elif (
                len(job.output_ids) >= job.params.max_tokens
                or job.total_tokens >= self.max_model_len
            ):
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        if reason is None:
            deliveries.append((handle, Delta(text, emitted)))
        else:
            self._finish(handle, reason, now, deliveries, text=text, tokens=emitted)

    # -- speculative decoding -------------------------------------------------------------------

    def _speculate(
        self, jobs: list[Job], chosen: list[Job], deliveries: list[tuple[JobHandle, Delta]]
    ) -> None:
        """One speculative iteration for the decoding ``jobs``: the SSMs draft a token tree for
        each job in ``chosen`` (one batched SSM forward per depth), then one LLM forward verifies
        every tree at once; a job that does not speculate is a one-node tree in that forward."""
        start = time.perf_counter()
        handles = {j.id: self._live[j.id] for j in jobs}
        trees = {
            j.id: TokenTree(j.output_ids[-1] if j.output_ids else j.prompt_ids[-1]) for j in jobs
        }
        try:
            drafting = [j for j in chosen if self._reserve_tree(j)]
            drafts = (
                [
                    self._draft(drafter, s, drafting, trees, handles)
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
                    [handles[jobs[i].id].generator for i in plain],
                )
                if plain
                else []
            )
            picks = dict(zip(plain, sampled, strict=True))
            results: list[list[int]] = []
            for i, job in enumerate(jobs):
                tree = trees[job.id]
                if i in picks:
                    path, token = [0], picks[i]
                elif is_greedy(job.params):
                    path, token = verify_greedy(tree, logits[i].argmax(dim=-1).tolist())
                else:
                    probs = probabilities(logits[i], job.params)
                    path, token = verify_stochastic(tree, probs, handles[job.id].generator)
                self._keep_path(job, tree, path, drafts)
                results.append([*tree.path_tokens(path[1:]), token])
        except Exception as exc:
            self._fail(jobs, exc, deliveries)
            return
        elapsed = time.perf_counter() - start
        if any(len(tree) > 1 for tree in trees.values()):  # else it was incremental after all
            self.spec_policy.observe_iteration(True, len(jobs), elapsed)
        now = time.monotonic()
        unit = self.decode_ewma or self.profile.decode_seconds
        for job, new in zip(jobs, results, strict=True):
            # MLFQ quanta count verified tokens: each is charged as one decode iteration
            self.scheduler.charge(job, unit * len(new), now)
            self._emit(job, handles[job.id], new, now, deliveries)

    def _reserve_tree(self, job: Job) -> bool:
        """Room for this job's tree in the LLM's cache and every SSM's; False: not this time."""
        remaining = min(
            job.params.max_tokens - len(job.output_ids), self.max_model_len - job.total_tokens
        )
        depth = min(len(self.spec_tree), remaining - 1)
        if depth < 1:
            return False
        local = tree_nodes(self.spec_tree[:depth])
        root = job.total_tokens - 1
        try:
            self.pool.reserve(job.id, root + 1 + len(self.drafters) * (local - 1))
        except OutOfBlocks:
            return False
        for s, drafter in enumerate(self.drafters):
            try:
                drafter.pool.reserve(job.id, root + local)
            except OutOfBlocks:
                # SSM caches are cheap to rebuild: drop those of jobs not running now
                running = {j.id for j in self._running}
                for other in list(drafter.pool.tables):
                    if other not in running:
                        drafter.pool.release(other)
                        handle = self._live.get(other)
                        if handle is not None and handle.job.spec is not None:
                            handle.job.spec.draft_cached[s] = 0
                try:
                    drafter.pool.reserve(job.id, root + local)
                except OutOfBlocks:
                    return False
        self.spec_depth[job.id] = depth
        return True

    def _draft(
        self,
        drafter: Drafter,
        s: int,
        jobs: list[Job],
        trees: dict[str, TokenTree],
        handles: dict[str, JobHandle],
    ) -> dict[str, _Draft]:
        """SSM ``s`` grows its tree for each job and merges it into ``trees``: one forward to
        catch its cache up to the root, then one per depth for the new frontier."""
        widths = self.spec_tree
        ids = [j.id for j in jobs]
        feeds = []
        for job in jobs:
            assert job.spec is not None
            cached = job.spec.draft_cached[s]
            feeds.append(Feed.linear((job.prompt_ids + job.output_ids)[cached:], cached))
        rows = dict(zip(ids, drafter.runner.run(ids, feeds), strict=True))
        out: dict[str, _Draft] = {}
        frontier: dict[str, list[int]] = {}
        for job in jobs:
            assert job.spec is not None
            job.spec.draft_cached[s] = job.total_tokens
            out[job.id] = _Draft(TokenTree(trees[job.id].tokens[0]), [0], {0})
            frontier[job.id] = [0]
        for depth in range(1, len(widths) + 1):
            grown: list[Job] = []
            for job in jobs:
                if self.spec_depth[job.id] < depth or not frontier[job.id]:
                    continue
                mine, merged = out[job.id], trees[job.id]
                logits = _fit_vocab(rows[job.id], self.vocab_size)
                children = draft_children(
                    logits, widths[depth - 1], job.params, handles[job.id].generator
                )
                nodes = []
                for node, (tokens, q) in zip(frontier[job.id], children, strict=True):
                    parent = mine.merged[node]
                    merged.drafts[parent][s] = (tokens, q)
                    for token in tokens:
                        nodes.append(mine.tree.add(node, token))
                        mine.merged.append(merged.add(parent, token))
                frontier[job.id] = nodes
                if self.spec_depth[job.id] > depth:
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
            rows.update(zip(grown_ids, drafter.runner.run(grown_ids, feeds), strict=True))
        return out

    def _keep_path(
        self, job: Job, tree: TokenTree, path: list[int], drafts: list[dict[str, _Draft]]
    ) -> None:
        """Keep the accepted path's keys and values (LLM and SSMs) where the next step expects
        them, drop the rest, and count the step."""
        root = job.total_tokens - 1
        self.pool.move(job.id, [(root + node, root + i) for i, node in enumerate(path)])
        job.cached_tokens = root + len(path)
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
        if job.spec is not None:
            accepted = len(path) - 1
            self.spec_policy.observe_job(job, len(tree) - 1, accepted, speculated)
            if speculated:
                self.spec_steps += 1
                self.spec_draft_tokens += len(tree) - 1
                self.spec_accepted_tokens += accepted
                for i in range(accepted):
                    self.spec_accepted_per_pos[i] += 1

    def _predict_prefill(self, tokens: int) -> float:
        """The start-up prefill model, rescaled by how decode iterations run now compared with
        start-up, so skip-join compares a prediction and quanta measured in the same conditions."""
        predicted = self.profile.predict_prefill(tokens)
        if self.decode_ewma is None or self.profile.decode_seconds <= 0:
            return predicted
        return predicted * self.decode_ewma / self.profile.decode_seconds

    def _observe_decode(self, seconds: float) -> None:
        """Keep the MLFQ base quantum at about one decode iteration as it runs now.

        The start-up profile is one short measurement, and a busy host can make it wrong by an
        order of magnitude; a moving average of real iterations follows the machine.
        """
        self.decode_ewma = (
            seconds if self.decode_ewma is None else (0.9 * self.decode_ewma + 0.1 * seconds)
        )
        if isinstance(self.scheduler, MLFQ):
            self.scheduler.base_quantum = self.decode_ewma

    def _finish(
        self,
        handle: JobHandle,
        reason: FinishReason,
        now: float,
        deliveries: list[tuple[JobHandle, Delta]],
        error: str | None = None,
        text: str = "",
        tokens: list[int] | None = None,
    ) -> None:
        job = handle.job
        if reason != FinishReason.ABORT and handle.stream is not None and not handle.stream.stopped:
            text += handle.stream.finish()
        job.state = JobState.FINISHED
        job.finish_reason = reason
        job.finished = now
        self.scheduler.remove(job)
        self.pool.release(job.id)
        for drafter in self.drafters:
            drafter.pool.release(job.id)
        self.spec_depth.pop(job.id, None)
        self._live.pop(job.id, None)
        self._recent[job.id] = job
        while len(self._recent) > RECENT_JOBS:
            self._recent.popitem(last=False)
        self.metrics.observe_finished(job)
        deliveries.append((handle, Delta(text, tokens or [], reason, error)))

    def _deliver(self, deliveries: list[tuple[JobHandle, Delta]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[JobHandle, Delta]]] = {}
        for handle, delta in deliveries:
            by_loop.setdefault(handle.loop, []).append((handle, delta))
        for loop, items in by_loop.items():
            # a closed event loop raises RuntimeError: nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    # -- KV residency ---------------------------------------------------------------------------

    def _make_resident(self, job: Job, order: list[Job], chosen: set[str]) -> bool:
        """Reserve blocks for ``job``'s next step, evicting lower-priority caches if needed."""
        pool = self.pool
        need = job.total_tokens
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
                return False
            self._evict(victim)
        if job.state == JobState.SWAPPED:
            job.cached_tokens = pool.swap_in(job.id)
            job.state = JobState.PREEMPTED
        pool.reserve(job.id, need)
        return True

    def _evict(self, job: Job) -> None:
        """Free ``job``'s device blocks: to host memory if there is room, else drop them."""
        was_running = job.state == JobState.RUNNING
        if self.pool.host_room(job.cached_tokens):
            self.pool.swap_out(job.id, job.cached_tokens)
            job.swaps += 1
            kind, state = Preemption.SWAPPED, JobState.SWAPPED
        else:
            self.pool.drop(job.id)
            job.cached_tokens = 0
            kind, state = Preemption.RECOMPUTED, JobState.PREEMPTED
        if was_running:
            self._preempt(job, kind, state)
        else:
            job.state = state

    def _preempt(self, job: Job, kind: Preemption, state: JobState) -> None:
        """The one place a preemption is counted: an unfinished job left the batch."""
        job.state = state
        job.preemptions[kind] += 1
        self.preemptions[kind] += 1

    def _prefetch(self, order: list[Job], chosen: set[str]) -> None:
        """Bring the highest-priority swapped job back while there is room, ahead of its turn,
        keeping a block per running job free for their next token."""
        pool = self.pool
        headroom = len(self._running) + 1
        for job in order:
            if job.state != JobState.SWAPPED or job.id in chosen:
                continue
            blocks = pool.blocks_for(job.total_tokens)
            if len(pool.free) - headroom >= blocks:
                job.cached_tokens = pool.swap_in(job.id)
                job.state = JobState.PREEMPTED
            return


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """SSM logits over the LLM's vocabulary: rows past it cut, missing ones never drafted."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def _put_all(items: list[tuple[JobHandle, Delta]]) -> None:
    for handle, delta in items:
        handle.queue.put_nowait(delta)


# -- loading ------------------------------------------------------------------------------------


def _num_layers(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise EngineLoadError("cannot tell how many layers this model has")


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 64)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 2 * _num_layers(config) * kv_heads * head_dim * itemsize


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _context_length(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    sane = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(sane) if sane else 2048


def load_engine(
    config: EngineConfig,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> Engine:
    """Load the model, its tokenizer and any draft models, calibrate, start the model loop.

    ``report`` hears each phase (``building demo model: target 62%, about 40 s left``,
    ``loading weights of M``, ``calibrating``) for whoever asks a starting engine what it does.
    """
    tell = report or (lambda _text: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    path = _resolve(config.model, draft=False, progress=progress, report=tell)
    torch.manual_seed(config.seed)
    tell(f"loading weights: {config.model} on {device}")
    tokenizer, model = _load(config.model, path, dtype, progress)
    model = model.to(device).eval()
    drafts = []
    for name in config.draft_models:
        draft_path = _resolve(name, draft=True, progress=progress, report=tell)
        tell(f"loading weights: draft model {name} on {device}")
        draft_tokenizer, draft = _load(name, draft_path, dtype, progress)
        problem = tokenizer_mismatch(tokenizer, draft_tokenizer)
        if problem:
            raise EngineLoadError(
                f"draft model {name!r} cannot speculate for {config.model!r}: {problem};"
                " a draft must use the same tokenizer as the model it serves"
            )
        drafts.append((name, draft.to(device).eval()))
    context = _context_length(model, tokenizer)
    for _name, draft in drafts:
        draft_context = getattr(draft.config, "max_position_embeddings", None)
        if isinstance(draft_context, int) and 0 < draft_context < context:
            context = draft_context  # an SSM must reach every position the LLM does
    if config.max_model_len is not None:
        if config.max_model_len > context:
            raise EngineLoadError(
                f"--max-model-len {config.max_model_len} exceeds this model's context of {context}"
            )
        context = config.max_model_len
    name = config.served_model_name or config.model
    tell("calibrating: timing a prefill and a decode step")
    return Engine(model, tokenizer, config, device, dtype, name, context, drafts)


def _resolve(model: str, draft: bool, progress: bool, report: Callable[[str], None]) -> str:
    """'demo' is the offline demo: its target, or for a draft its distilled SSM."""
    if model != "demo":
        return model
    from flockctl.engine.demo import ensure_demo

    paths = ensure_demo(progress=progress, report=report)
    return str(paths.draft if draft else paths.target)


def _load(name: str, path: str, dtype: torch.dtype, progress: bool) -> tuple[Any, Any]:
    """Tokenizer and model; transformers' own bars only where ``progress`` asks for them and
    stderr is a terminal (in a worker's log file they are noise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (progress and sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineLoadError(f"cannot load model {name!r}: {first}") from exc
    return tokenizer, model


def tokenizer_mismatch(a: Any, b: Any) -> str | None:
    """Why two tokenizers would not map text to the same ids; None when they do."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"its tokenizer has {len(vb)} tokens, the model's has {len(va)}"
    differ = [t for t, i in va.items() if vb.get(t) != i]
    if differ:
        return (
            f"{len(differ)} of {len(va)} tokens have other ids in its tokenizer"
            f" (for example {differ[0]!r})"
        )
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return (
                f"its {attr} is {getattr(b, attr, None)}, the model's is {getattr(a, attr, None)}"
            )
    return None
