"""The engine: what the API holds. It wires the parts of one model together (KV pool, batcher,
runner, speculator, sampler, scheduler, the model loop that drives them), checks each request
before it becomes a job, and answers ``/stats`` and ``/jobs`` from what the parts count.

Requests become jobs on the event loop's thread; everything that touches the model runs on the
model loop's thread (:mod:`flockctl.engine.loop`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import psutil
import torch

from flockctl import __version__
from flockctl.cores import default_threads
from flockctl.cores import fused_threads as engine_fused_threads
from flockctl.engine import decode_attention, fused_spec
from flockctl.engine.batcher import AUTO_BATCH_MAX, auto_batch_size, default_batched_tokens
from flockctl.engine.config import EngineConfig, EngineLoadError
from flockctl.engine.device import DeviceMemory
from flockctl.engine.embeddings import Embedder
from flockctl.engine.handle import JobHandle
from flockctl.engine.job import InvalidRequest, Job, JobState
from flockctl.engine.kv import KVPool, cuda_kv_budget, kv_bytes_per_token, num_layers
from flockctl.engine.loop import ModelLoop
from flockctl.engine.metrics import EngineMetrics
from flockctl.engine.profiler import DecodePace, Profile, calibrate
from flockctl.engine.runner import FUSED_MAX_ROWS, Runner
from flockctl.engine.sampling import Sampler, make_generator
from flockctl.engine.scheduler import Scheduler, make_scheduler
from flockctl.engine.spec_policy import SpecPolicy
from flockctl.engine.speculator import Drafter, Speculator
from flockctl.engine.text import TextStream
from flockctl.engine.token_budget import make_batcher
from flockctl.engine.tracing import TRACEPARENT, JobObserver
from flockctl.schema import STATS_SCHEMA_VERSION, EngineStats
from flockctl.telemetry import setup as setup_telemetry

if TYPE_CHECKING:
    from transformers import PreTrainedModel


log = logging.getLogger("flockctl.engine")


class QueueFull(Exception):
    """Too many jobs waiting; the API answers 429."""


def fused_threads(config: EngineConfig) -> int:
    """Threads the fused forward splits a batch's jobs over: ``config.fused_threads``, or in
    auto, where the engine chose torch's threads itself (no ``--threads``, no
    ``OMP_NUM_THREADS``), an engine alone's share (:func:`flockctl.cores.fused_threads`: 2 on
    two cores), else 1.

    An engine alone on two cores runs torch on one (the other is the serving side's, see
    :mod:`flockctl.cores`), and that core sat mostly idle while the model loop computed: the
    event loop streamed 3,400 tokens/s in about a seventh of it. A second thread computing half
    the jobs of a step took 32 streams from 3,350-3,500 to 5,100-5,200 tokens/s with no later
    first tokens. Engines that share a machine's cores (``flockctl up`` gives each ``--threads``)
    keep to one: two engines splitting on two cores would oversubscribe them."""
    if config.fused_threads:
        return config.fused_threads
    if config.threads is not None or default_threads() is None:
        return 1
    return engine_fused_threads()


class EngineUnavailable(RuntimeError):
    """The model loop is not running (crashed or shutting down); the API answers 503."""


class Engine:
    capabilities = ("generate", "embed")

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        model_name: str,
        max_model_len: int,
        eos_ids: frozenset[int],
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
        if config.kv_budget and device.type == "cpu":
            self._check_budget(config.kv_budget)
        self.pool = KVPool(
            num_layers(model.config),
            budget,
            device,
            dtype,
            block_size=config.block_size,
            host_budget_tokens=config.host_kv_budget,
            prefix_caching=config.prefix_caching,
        )
        # a job can never be longer than the whole device budget
        self.max_model_len = min(max_model_len, self.pool.budget_tokens)
        config = self.config = self._sized(config)
        self.batcher = make_batcher(self.pool, config)  # capped by max_tokens_per_batch
        self.batcher.batched_tokens = config.max_num_batched_tokens  # chunked prefill
        # the fused forward runs on one core: with one torch thread only (and splits a batch's
        # jobs over a second thread where the engine's cores allow, see fused_threads)
        self.runner = Runner(
            model,
            self.pool,
            device,
            attention=config.attention,
            fused=torch.get_num_threads() == 1,
            fused_threads=fused_threads(config),
        )
        if self.runner.fast_decode:
            decode_attention.warm_up()  # compiled now, not in the first request
        if self.runner.fused is not None:
            self.runner.fused.warm_up()
            fused_spec.warm_up_decode(self.runner.fused)
        log.info("flockctl engine: %s", self._forward_kind())
        self.sampler = Sampler()
        logits = model.get_output_embeddings()
        assert logits is not None and isinstance(logits.weight, torch.Tensor)
        self.vocab_size = int(logits.weight.shape[0])
        self.speculator = Speculator(
            self._draft_models,
            self.runner,
            self.sampler,
            config,
            budget,
            self.max_model_len,
            self.vocab_size,
        )

        self.profile: Profile = calibrate(
            self.runner, min(self.pool.budget_tokens, max_model_len * 2), config.max_batch_size
        )
        self.pace = DecodePace(self.profile)
        self.scheduler: Scheduler = make_scheduler(
            config.scheduler,
            base_quantum=self.profile.decode_seconds,
            predict_prefill=self.pace.predict_prefill,
            levels=config.mlfq_levels,
            starvation_limit=config.starvation_limit,
        )
        self.metrics = EngineMetrics(self.stats, model_name)
        # before the loop starts: a bad endpoint or a missing extra fails here, nothing to stop
        self.telemetry = setup_telemetry(
            "flockctl-engine", config.otel_collector_endpoint, registry=self.metrics.registry
        )
        self.model_loop = ModelLoop(
            scheduler=self.scheduler,
            batcher=self.batcher,
            runner=self.runner,
            speculator=self.speculator,
            sampler=self.sampler,
            pace=self.pace,
            metrics=self.metrics,
            eos_ids=eos_ids,
            max_model_len=self.max_model_len,
            decode_steps=config.num_scheduler_steps,
        )
        self.model_loop.start()
        # embedding batches run on the loop's thread between iterations; they are not jobs
        self.embedder = Embedder(
            model,
            device,
            pooling=config.pooling or "last",
            max_len=self.max_model_len,
            vocab_size=self.vocab_size,
            run_soon=self.model_loop.run_soon,
        )
        self.model_loop.on_exit.append(self.embedder.close)
        # the access log and the job spans, off the model loop (see tracing.py)
        self.observer = JobObserver(model_name, self.telemetry, config.access_log)
        if self.observer.active:
            self.model_loop.on_finished = self._job_finished

    def _job_finished(self, handle: JobHandle) -> None:
        """On the model loop: hand the finished job to its request's event loop."""
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody to tell
            handle.loop.call_soon_threadsafe(self.observer.finished, handle.job)

    # -- sizing --------------------------------------------------------------------------------

    def _forward_kind(self) -> str:
        """What runs the model, for the log."""
        if self.runner.lean is None:
            return "the model runs through transformers' forward"
        if self.runner.fused is not None:
            split = self.runner.fused.threads
            return (
                f"the model runs the engine's fused forward for up to {FUSED_MAX_ROWS} tokens"
                f" a step ({'its jobs split over 2 threads' if split > 1 else 'on one thread'}),"
                " its lean forward with the compiled decode attention above that"
                " (--attention exact: transformers' logits, bit for bit)"
            )
        if self.runner.fast_decode:
            return (
                "the model runs the engine's lean forward; decode steps over the batch attend"
                " with its compiled kernel (--attention exact: transformers' logits, bit for bit)"
            )
        return "the model runs the engine's exact lean forward (transformers' logits, bit for bit)"

    def _sized(self, config: EngineConfig) -> EngineConfig:
        """``config`` with its automatic sizes chosen: the batch from the KV budget, the
        tokens an iteration feeds from the device (logged, and shown in ``/stats``)."""
        tokens = config.max_num_batched_tokens or default_batched_tokens(self.device)
        size = config.max_batch_size or auto_batch_size(
            self.pool.budget_tokens, self.max_model_len, tokens
        )
        tokens = max(tokens, size)
        log.info(
            "flockctl engine: batches of up to %d jobs%s and %d tokens an iteration%s",
            size,
            "" if config.max_batch_size else f" (auto: {self.pool.budget_tokens} KV tokens)",
            tokens,
            "" if config.max_num_batched_tokens else " (auto)",
        )
        return dataclasses.replace(config, max_batch_size=size, max_num_batched_tokens=tokens)

    def _kv_bytes_per_token(self) -> int:
        """KV cache bytes a token takes: the model's and every draft model's."""
        return kv_bytes_per_token(self.model.config, self.dtype) + sum(
            kv_bytes_per_token(m.config, self.dtype) for _, m in self._draft_models
        )

    def _check_budget(self, tokens: int) -> None:
        """A ``--kv-budget`` on CPU is written whole at start (KVPool._ensure_layer): refuse one
        the machine's available memory cannot hold, with the most it can, rather than have the
        OS kill the engine while it zeroes it."""
        per_token = self._kv_bytes_per_token()
        free = self.memory.free_bytes()
        limit = int(free * 0.9)  # the rest for the weights, activations and the process
        if tokens * per_token > limit:
            raise EngineLoadError(
                f"--kv-budget {tokens} tokens needs {tokens * per_token / 2**30:.1f} GiB of"
                f" memory ({per_token} bytes a token, all of it resident from the start), but"
                f" {free / 2**30:.1f} GiB is available: ask for at most {limit // per_token}"
                " tokens (nine tenths of it), or leave --kv-budget out (a quarter of it)"
            )

    def _default_budget(self) -> int:
        """KV tokens: the free memory of this engine's own GPU (its share of it) less a margin,
        refusing to start below one ``--max-model-len`` request; on CPU/MPS a quarter of what
        is free, at most 2 GiB; never more than every admissible job at full length could use."""
        per_token = self._kv_bytes_per_token()
        free = self.memory.free_bytes()
        batch = self.config.max_batch_size or AUTO_BATCH_MAX
        ceiling = (batch + self.config.max_waiting) * self.max_model_len
        if self.device.type == "cuda":
            return cuda_kv_budget(
                free,
                per_token,
                self.max_model_len,
                ceiling,
                self.config.block_size,
                required=self.config.max_model_len is not None,
            )
        usable = min(free * 0.25, 2 * 2**30)
        return max(self.config.block_size, min(int(usable // per_token), ceiling))

    # -- API side (event loop thread) ---------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], params: Any, after: JobHandle | None = None
    ) -> JobHandle:
        """Check a request and make it a job. ``after``: a job with the same prompt (the first
        of ``n`` choices); this one waits for its prefill and shares its prompt's cached blocks,
        unless there is nothing to share (no prefix cache, a prompt shorter than one block and a
        token, a job that scores its prompt and so computes all of it)."""
        if self.failed or self.closing:
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
        live = list(self.model_loop.live.values())
        held = sum(len(h.followers) for h in live)
        # taken in and not in the batch: a job the batch has just finished has left ``live``
        # before the batch's list drops it (the model loop's thread does both, in that order)
        running = {job.id for job in self.batcher.running}
        waiting = held + sum(1 for h in live if h.job.id not in running)
        if waiting >= self.config.max_waiting:
            raise QueueFull(
                f"{waiting} jobs are already waiting (--max-waiting {self.config.max_waiting});"
                " retry later"
            )
        job = Job(list(prompt_ids), params, traceparent=TRACEPARENT.get())
        job.spec = self.speculator.job_spec()
        handle = JobHandle(job, asyncio.get_running_loop(), self.model_loop.abort)
        handle.stream = TextStream(self.tokenizer, prompt_ids, params.stop)
        handle.generator = make_generator(params.seed, self.device)
        if (
            after is not None
            and self.pool.prefix is not None
            and n > self.pool.block_size
            and params.prompt_logprobs is None
            and after.job.prompt_ids == job.prompt_ids
        ):
            handle.follow(after, self._start_held)
        else:
            self.model_loop.submit(handle)
        return handle

    def _start_held(self, handle: JobHandle) -> None:
        """A held job's leader has its prefill done: into the model loop, if it still runs."""
        if self.failed or self.closing:
            handle.fail(self.failed or "the engine is shutting down")
        else:
            self.model_loop.submit(handle)

    def job_info(self, job_id: str) -> dict[str, Any] | None:
        handle = self.model_loop.live.get(job_id)
        job = handle.job if handle else self.model_loop.recent.get(job_id)
        return job.detail() if job else None

    def stats(self, detailed: bool = False) -> EngineStats:
        now = time.monotonic()
        # The model loop's thread ends jobs while this reads them: one whose state reads finished
        # ended during the snapshot and is left out (it is in recent_jobs), as from the counts.
        jobs, summaries = [], []
        for handle in list(self.model_loop.live.values()):
            summary = handle.job.summary(now)
            if summary["state"] != JobState.FINISHED.value:
                jobs.append(handle.job)
                summaries.append(summary)
        states = collections.Counter(s["state"] for s in summaries)
        out: dict[str, Any] = {
            "schema_version": STATS_SCHEMA_VERSION,
            "engine": "flockctl",
            "version": __version__,
            "model": self.model_name,
            "scheduler": self.scheduler.name,
            "device": self.memory.read(),
            "dtype": str(self.dtype).removeprefix("torch."),
            # fast: large decode batches attend with the compiled kernel (decode_attention.py)
            "attention": "fast" if self.runner.fast_decode else "exact",
            "fused_threads": self.runner.fused.threads if self.runner.fused is not None else 0,
            "num_scheduler_steps": self.config.num_scheduler_steps,
            "decode_runs": {"runs": self.model_loop.runs, "steps": self.model_loop.run_steps},
            "max_batch_size": self.config.max_batch_size,
            # Requests taken at once: the running batch plus the waiting room (more get 429).
            "capacity": self.config.max_batch_size + self.config.max_waiting,
            "max_model_len": self.max_model_len,
            "queue_lengths": self.scheduler.queue_lengths(),
            "running": states[JobState.RUNNING.value],
            "waiting": states[JobState.WAITING.value] + states[JobState.PREEMPTED.value],
            "swapped": states[JobState.SWAPPED.value],
            "preemptions_total": {k.value: v for k, v in self.batcher.preemptions.items()},
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
            "prefix_cache": self.pool.prefix.stats() if self.pool.prefix is not None else None,
            "iterations": self.model_loop.iterations,
            "tokens_generated": self.model_loop.tokens_generated,
            "embeddings": self.embedder.stats(),
            "uptime": round(time.time() - self.started, 3),
            "jobs": summaries,
        }
        if detailed:
            out["jobs"] = [d for j in jobs if (d := j.detail(now))["state"] != "finished"]
            out["scheduler_detail"] = self.scheduler.describe()
            out["profile"] = self.profile.to_dict()
            recent = list(self.model_loop.recent.values())[-20:]
            ewma = self.pace.ewma
            out["decode_ms_recent"] = round(ewma * 1000, 3) if ewma is not None else None
            out["recent_jobs"] = [j.detail(now) for j in recent]
            out["process_rss"] = psutil.Process().memory_info().rss
        return out  # type: ignore[return-value]

    def spec_stats(self) -> dict[str, Any] | None:
        """Speculative decoding's figures; None without draft models."""
        return self.speculator.stats()

    # read by bench/speculative.py and the tests
    @property
    def drafters(self) -> list[Drafter]:
        return self.speculator.drafters

    @property
    def spec_tree(self) -> tuple[int, ...]:
        return self.speculator.tree

    @property
    def spec_policy(self) -> SpecPolicy:
        return self.speculator.policy

    @property
    def failed(self) -> str | None:
        """Why the model loop died, if it did; /health reports it."""
        return self.model_loop.failed

    @property
    def closing(self) -> bool:
        return self.model_loop.stopping

    def close(self) -> None:
        self.model_loop.stop()
        self.runner.close()
        self.embedder.close(self.failed or "the engine is shutting down")
        if self.telemetry is not None:
            self.telemetry.shutdown()
