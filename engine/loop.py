"""The model loop: one thread that runs iterations until the engine closes.

Each iteration asks the scheduler for its order, the batcher for the batch (it admits jobs while
their KV fits and preempts the rest), the runner for one forward for the jobs that need a prefill
and one for the jobs that decode (or the speculator for a speculative iteration of the decoding
ones), and the sampler for their tokens. The loop decides none of that itself: it owns only what
follows, emitting each job's tokens into its text stream, finishing jobs, and delivering the
pieces to the event loop with one ``call_soon_threadsafe`` per iteration and event loop.

With the fused forward, an iteration's pieces are handed over just before the next iteration's
compiled forward lets the GIL go (``FusedLlama.before_call``; before a forward of the runner's
that is not compiled, and at once when no job is left): handed over at the iteration's end, the
event loop took the GIL at the first torch call of the next iteration's Python and held it
through its work on every stream while the forward's second thread waited (a new block's
zeroing took 199 us instead of 45 at 32 streams). Served on 2 cores: 1.04x the tokens a second
at 1 stream, 1.02x at 8, 1.06x at 32, 1.06x speculating. A forward split over two threads
hands them over from its second thread, just before that thread's half: handed over first, the
event loop took the GIL the second thread needed to start its half (0.3 ms late at 8 streams,
0.6 at 32; 8 streams 1.03x the tokens a second). Without the fused forward (other devices, other
dtypes) they go at the iteration's end.

Jobs whose params a speculative step cannot honour (penalties, log-probabilities, a seed with
sampling under ``--spec auto``: ``Speculator.can_speculate``) decode incrementally beside the
speculating ones. A job
that scores its prompt (``prompt_logprobs``, OpenAI's ``echo``) gets the logits of every prompt
position from its prefill forward; with ``max_tokens`` 0 it ends there.

The asyncio side never touches the model: it submits and aborts through an inbox under a
condition variable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flockctl.engine.batcher import Batcher, Plan
from flockctl.engine.handle import Delta, JobHandle, put_all
from flockctl.engine.job import FinishReason, Job, JobState, Preemption, TokenLogprob
from flockctl.engine.kv import OutOfBlocks
from flockctl.engine.metrics import EngineMetrics
from flockctl.engine.profiler import DecodePace
from flockctl.engine.runner import Feed, Runner
from flockctl.engine.sampling import Sampler, adjust_logits, is_greedy, token_logprobs
from flockctl.engine.scheduler import Scheduler
from flockctl.engine.speculator import RunRequest, Speculator

log = logging.getLogger("flockctl.engine")

RECENT_JOBS = 512
#: Greedy decode steps in one compiled call come to about this many seconds at most (see
#: ModelLoop._run_lengths): a run's tokens reach their streams when it ends, so a stream gets
#: them in bursts at most about this far apart (a new request or a cancel ends a run after its
#: current step). Served at 32 streams (demo model, steps of about 4.5 ms), 50 ms made 1.17x
#: the tokens a second of 20 ms, 100 ms no more; 10 ms lost a third
RUN_SECONDS = 0.05

Deliveries = list[tuple[JobHandle, Delta]]


class ModelLoop:
    """The model-loop thread with its inbox, the unfinished jobs' handles, the jobs finished
    lately, and what the loop counts (iterations, tokens, why it died if it did)."""

    def __init__(
        self,
        *,
        scheduler: Scheduler,
        batcher: Batcher,
        runner: Runner,
        speculator: Speculator,
        sampler: Sampler,
        pace: DecodePace,
        metrics: EngineMetrics,
        eos_ids: frozenset[int],
        max_model_len: int,
        decode_steps: int = 1,
    ):
        self.scheduler = scheduler
        self.batcher = batcher
        self.runner = runner
        self.speculator = speculator
        self.sampler = sampler
        self.pace = pace
        self.metrics = metrics
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.live: dict[str, JobHandle] = {}  # unfinished jobs by id (added by the API side)
        self.recent: collections.OrderedDict[str, Job] = collections.OrderedDict()  # finished
        self.iterations = 0
        self.tokens_generated = 0
        self.failed: str | None = None  # set when the loop died; /health reports it
        self.stopping = False
        # called with the reason once the loop has exited (crashed or stopped), after the jobs
        # it held were failed: whatever else waits on this thread (embedding batches) is failed too
        self.on_exit: list[Callable[[str], None]] = []
        # called on this thread with each finished job's handle (the engine hands the job to
        # its event loop for the access log and its span); None: nobody asked
        self.on_finished: Callable[[JobHandle], None] | None = None
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._held: Deliveries = []  # the last iteration's pieces, not handed over yet
        # nonzero once something is posted to the inbox: a run of decode steps in one compiled
        # call ends after its current forward (the loop zeroes it as it takes the inbox)
        self.interrupt = np.zeros(1, dtype=np.int8)
        self.decode_steps = decode_steps  # greedy decode steps a compiled call may run
        self.runs = 0  # compiled calls that ran more than one of them
        self.run_steps = 0  # the steps those calls ran
        if runner.fused is not None:
            runner.fused.before_call = self._flush
        self._thread = threading.Thread(target=self._run, name="flockctl-engine", daemon=True)

    # -- the API side (event loop thread) -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, handle: JobHandle) -> None:
        self.live[handle.job.id] = handle
        self._post(("submit", handle))

    def abort(self, job_id: str) -> None:
        self._post(("abort", job_id))

    def run_soon(self, call: Callable[[], None]) -> None:
        """Run ``call`` on this thread before the next iteration (an embedding batch)."""
        self._post(("call", call))

    def stop(self) -> None:
        with self._cv:
            self.stopping = True
            self.interrupt[0] = 1
            self._cv.notify()
        self._thread.join(timeout=30)

    def _post(self, item: tuple[str, Any]) -> None:
        with self._cv:
            self._inbox.append(item)
            self.interrupt[0] = 1
            self._cv.notify()

    # -- the model loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        try:
            while True:
                if not self.scheduler.jobs:
                    self._flush()
                with self._cv:
                    while not self._inbox and not self.scheduler.jobs and not self.stopping:
                        self._cv.wait()
                    if self.stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    self.interrupt[0] = 0
                for kind, item in inbox:
                    if kind == "submit":
                        now = time.monotonic()
                        self.scheduler.add(item.job, now)
                        item.job.record("admitted", now, item.job.level)
                    elif kind == "call":
                        item()
                    else:
                        self._abort(item)
                if self.scheduler.jobs:
                    self._iteration()
        except Exception as exc:  # a bug in the loop must not leave requests hanging forever
            log.exception("the engine loop crashed")
            self.failed = f"the engine loop crashed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._flush()
            reason = self.failed or "the engine is shutting down"
            for job_id in list(self.live):
                self._abort(job_id, error=reason)
            for listener in self.on_exit:
                listener(reason)

    def _abort(self, job_id: str, error: str | None = None) -> None:
        handle = self.live.get(job_id)
        if handle is None or handle.job.state == JobState.FINISHED:
            return
        deliveries: Deliveries = []
        self._finish(handle, FinishReason.ABORT, time.monotonic(), deliveries, error)
        self._flush()  # the job's pieces still held go first: its last one ends its stream
        self._deliver(deliveries)

    def _iteration(self) -> None:
        now = time.monotonic()
        order = self.scheduler.order(now)
        plan = self.batcher.plan(order)
        for job in plan.batch:
            if job.first_scheduled is None:
                job.first_scheduled = now
                job.record("scheduled", now)
        if plan.preempted or plan.swapped_out or plan.swapped_in:
            _record_plan(plan, now)
        if not plan.batch:
            self._flush()
            return

        prefill = [j for j in plan.batch if j.needs_prefill]
        decode = [j for j in plan.batch if not j.needs_prefill]
        deliveries: Deliveries = []
        if prefill:
            chunks = [plan.chunks.get(j.id) for j in prefill] if plan.chunks else None
            fed = sum(
                n or j.total_tokens - j.cached_tokens
                for j, n in zip(prefill, chunks or [None] * len(prefill), strict=True)
            )
            elapsed = self._step(prefill, deliveries, chunks)
            if elapsed is not None:  # skip-join predicts prefills from the ones measured
                self.pace.observe_prefill(fed, elapsed)
            if decode:  # first tokens go out now, not after the decoding jobs' forward
                self._deliver(deliveries)
                deliveries = []
        if decode:
            plain = [j for j in decode if not self.speculator.can_speculate(j)]
            speculable = [j for j in decode if j not in plain] if plain else decode
            speculating = self.speculator.choose(speculable) if speculable else []
            if speculating:
                chains = None if prefill else self._spec_run(order, plan.batch)
                self._speculate(speculable, speculating, deliveries, chains)
                if plain:
                    self._step(plain, deliveries)
            else:
                run = None if prefill else self._run_lengths(order, plan.batch)
                elapsed = self._step(decode, deliveries, run=run)
                if elapsed is not None:
                    # the MLFQ base quantum stays at about one decode iteration as it runs now
                    self.scheduler.set_base_quantum(self.pace.observe(elapsed))
                    self.speculator.observe_plain(decode, elapsed)
        self.iterations += 1
        if self.runner.fused is not None:  # handed over by the next compiled forward
            self._held.extend(deliveries)
        else:
            self._deliver(deliveries)
        prefetched = self.batcher.end_iteration(order, plan)
        if prefetched is not None:
            prefetched.record("swapped_in", time.monotonic())

    def _run_lengths(self, order: list[Job], batch: list[Job]) -> list[int] | None:
        """How many greedy decode steps each of the decoding ``batch`` runs in one compiled
        call, with no Python between them (None: one step). Only while every job the scheduler
        holds is in the batch and nothing is in the inbox: a job waiting for a place, a new
        request or a cancel is taken up after one step as before (and one posted during a run
        ends it after its current forward: :attr:`interrupt`). About ``RUN_SECONDS`` of steps
        at the pace decoding runs now, at most :attr:`decode_steps`, none past a job's
        ``max_tokens`` or the context, each job's cache reserved for them (a job short of
        blocks takes one step)."""
        if not self._may_run(order, batch):
            return None  # no compiled call takes several steps: reserve nothing for them
        want = min(self.decode_steps, int(RUN_SECONDS / max(self.pace.decode_seconds, 1e-6)))
        if want < 2:
            return None
        steps = []
        for job in batch:
            n = min(
                want,
                job.params.max_tokens - len(job.output_ids),
                self.max_model_len - job.total_tokens,
            )
            if n > 1:
                try:  # it feeds positions up to total_tokens + n - 2
                    self.batcher.pool.reserve(job.id, job.total_tokens + n - 1)
                except OutOfBlocks:
                    n = 1
            steps.append(max(1, n))
        return steps if max(steps) > 1 else None

    def _spec_run(self, order: list[Job], batch: list[Job]) -> RunRequest | None:
        """Whether a lone job's speculative steps may run in a pipelined run
        (:meth:`Speculator._chain_run`), and how many: as for runs of plain steps
        (:meth:`_run_lengths`), the job is the only one the scheduler holds, nothing is in the
        inbox (one posted during the run ends it after its current step) and its next token is
        its logits' argmax; up to :attr:`decode_steps` steps."""
        if len(batch) != 1 or not self._may_run(order, batch):
            return None
        return RunRequest(self.decode_steps, self._stops(batch)[0], self.interrupt)

    def _may_run(self, order: list[Job], batch: list[Job]) -> bool:
        """Whether the decoding ``batch`` may take several steps in one compiled call: runs are
        on, every job the scheduler holds is in it, nothing is in the inbox, the forward is the
        fused one and each job's next token is its logits' argmax."""
        return (
            self.decode_steps > 1
            and len(order) == len(batch)
            and not self._inbox
            and self.runner.fused is not None
            and all(_argmax_only(job) for job in batch)
        )

    def _stops(self, jobs: list[Job]) -> np.ndarray:
        """Each job's end-of-sequence (unless it ignores them) and stop token ids, a row a job
        padded with -1."""
        ends = [
            [*(() if job.params.ignore_eos else self.eos_ids), *job.params.stop_token_ids]
            for job in jobs
        ]
        stops = np.full((len(jobs), max(1, *map(len, ends))), -1, dtype=np.int64)
        for i, end in enumerate(ends):
            stops[i, : len(end)] = end
        return stops

    def _step(
        self,
        fed: list[Job],
        deliveries: Deliveries,
        chunks: list[int | None] | None = None,
        run: list[int] | None = None,
    ) -> float | None:
        """One forward and one sampled token per job; returns its seconds (None: it failed).
        ``chunks[i]``: job ``i`` is fed only that many of its prompt's tokens (a prefill
        chunk): it is cached and charged, and samples nothing yet. ``run[i]``: job ``i`` may
        decode that many greedy tokens in one compiled call (:meth:`_run_lengths`); the seconds
        returned are then a step's, the call's over the steps it ran."""
        start = time.perf_counter()
        jobs = fed
        try:
            picks = self._greedy(fed, run) if chunks is None else None
            logits = self._forward(fed, chunks) if picks is None else None
            for i, job in enumerate(fed):
                n = chunks[i] if chunks is not None else None
                made = len(picks[i]) if picks is not None else 1
                self.batcher.mark_cached(
                    job, job.total_tokens + made - 1 if n is None else job.cached_tokens + n
                )
            if chunks is not None and logits is not None:
                whole = [i for i, n in enumerate(chunks) if n is None]
                jobs = [fed[i] for i in whole]
                logits = logits[whole]
            handles = [self.live[j.id] for j in jobs]
            logprobs: dict[int, TokenLogprob] = {}
            if picks is not None:
                runs = picks
            else:
                assert logits is not None
                tokens = self.sampler.sample(
                    adjust_logits(logits, jobs, self.eos_ids),
                    [j.params for j in jobs],
                    [h.generator for h in handles],
                )
                runs = [[token] for token in tokens]
                scored = [i for i, j in enumerate(jobs) if j.params.logprobs is not None]
                if scored:
                    logprobs = dict(
                        zip(
                            scored,
                            token_logprobs(
                                logits[scored],
                                [tokens[i] for i in scored],
                                [jobs[i].params.logprobs or 0 for i in scored],
                            ),
                            strict=True,
                        )
                    )
        except Exception as exc:  # e.g. out of device memory: fail these jobs, keep serving
            self._fail(fed, exc, deliveries)
            return None
        elapsed = time.perf_counter() - start
        now = time.monotonic()
        for i, job in enumerate(fed):
            if chunks is not None and chunks[i] is not None:  # its prompt is not all in yet
                self.scheduler.charge(job, elapsed, now)
        for i, (job, handle, tokens) in enumerate(zip(jobs, handles, runs, strict=True)):
            self.scheduler.charge(job, elapsed, now)
            if job.params.max_tokens == 0:  # it only scored its prompt
                self._finish(handle, FinishReason.LENGTH, now, deliveries)
                continue
            scores = [logprobs[i]] if i in logprobs else None
            self._emit(job, handle, tokens, now, deliveries, scores)
        steps = max((len(tokens) for tokens in runs), default=1)
        if steps > 1:
            self.runs += 1
            self.run_steps += steps
        return elapsed / steps

    def _greedy(self, jobs: list[Job], run: list[int] | None = None) -> list[list[int]] | None:
        """Each job's tokens from the compiled forward's own argmax (:meth:`Runner.greedy`):
        one, or up to ``run[i]`` for job ``i``, ending at its end-of-sequence and stop tokens,
        where every job decodes greedily and nothing else is asked of its logits (no
        log-probabilities, no penalties, biases or minimum length); None otherwise, with nothing
        fed."""
        if not all(_argmax_only(job) for job in jobs):
            return None
        stops = self._stops(jobs) if run is not None else None
        try:
            return self.runner.greedy(jobs, run, stops, self.interrupt)
        finally:
            self._flush()  # where no compiled forward did (see the module docstring)

    def _forward(self, jobs: list[Job], chunks: list[int | None] | None = None) -> torch.Tensor:
        """:meth:`_logits`; the last iteration's pieces are handed over by then."""
        try:
            return self._logits(jobs, chunks)
        finally:
            self._flush()  # where no compiled forward did (see the module docstring)

    def _logits(self, jobs: list[Job], chunks: list[int | None] | None = None) -> torch.Tensor:
        """The runner's forward for ``jobs``: logits ``[len(jobs), vocab]`` for each one's next
        token (``chunks``: see :meth:`_step`). A job that scores its prompt and has not yet is
        fed so that the logits of every prompt position come back; their log-probabilities go
        on the job (it is never chunked)."""
        first = [_scores_prompt(j) for j in jobs]
        if not any(first):
            return self.runner.forward(jobs, chunks)
        feeds = []
        for job, scoring in zip(jobs, first, strict=True):
            if scoring:  # from the first token, even where a cached prefix holds the start
                tokens = job.prompt_ids + job.output_ids
                feeds.append(Feed.linear(tokens, 0, len(tokens)))
            else:
                n = chunks[len(feeds)] if chunks is not None else None
                feeds.append(Feed.linear(self.runner.tokens(job, n), job.cached_tokens))
        rows = self.runner.run([j.id for j in jobs], feeds)
        for job, scoring, row in zip(jobs, first, rows, strict=True):
            if scoring:
                prompt = job.prompt_ids
                scores = token_logprobs(
                    row[: len(prompt) - 1],
                    prompt[1:],
                    [job.params.prompt_logprobs or 0] * (len(prompt) - 1),
                )
                job.prompt_logprobs = [None, *scores]
        return torch.stack([row[-1] for row in rows])

    def _fail(self, jobs: list[Job], exc: Exception, deliveries: Deliveries) -> None:
        log.exception("forward failed for %d jobs", len(jobs))
        now = time.monotonic()
        for job in jobs:
            handle = self.live.get(job.id)
            if handle is not None:
                self._finish(handle, FinishReason.ABORT, now, deliveries, f"engine error: {exc}")

    def _emit(
        self,
        job: Job,
        handle: JobHandle,
        tokens: list[int],
        now: float,
        deliveries: Deliveries,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """Append ``tokens`` to the job's output in order, up to the first that finishes it
        (an end-of-sequence token, unless ``ignore_eos``, or one of ``stop_token_ids``: neither
        shows in the text). ``logprobs``: one per token, kept on the job and delivered."""
        job.iterations += 1
        if job.first_token is None:
            job.first_token = now
            job.record("first_token", now)
        stream = handle.stream
        assert stream is not None
        text = ""
        emitted: list[int] = []
        unpushed: list[int] = []  # a run's tokens, decoded in one push where no stop string cuts
        reason: FinishReason | None = None
        for token in tokens:
            job.output_ids.append(token)
            emitted.append(token)
            self.tokens_generated += 1
            eos = (
                token in self.eos_ids and not job.params.ignore_eos
            ) or token in job.params.stop_token_ids
            if not eos and stream.cuts:
                text += stream.push([token])
            elif not eos:
                unpushed.append(token)
            if eos or stream.stopped:
                reason = FinishReason.STOP
            elif (
                len(job.output_ids) >= job.params.max_tokens
                or job.total_tokens >= self.max_model_len
            ):
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        if unpushed:
            text += stream.push(unpushed)
        scores = logprobs[: len(emitted)] if logprobs is not None else None
        if scores:
            job.logprobs.extend(scores)
        if reason is None:
            deliveries.append((handle, Delta(text, emitted, logprobs=scores)))
        else:
            self._finish(
                handle, reason, now, deliveries, text=text, tokens=emitted, logprobs=scores
            )

    def _speculate(
        self,
        jobs: list[Job],
        chosen: list[Job],
        deliveries: Deliveries,
        run: RunRequest | None = None,
    ) -> None:
        """A speculative iteration for the decoding ``jobs`` (``chosen`` draft trees), then each
        job's verified tokens out in order. ``run``: a lone job may take several steps
        (:meth:`_spec_run`)."""
        handles = {j.id: self.live[j.id] for j in jobs}
        try:
            accepted = self.speculator.step(
                jobs,
                chosen,
                {job_id: h.generator for job_id, h in handles.items()},
                {j.id for j in self.batcher.running},
                run,
            )
        except Exception as exc:
            self._fail(jobs, exc, deliveries)
            return
        finally:
            self._flush()  # where no compiled forward did (see the module docstring)
        now = time.monotonic()
        unit = self.pace.decode_seconds
        for job, result in zip(jobs, accepted, strict=True):
            self.batcher.mark_cached(job, result.cached)
            # MLFQ quanta count verified tokens: each is charged as one decode iteration
            self.scheduler.charge(job, unit * len(result.tokens), now)
            self._emit(job, handles[job.id], result.tokens, now, deliveries)

    def _finish(
        self,
        handle: JobHandle,
        reason: FinishReason,
        now: float,
        deliveries: Deliveries,
        error: str | None = None,
        text: str = "",
        tokens: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        job = handle.job
        if reason != FinishReason.ABORT and handle.stream is not None and not handle.stream.stopped:
            text += handle.stream.finish()
        job.state = JobState.FINISHED
        job.finish_reason = reason
        job.finished = now
        job.record("finished", now, reason.value)
        self.scheduler.remove(job)
        self.batcher.release(job)
        self.speculator.release(job.id)
        self.live.pop(job.id, None)
        self.recent[job.id] = job
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)
        self.metrics.observe_finished(job)
        deliveries.append((handle, Delta(text, tokens or [], reason, error, logprobs)))
        if self.on_finished is not None:
            self.on_finished(handle)

    def _flush(self) -> None:
        """Hand the last iteration's pieces to the event loop (see the module docstring)."""
        if self._held:
            held, self._held = self._held, []
            self._deliver(held)

    def _deliver(self, deliveries: Deliveries) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, Deliveries] = {}
        for handle, delta in deliveries:
            by_loop.setdefault(handle.loop, []).append((handle, delta))
        for loop, items in by_loop.items():
            # a closed event loop raises RuntimeError: nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(put_all, items)


def _record_plan(plan: Plan, now: float) -> None:
    """Put what making room did on the jobs' timelines: each preemption by kind, each swap."""
    for job in plan.swapped_out:
        job.record("swapped_out", now)
    for job in plan.preempted:
        if job.state == JobState.SWAPPED:
            kind = Preemption.SWAPPED
        elif job in plan.dropped:
            kind = Preemption.RECOMPUTED
        else:
            kind = Preemption.DESCHEDULED
        job.record("preempted", now, kind.value)
    for job in plan.swapped_in:
        job.record("swapped_in", now)


def _argmax_only(job: Job) -> bool:
    """Whether ``job``'s next token is the argmax of its logits and nothing else is asked of
    them: greedy, no log-probabilities, penalties, biases or minimum length, no prompt to
    score."""
    p = job.params
    return (
        is_greedy(p)
        and not p.adjusts_logits
        and p.logprobs is None
        and bool(p.max_tokens)
        and not _scores_prompt(job)
    )


def _scores_prompt(job: Job) -> bool:
    """Whether ``job``'s next forward must score its prompt (asked, and not done yet)."""
    return job.params.prompt_logprobs is not None and job.prompt_logprobs is None
