"""Scheduler comparison (FCFS against skip-join MLFQ) and batched decode against transformers.

    python bench/scheduler.py [--model demo] [--max-batch-size 4] [--load 0.9] [--duration 90]
                              [--jobs N] [--seed 0] [--starvation-limit 5] [--no-decode]
                              [--one-at-a-time] [--engine-threads N] [--in-process] [--quick]

Part 1, schedulers. One engine server per scheduler (``flockctl engine serve --model M
--scheduler S --max-batch-size B`` on a free 127.0.0.1 port, started and stopped by this script,
on errors and Ctrl-C too), each sent the same open-loop trace of ``/generate`` requests
(FastServe's body, greedy, ``ignore_eos`` so every job generates exactly its drawn length). The
two servers run side by side, at the same time, each with half the cores (``--threads``): on a
shared host whatever else runs slows both alike, where one run after the other could meet a
busy neighbour in one run only (``--one-at-a-time`` runs them in turn with all the cores).

- Output lengths are heavy-tailed: 12% of a trace's jobs (exactly, at random places) are long,
  uniform on 150..400 tokens; the rest are short, uniform on 4..24 (mean 45.3 tokens a job; the
  long jobs carry 73% of the tokens). Prompts are a dozen fixed code snippets (9-23 tokens with
  the demo's tokenizer).
- Arrivals are a Poisson process offering ``--load`` times the engines' capacity for this mix,
  measured before the trace is made: a closed loop of ``2 * batch`` clients on each server
  keeps its batch full, and the engine's ``tokens_generated`` counter gives tokens/s over a
  window, in the conditions the trace then runs in (side by side, both loops at once). The
  trace offers ``--load`` of the mean of the two (``capacity.reference_tokens_per_s``); jobs/s
  is tokens/s over the mean output length, and the figure the engine's start-up profile of one
  decode step implies is printed beside it. The same closed loop runs again after the trace
  (``capacity.after_trace_tokens_per_s``, ``trace.offered_load_after``): on a shared host the
  other tenants come and go, and a trace offered at 0.8 or 0.95 of the capacity before it has
  met anything from 0.4 to 1.6 of what the engines had after it.
- Lengths and gaps come from ``--seed``; the gaps are drawn at rate 1 and scaled, so both
  schedulers see exactly the same jobs at the same offsets.

Job completion time (JCT) is measured by the client, from sending the request to receiving the
answer, and reported beside the server's own figure (job arrival to last token), for all jobs
and for short and long ones apart, with throughput, preemptions and the MLFQ's promotions and
demotions. Why MLFQ should win: with FCFS a batch of 4 fills with long jobs and short jobs queue
behind them for seconds (head-of-line blocking); MLFQ demotes a job once it has had its quantum
at a level, so a new short job enters above the long ones, takes a slot at once and finishes in
a few dozen iterations. The long jobs pay for it: they get the slots the short ones leave, and
are preempted whenever more than ``batch`` jobs of higher levels are runnable. The targets
(``targets`` in the JSON): mean JCT at least 2x FCFS's at ``--load`` 0.9 and above (1.5x
below), p99 no worse, long jobs' mean at least 0.8x, throughput within 5%.

``simulated`` replays the trace through the engine's own scheduler classes on a fake clock
(every iteration costing what the closed loop measured, the MLFQ server's quanta): what the
policy alone gives on these jobs. A measured speedup far from it points at the engine or the
host rather than the policy. Each run also records the engine's CPU use (cores) and the host's
load average: on a shared machine a busy neighbour shows there first.

Part 2, decode throughput, in this process: 8 prompts of 32 tokens, 128 new tokens each, greedy
with EOS ignored, through the engine (``max_batch_size`` 8, all submitted at once, timed until
all are done) and through ``model.generate`` on the same weights (a ``DynamicCache``, the
default). One warm-up each, then three runs alternating the two; the best run of each counts.

``--in-process`` runs part 1 against ``load_engine`` on this process's event loop instead of a
server: no HTTP, the same engine code. Stdout gets one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil
from common import (
    HOST,
    PROMPTS,
    child_setup,
    cpu_seconds,
    free_port,
    job_tokens,
    machine,
    percentile,
    say,
)

if TYPE_CHECKING:
    from flockctl.engine.engine import Engine

SCHEDULERS = ("fcfs", "mlfq")

SHORT_TOKENS = (4, 24)
LONG_TOKENS = (150, 400)
LONG_FRACTION = 0.12
MEAN_OUTPUT_TOKENS = (1 - LONG_FRACTION) * sum(SHORT_TOKENS) / 2 + LONG_FRACTION * sum(
    LONG_TOKENS
) / 2


CLOSED_LOOP_WARMUP_S = 2.0
CAPACITY_WINDOW_S = 12.0
PROGRESS_EVERY_S = 5.0
HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=5)

DECODE_BATCH = 8
DECODE_PROMPT_TOKENS = 32
DECODE_NEW_TOKENS = 128
DECODE_RUNS = 3

TARGET_MEAN_JCT_SPEEDUP = 2.0  # at --load 0.9 and above
TARGET_MEAN_JCT_SPEEDUP_LOW_LOAD = 1.5
TARGET_P99_JCT_SPEEDUP = 1.0
TARGET_LONG_JCT_SPEEDUP = 0.8
TARGET_THROUGHPUT_RATIO = 0.95
TARGET_DECODE_RATIO = 0.9


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


# -- workload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One job of the trace: when it is sent (seconds after the start) and what it asks for."""

    at: float
    prompt: str
    max_new_tokens: int

    @property
    def long(self) -> bool:
        return self.max_new_tokens >= LONG_TOKENS[0]


def draw_length(rng: random.Random) -> int:
    """One output length of the mix, for the closed loop's endless stream of jobs."""
    low, high = LONG_TOKENS if rng.random() < LONG_FRACTION else SHORT_TOKENS
    return rng.randint(low, high)


def trace_lengths(jobs: int, seed: int) -> list[int]:
    """Output lengths of a trace: exactly ``round(LONG_FRACTION * jobs)`` long jobs at random
    places. Drawing each job's class independently would let a few hundred jobs carry 16% long
    ones instead of 12%, a quarter more work than the rate was chosen for."""
    rng = random.Random(f"{seed}/lengths")
    long = set(rng.sample(range(jobs), round(LONG_FRACTION * jobs)))
    return [rng.randint(*(LONG_TOKENS if i in long else SHORT_TOKENS)) for i in range(jobs)]


def make_trace(lengths: list[int], rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at ``rate`` per second for jobs of these output lengths. Gaps are drawn
    at rate 1 and scaled, so a seed gives the same jobs in the same order whatever the rate."""
    rng = random.Random(f"{seed}/arrivals")
    at = 0.0
    trace = []
    for n in lengths:
        at += rng.expovariate(1.0)
        trace.append(Arrival(at / rate, rng.choice(PROMPTS), n))
    return trace


# -- backends: the engine behind HTTP, or in this process ----------------------------------------


class JobFailed(Exception):
    """A request the engine refused or could not finish; the message says which and why."""


class Backend(ABC):
    """What the load generator talks to: one engine with one scheduler."""

    process: psutil.Process  # where the engine runs, for its CPU time

    @abstractmethod
    async def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        """Run one greedy job of exactly ``max_new_tokens``; returns the job's figures as the
        ``/generate`` answer carries them (``completion_time``, ``preemption_count``...)."""

    @abstractmethod
    async def stats(self, detailed: bool = False) -> dict[str, Any]:
        """The engine's ``/stats`` (or ``/stats/detailed``) object."""

    @abstractmethod
    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's detail (``/jobs/{id}``: its events, its MLFQ level), or None once
        the engine no longer remembers it."""


class HttpBackend(Backend):
    def __init__(self, session: aiohttp.ClientSession, base: str, pid: int) -> None:
        self.session = session
        self.base = base
        self.process = psutil.Process(pid)

    async def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        body = {
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        try:
            async with self.session.post(self.base + "/generate", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    error = data.get("error", {}) if isinstance(data, dict) else {}
                    raise JobFailed(f"status {resp.status}: {error.get('message', data)}")
                return dict(data)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise JobFailed(f"{type(exc).__name__}: {exc}") from exc

    async def stats(self, detailed: bool = False) -> dict[str, Any]:
        path = "/stats/detailed" if detailed else "/stats"
        async with self.session.get(self.base + path) as resp:
            resp.raise_for_status()
            return dict(await resp.json())

    async def job(self, job_id: str) -> dict[str, Any] | None:
        async with self.session.get(f"{self.base}/jobs/{job_id}") as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            return dict(await resp.json())


class InProcessBackend(Backend):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.process = psutil.Process()

    async def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        from flockctl.engine.engine import EngineUnavailable, QueueFull
        from flockctl.engine.job import InvalidRequest, SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0, ignore_eos=True)
        try:
            handle = self.engine.submit(self.engine.tokenizer.encode(prompt), params)
        except (InvalidRequest, QueueFull, EngineUnavailable) as exc:
            raise JobFailed(f"{type(exc).__name__}: {exc}") from exc
        async for delta in handle:
            if delta.error:
                raise JobFailed(delta.error)
        job = handle.job
        detail = job.detail()
        return {
            "job_id": job.id,
            "completion_time": detail["completion_time"],
            "queue_time": detail["queue_time"],
            "execution_time": detail["execution_time"],
            "preemption_count": job.preemption_count,
            "finish_reason": detail["finish_reason"],
            "prompt_tokens": len(job.prompt_ids),
            "generated_tokens": len(job.output_ids),
        }

    async def stats(self, detailed: bool = False) -> dict[str, Any]:
        return self.engine.stats(detailed=detailed)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return self.engine.job_info(job_id)


# -- the server process ----------------------------------------------------------------------------


class Server:
    """One ``flockctl engine serve`` child; ``stop`` ends it by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=logs,
                preexec_fn=child_setup if sys.platform == "linux" else None,
                start_new_session=sys.platform != "linux",
            )

    def check(self) -> None:
        """Raise if the server has exited: nothing left to measure."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{self.name} (pid {self.proc.pid}) ignored SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()


async def wait_healthy(session: aiohttp.ClientSession, base: str, server: Server) -> None:
    """Until ``/health`` answers 200; each probe has a timeout of its own, so a server that
    accepts connections but never answers cannot stall the wait past ``timeout``."""
    timeout = 300.0
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        server.check()
        try:
            async with session.get(base + "/health", timeout=HEALTH_TIMEOUT) as resp:
                if resp.status == 200:
                    return
                last = f" (last answer: status {resp.status})"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            last = f" (last error: {exc or type(exc).__name__})"
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name} not healthy within {timeout:g}s{last}: {server.tail()}")


@contextlib.asynccontextmanager
async def engine_backend(
    args: argparse.Namespace, scheduler: str, logs: Path
) -> AsyncIterator[Backend]:
    """An engine running ``scheduler``, for as long as the block runs; stopped on any exit."""
    if args.in_process:
        from flockctl.engine.config import EngineConfig
        from flockctl.engine.loader import load_engine

        config = EngineConfig(
            model=args.model,
            scheduler=scheduler,
            max_batch_size=args.max_batch_size,
            starvation_limit=args.starvation_limit,
        )
        engine = await asyncio.to_thread(load_engine, config, False)
        try:
            yield InProcessBackend(engine)
        finally:
            engine.close()
        return

    port = free_port()
    # `flockctl engine serve` without the rest of the CLI: it starts sooner
    argv = [sys.executable, "-m", "flockctl.engine.cli", "serve", "--model", args.model]
    argv += ["--scheduler", scheduler, "--max-batch-size", str(args.max_batch_size)]
    argv += ["--port", str(port), "--host", HOST]
    if args.engine_threads:
        argv += ["--threads", str(args.engine_threads)]
    if scheduler == "mlfq":
        argv += ["--starvation-limit", str(args.starvation_limit)]
    server = Server(f"engine-{scheduler}", argv, logs)
    base = f"http://{HOST}:{port}"
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                await wait_healthy(session, base, server)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{exc} (python bench/scheduler.py --in-process measures the same engine"
                    " without its HTTP server)"
                ) from None
            say(f"{server.name} serving at {base} (pid {server.proc.pid})")
            yield HttpBackend(session, base, server.proc.pid)
            server.check()
    finally:
        server.stop()


# -- load ----------------------------------------------------------------------------------------


async def closed_loop(
    backend: Backend, clients: int, warmup: float, window: float, seed: int
) -> dict[str, Any]:
    """Keep ``clients`` jobs of the length mix outstanding; measure the engine's token rate over
    ``window`` seconds after ``warmup``. Waits for the outstanding jobs before returning, so the
    engine is idle again."""
    rng = random.Random(f"{seed}/closed-loop")
    stopping = False
    failures: list[str] = []

    async def client() -> None:
        while not stopping:
            try:
                await backend.generate(rng.choice(PROMPTS), draw_length(rng))
            except JobFailed as exc:
                failures.append(str(exc))
                return

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    try:
        await asyncio.sleep(warmup)
        before = await backend.stats()
        cpu = cpu_seconds(backend.process)
        start = time.perf_counter()
        await asyncio.sleep(window)
        after = await backend.stats()
        seconds = time.perf_counter() - start
        cpu = cpu_seconds(backend.process) - cpu
        stopping = True
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    if failures:
        raise RuntimeError(f"the closed loop failed: {failures[0]}")
    tokens = after["tokens_generated"] - before["tokens_generated"]
    iterations = after["iterations"] - before["iterations"]
    if not iterations:
        raise RuntimeError(f"the engine ran no iteration in {seconds:.1f} s of closed loop")
    tokens_per_s = tokens / seconds
    return {
        "clients": clients,
        "window_s": round(seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "iterations_per_s": round(iterations / seconds, 1),
        "tokens_per_iteration": round(tokens / iterations, 3),
        "jobs_per_s": round(tokens_per_s / MEAN_OUTPUT_TOKENS, 3),
        "engine_cores_used": round(cpu / seconds, 2),
    }


@dataclass
class Outcome:
    """One job of an open-loop run: when it was sent and answered (client clock), and the
    figures the engine gave for it."""

    arrival: Arrival
    sent: float = 0.0
    done: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # the MLFQ level it was admitted at and the one it finished in (0 and 0 under FCFS)
    levels: tuple[int | None, int | None] = (None, None)

    @property
    def jct(self) -> float:
        return self.done - self.sent


async def open_loop(backend: Backend, trace: list[Arrival], label: str) -> list[Outcome]:
    """Send every job of ``trace`` at its time, whatever the engine's state; wait for all."""
    outcomes = [Outcome(a) for a in trace]
    clock = time.perf_counter
    start = clock()
    finished = 0

    async def one(outcome: Outcome) -> None:
        nonlocal finished
        outcome.sent = clock()
        try:
            outcome.figures = await backend.generate(
                outcome.arrival.prompt, outcome.arrival.max_new_tokens
            )
        except JobFailed as exc:
            outcome.error = str(exc)
        outcome.done = clock()
        finished += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            sent = sum(1 for o in outcomes if o.sent)
            with contextlib.suppress(aiohttp.ClientError, OSError):
                s = await backend.stats()
                say(
                    f"{label}: {clock() - start:5.1f}s  sent {sent}/{len(trace)}  done {finished}"
                    f"  engine running {s['running']} waiting {s['waiting']}"
                    f"  queues {s['queue_lengths']}"
                )

    reporter = asyncio.ensure_future(progress())
    tasks = []
    try:
        for outcome in outcomes:
            delay = start + outcome.arrival.at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(outcome)))
        await asyncio.gather(*tasks)
    finally:
        reporter.cancel()
        for task in tasks:
            task.cancel()
    return outcomes


def jct_summary(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    return {
        "jobs": len(values),
        "mean": _r(mean(values)),
        "p50": _r(percentile(values, 50)),
        "p99": _r(percentile(values, 99)),
    }


def summarize_run(
    outcomes: list[Outcome], start_trace: float, before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    good = [o for o in outcomes if o.error is None]
    errors = [o for o in outcomes if o.error is not None]
    first = min(o.sent for o in outcomes)
    last = max(o.done for o in outcomes)
    seconds = last - first
    tokens = sum(int(o.figures.get("generated_tokens", 0)) for o in good)
    wrong_length = sum(
        1 for o in good if o.figures.get("generated_tokens") != o.arrival.max_new_tokens
    )
    server_jct = [o.figures["completion_time"] for o in good if o.figures.get("completion_time")]
    lag = max(o.sent - start_trace - o.arrival.at for o in outcomes)
    preemptions = {
        kind: after["preemptions_total"][kind] - before["preemptions_total"].get(kind, 0)
        for kind in after["preemptions_total"]
    }
    row: dict[str, Any] = {
        "jobs": len(outcomes),
        "errors": len(errors),
        "wrong_length": wrong_length,
        "jct_s": jct_summary([o.jct for o in good]),
        "short_jct_s": jct_summary([o.jct for o in good if not o.arrival.long]),
        "long_jct_s": jct_summary([o.jct for o in good if o.arrival.long]),
        "server_jct_s": jct_summary(server_jct),
        "server_queue_time_s": {
            "mean": _r(mean([float(o.figures.get("queue_time") or 0.0) for o in good]))
        },
        "throughput": {
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "jobs_per_s": round(len(good) / seconds, 3) if seconds else None,
        },
        "preemptions": {**preemptions, "total": sum(preemptions.values())},
        "preempted_jobs": sum(1 for o in good if o.figures.get("preemption_count")),
        "engine_iterations": after["iterations"] - before["iterations"],
        "max_dispatch_lag_ms": round(lag * 1000, 1),
        # per job of the trace, in its order: [output tokens, JCT s, preemptions, level at
        # admission, level at the end]; which jobs a scheduler made wait, and where they sat,
        # shows here, where the summaries only give the classes
        "job_jct_s": [
            [o.arrival.max_new_tokens, _r(o.jct), o.figures.get("preemption_count"), *o.levels]
            for o in outcomes
        ],
    }
    if errors:
        row["first_error"] = errors[0].error
    return row


def progress_line(scheduler: str, row: dict[str, Any]) -> str:
    jct, short, long = row["jct_s"], row["short_jct_s"], row["long_jct_s"]
    line = (
        f"{scheduler}: JCT mean {jct['mean']} s p99 {jct['p99']} s; short mean {short['mean']} s"
        f" p99 {short['p99']} s; long mean {long['mean']} s p99 {long['p99']} s;"
        f" {row['throughput']['tokens_per_s']} tokens/s; preemptions {row['preemptions']['total']}"
    )
    if row["errors"]:
        line += f"; ERRORS {row['errors']} ({row.get('first_error')})"
    return line


def simulate(
    trace: list[Arrival],
    scheduler: str,
    batch: int,
    iteration_s: float,
    mlfq: dict[str, Any],
) -> dict[str, Any]:
    """The engine's own scheduler classes on a fake clock, fed ``trace``: every iteration costs
    ``iteration_s`` and gives each of the first ``batch`` jobs in the scheduler's order a token
    (no prefill cost, KV never short). What the policy alone does with these jobs, free of the
    host's noise; a measured speedup far below it points at the engine, not the policy.

    The MLFQ's base quantum is ``iteration_s`` itself, as the engine keeps its own at one decode
    iteration of its own pace: ``mlfq`` gives only the levels and the starvation limit. (Its
    ``quanta_ms`` time the engine's decode steps alone, a third to two thirds of what an
    iteration of the closed loop costs on a busy host; taken as the quanta here, they sent
    20-token jobs to the last level behind the long ones.)"""
    from flockctl.engine.job import Job, SamplingParams
    from flockctl.engine.scheduler import make_scheduler

    policy = make_scheduler(
        scheduler,
        base_quantum=iteration_s,
        predict_prefill=lambda _tokens: 0.0,
        levels=mlfq["levels"],
        starvation_limit=mlfq["starvation_limit_s"],
    )
    jct = [0.0] * len(trace)
    now = 0.0
    upcoming = 0
    while upcoming < len(trace) or policy.jobs:
        while upcoming < len(trace) and trace[upcoming].at <= now:
            arrival = trace[upcoming]
            params = SamplingParams(max_tokens=arrival.max_new_tokens)
            policy.add(Job([0], params, id=str(upcoming), arrival=arrival.at), arrival.at)
            upcoming += 1
        if not policy.jobs:
            now = trace[upcoming].at
            continue
        running = policy.order(now)[:batch]
        now += iteration_s
        for job in running:
            policy.charge(job, iteration_s, now)
            job.output_ids.append(0)
            if len(job.output_ids) == job.params.max_tokens:
                policy.remove(job)
                jct[int(job.id)] = now - job.arrival
    return {
        "jct_s": jct_summary(jct),
        "short_jct_s": jct_summary([t for t, a in zip(jct, trace, strict=True) if not a.long]),
        "long_jct_s": jct_summary([t for t, a in zip(jct, trace, strict=True) if a.long]),
    }


async def measure_capacity(
    backend: Backend, scheduler: str, args: argparse.Namespace, when: str = "before the trace"
) -> dict[str, Any]:
    """Tokens/s this engine gives the job mix at a full batch (a closed loop of ``2 * batch``
    clients), beside what its start-up profile of one decode step implies."""
    clients = 2 * args.max_batch_size
    say(f"{scheduler}: closed loop of {clients} clients to measure capacity {when}")
    measured = await closed_loop(
        backend, clients, args.closed_loop_warmup, args.capacity_window, args.seed
    )
    profile = (await backend.stats(detailed=True))["profile"]
    measured["iteration_ms"] = round(1000 / measured["iterations_per_s"], 3)
    measured["profile_decode_ms"] = profile["decode_ms"]
    measured["from_profile_jobs_per_s"] = round(
        profile["decode_batch"] * 1000 / profile["decode_ms"] / MEAN_OUTPUT_TOKENS, 3
    )
    say(
        f"{scheduler}: capacity {measured['tokens_per_s']} tokens/s ="
        f" {measured['jobs_per_s']} jobs/s at {MEAN_OUTPUT_TOKENS:.1f} tokens a job"
        f" (profile's decode step says {measured['from_profile_jobs_per_s']} jobs/s)"
    )
    return measured


def trace_for(args: argparse.Namespace, tokens_per_s: float) -> tuple[list[Arrival], float]:
    """The trace that offers ``--load`` of ``tokens_per_s`` with this seed's jobs, and its rate
    in jobs/s."""
    expected_rate = args.load * tokens_per_s / MEAN_OUTPUT_TOKENS
    jobs = args.jobs or max(1, round(expected_rate * args.duration))
    lengths = trace_lengths(jobs, args.seed)
    rate = args.load * tokens_per_s * len(lengths) / sum(lengths)
    trace = make_trace(lengths, rate, args.seed)
    say(
        f"trace: {jobs} jobs at {rate:.2f} jobs/s ({args.load:g} of {tokens_per_s:.1f} tokens/s)"
        f" over {trace[-1].at:.1f} s, {sum(a.long for a in trace)} long"
    )
    return trace, rate


async def record_levels(backend: Backend, outcomes: list[Outcome]) -> None:
    """Each finished job's level at admission and at its end, from the engine's job detail."""
    for o in outcomes:
        job_id = o.figures.get("job_id")
        if o.error is not None or not job_id:
            continue
        detail = await backend.job(str(job_id))
        if detail is None:
            continue
        admitted = next((e["detail"] for e in detail["events"] if e["event"] == "admitted"), None)
        o.levels = (admitted, detail["level"])


async def run_trace(backend: Backend, trace: list[Arrival], scheduler: str) -> dict[str, Any]:
    """Send ``trace`` open loop; the run's figures with the engine's CPU use and the host's
    load average at its start and end."""
    before = await backend.stats()
    cpu, load = cpu_seconds(backend.process), os.getloadavg()[0]
    start = time.perf_counter()
    outcomes = await open_loop(backend, trace, scheduler)
    after = await backend.stats(detailed=True)
    await record_levels(backend, outcomes)
    row = summarize_run(outcomes, start, before, after)
    busy = row["throughput"]["seconds"]
    row["engine_cores_used"] = round((cpu_seconds(backend.process) - cpu) / busy, 2)
    row["load_average_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    row["scheduler_detail"] = after.get("scheduler_detail")
    row["profile_decode_ms"] = after.get("profile", {}).get("decode_ms")
    row["decode_ms_recent"] = after.get("decode_ms_recent")
    say(progress_line(scheduler, row))
    return row


async def compare_schedulers(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    capacity: dict[str, Any] = {}
    after: dict[str, dict[str, Any]] = {}
    if args.side_by_side:
        # Both engines at once, each on its share of the cores: whatever else loads the host
        # loads both alike, so the ratios hold where one-after-the-other runs would not.
        async with contextlib.AsyncExitStack() as stack:
            backends = {
                name: await stack.enter_async_context(engine_backend(args, name, logs))
                for name in SCHEDULERS
            }
            measured = await asyncio.gather(
                *(measure_capacity(backends[name], name, args) for name in SCHEDULERS)
            )
            capacity.update(zip(SCHEDULERS, measured, strict=True))
            reference = sum(c["tokens_per_s"] for c in measured) / len(measured)
            trace, rate = trace_for(args, reference)
            rows = await asyncio.gather(
                *(run_trace(backends[name], trace, name) for name in SCHEDULERS)
            )
            runs.update(zip(SCHEDULERS, rows, strict=True))
            again = await asyncio.gather(
                *(measure_capacity(backends[n], n, args, "after the trace") for n in SCHEDULERS)
            )
            after.update(zip(SCHEDULERS, again, strict=True))
    else:
        trace = []
        rate = reference = 0.0
        for scheduler in SCHEDULERS:
            async with engine_backend(args, scheduler, logs) as backend:
                capacity[scheduler] = await measure_capacity(backend, scheduler, args)
                if not trace:
                    reference = capacity[scheduler]["tokens_per_s"]
                    trace, rate = trace_for(args, reference)
                runs[scheduler] = await run_trace(backend, trace, scheduler)
                after[scheduler] = await measure_capacity(
                    backend, scheduler, args, "after the trace"
                )
    capacity["reference_tokens_per_s"] = round(reference, 1)
    # The host's other tenants come and go: the same closed loop after the trace says what
    # the load really was if they changed meanwhile.
    capacity["after_trace_tokens_per_s"] = {n: after[n]["tokens_per_s"] for n in SCHEDULERS}
    reference_after = sum(after[n]["tokens_per_s"] for n in SCHEDULERS) / len(SCHEDULERS)

    tokens = [a.max_new_tokens for a in trace]
    offered = sum(tokens) / trace[-1].at
    fcfs, mlfq = runs["fcfs"], runs["mlfq"]
    iteration_s = capacity["fcfs"]["iteration_ms"] / 1000
    simulated: dict[str, Any] = {
        name: simulate(trace, name, args.max_batch_size, iteration_s, mlfq["scheduler_detail"])
        for name in SCHEDULERS
    }
    simulated["iteration_ms"] = round(iteration_s * 1000, 3)
    simulated["mean_jct_speedup"] = _ratio(
        simulated["fcfs"]["jct_s"]["mean"], simulated["mlfq"]["jct_s"]["mean"]
    )
    simulated["p99_jct_speedup"] = _ratio(
        simulated["fcfs"]["jct_s"]["p99"], simulated["mlfq"]["jct_s"]["p99"]
    )
    say(
        f"simulated at {simulated['iteration_ms']} ms an iteration: MLFQ mean JCT speedup"
        f" {simulated['mean_jct_speedup']}, p99 {simulated['p99_jct_speedup']}"
    )
    return {
        "side_by_side": args.side_by_side,
        "capacity": capacity,
        "arrival_rate_jobs_per_s": round(rate, 3),
        "trace": {
            "jobs": len(trace),
            "long_jobs": sum(a.long for a in trace),
            "arrival_window_s": round(trace[-1].at, 3),
            "mean_output_tokens": round(sum(tokens) / len(tokens), 2),
            "offered_tokens_per_s": round(offered, 1),
            "offered_load": round(offered / reference, 3),
            "offered_load_after": round(offered / reference_after, 3),
        },
        "runs": runs,
        "simulated": simulated,
        "mlfq_vs_fcfs": {
            "mean_jct_speedup": _ratio(fcfs["jct_s"]["mean"], mlfq["jct_s"]["mean"]),
            "p99_jct_speedup": _ratio(fcfs["jct_s"]["p99"], mlfq["jct_s"]["p99"]),
            "short_mean_jct_speedup": _ratio(
                fcfs["short_jct_s"]["mean"], mlfq["short_jct_s"]["mean"]
            ),
            "long_mean_jct_speedup": _ratio(fcfs["long_jct_s"]["mean"], mlfq["long_jct_s"]["mean"]),
            "throughput_ratio": _ratio(
                mlfq["throughput"]["tokens_per_s"], fcfs["throughput"]["tokens_per_s"]
            ),
        },
    }


# -- decode throughput against transformers --------------------------------------------------------


def decode_prompts(tokenizer: Any, batch: int, length: int) -> list[list[int]]:
    """``batch`` different windows of ``length`` tokens of the snippets, end to end, repeated."""
    ids = tokenizer.encode("\n".join(PROMPTS) + "\n")
    ids *= -(-batch * length // len(ids))
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


async def engine_decode(
    engine: Engine, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """Submit every prompt at once; seconds until the last is done, and each job's tokens."""
    from flockctl.engine.job import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    start = time.perf_counter()
    handles = [engine.submit(p, params) for p in prompts]
    outputs = await asyncio.gather(*(job_tokens(h) for h in handles))
    return time.perf_counter() - start, list(outputs)


def hf_decode(
    model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int
) -> tuple[float, list[list[int]]]:
    import torch

    input_ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # EOS is suppressed until then: exact lengths
            do_sample=False,
            pad_token_id=pad_id,
        )
        seconds = time.perf_counter() - start
    return seconds, out[:, input_ids.shape[1] :].tolist()


async def compare_decode(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from flockctl.engine.config import EngineConfig
    from flockctl.engine.loader import load_engine

    say(f"decode: loading {args.model} in this process (max_batch_size {DECODE_BATCH})")
    config = EngineConfig(model=args.model, max_batch_size=DECODE_BATCH)
    engine = await asyncio.to_thread(load_engine, config, False)
    try:
        model, tokenizer = engine.model, engine.tokenizer
        prompts = decode_prompts(tokenizer, DECODE_BATCH, DECODE_PROMPT_TOKENS)
        new = args.decode_tokens
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id or 0
        transformers.logging.set_verbosity_error()  # generate() warns about unused sampling flags
        engine_times: list[float] = []
        hf_times: list[float] = []
        engine_out: list[list[int]] = []
        hf_out: list[list[int]] = []
        tokens = DECODE_BATCH * new
        for run in range(args.decode_runs + 1):  # run 0 warms both up
            engine_s, engine_out = await engine_decode(engine, prompts, new)
            hf_s, hf_out = hf_decode(model, prompts, new, pad_id)
            if run:
                engine_times.append(engine_s)
                hf_times.append(hf_s)
            say(
                f"decode {f'run {run}' if run else 'warm-up'}: engine {tokens / engine_s:.0f}"
                f" tokens/s, transformers {tokens / hf_s:.0f} tokens/s"
            )
        lengths = {len(o) for o in engine_out + hf_out}
        if lengths != {new}:
            raise RuntimeError(f"decode runs generated {sorted(lengths)} tokens, not {new}")
        agree = [
            next((i for i, (a, b) in enumerate(zip(e, h, strict=True)) if a != b), new)
            for e, h in zip(engine_out, hf_out, strict=True)
        ]
        engine_tps = tokens / min(engine_times)
        hf_tps = tokens / min(hf_times)
        cfg = model.config
        return {
            "model": {
                "path": _model_path(args.model),
                "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "vocab": cfg.vocab_size,
                "params": sum(p.numel() for p in model.parameters()),
                "dtype": str(engine.dtype).removeprefix("torch."),
            },
            "device": str(engine.device),
            "torch_threads": torch.get_num_threads(),
            "batch": DECODE_BATCH,
            "prompt_tokens": DECODE_PROMPT_TOKENS,
            "new_tokens": new,
            "runs": args.decode_runs,
            "engine_tokens_per_s": round(engine_tps, 1),
            "transformers_tokens_per_s": round(hf_tps, 1),
            "engine_seconds": [round(t, 4) for t in engine_times],
            "transformers_seconds": [round(t, 4) for t in hf_times],
            "engine_vs_transformers": round(engine_tps / hf_tps, 3),
            "greedy_tokens_equal": sum(a == new for a in agree),
            "first_difference_at": agree,
        }
    finally:
        engine.close()


def _model_path(model: str) -> str:
    if model == "demo":
        from flockctl.engine.demo import ensure_demo

        return str(ensure_demo(progress=False).target)
    return model


# -- the whole run ---------------------------------------------------------------------------------


def targets(
    schedulers: dict[str, Any], decode: dict[str, Any] | None, load: float
) -> dict[str, Any]:
    """MLFQ's targets against FCFS on this trace (its mean JCT gain is asked for at high load
    only: below it, little queues and there is less to gain), and decode's if it ran."""
    vs = schedulers["mlfq_vs_fcfs"]
    runs = schedulers["runs"]
    mean_target = TARGET_MEAN_JCT_SPEEDUP if load >= 0.9 else TARGET_MEAN_JCT_SPEEDUP_LOW_LOAD
    checks = {
        "mlfq_mean_jct_speedup": (vs["mean_jct_speedup"], mean_target),
        "mlfq_p99_jct_speedup": (vs["p99_jct_speedup"], TARGET_P99_JCT_SPEEDUP),
        "mlfq_long_mean_jct_speedup": (vs["long_mean_jct_speedup"], TARGET_LONG_JCT_SPEEDUP),
        "mlfq_throughput_ratio": (vs["throughput_ratio"], TARGET_THROUGHPUT_RATIO),
    }
    if decode is not None:
        checks["engine_vs_transformers_decode"] = (
            decode["engine_vs_transformers"],
            TARGET_DECODE_RATIO,
        )
    out: dict[str, Any] = {
        name: {"value": value, "min": limit, "pass": value is not None and value >= limit}
        for name, (value, limit) in checks.items()
    }
    out["no_errors"] = not any(r["errors"] or r["wrong_length"] for r in runs.values())
    out["met"] = out["no_errors"] and all(out[name]["pass"] for name in checks)
    return out


async def bench(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    # SIGTERM ends the run the way Ctrl-C does: the task is cancelled, `finally` blocks run.
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.model == "demo":
        from flockctl.engine.demo import ensure_demo

        ensure_demo()  # build once here, rather than inside a server's health-check timeout
    schedulers = await compare_schedulers(args, logs)
    decode = await compare_decode(args) if args.decode else None
    return {"schedulers": schedulers, "decode": decode}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/scheduler.py",
        description="Compare FCFS and MLFQ job completion times on one engine, and the engine's"
        " batched decode against transformers' generate().",
    )
    parser.add_argument(
        "--model", default="demo", help="model to serve: demo, a local path or a hub id"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=4, help="engine batch for the comparison (default 4)"
    )
    parser.add_argument(
        "--load", type=float, default=0.9, help="arrival rate as a fraction of capacity (0.9)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=90.0,
        help="seconds of arrivals per scheduler (default 90)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs in the trace (instead of --duration)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace (default 0)")
    parser.add_argument(
        "--long-fraction",
        type=float,
        default=LONG_FRACTION,
        help=f"share of long jobs in the mix (default {LONG_FRACTION})",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=list(LONG_TOKENS),
        help=f"output tokens of a long job (default {LONG_TOKENS[0]} {LONG_TOKENS[1]})",
    )
    parser.add_argument(
        "--starvation-limit",
        type=float,
        default=5.0,
        help="the MLFQ engine's --starvation-limit in seconds (default 5)",
    )
    parser.add_argument(
        "--one-at-a-time",
        dest="side_by_side",
        action="store_false",
        help="run the FCFS engine, then the MLFQ engine (default: both at once, on the same"
        " trace, each with half the cores)",
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="torch threads of each engine (default: half the cores side by side, else torch's)",
    )
    parser.add_argument(
        "--no-decode", dest="decode", action="store_false", help="skip part 2 (decode throughput)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="drive load_engine() in this process instead of `flockctl engine serve`",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 6 s of arrivals, 3 s capacity window, one 32-token decode run",
    )
    args = parser.parse_args(argv)
    args.closed_loop_warmup, args.capacity_window = CLOSED_LOOP_WARMUP_S, CAPACITY_WINDOW_S
    args.decode_tokens, args.decode_runs = DECODE_NEW_TOKENS, DECODE_RUNS
    if args.quick:
        args.duration, args.closed_loop_warmup, args.capacity_window = 6.0, 1.0, 3.0
        args.decode_tokens, args.decode_runs = 32, 1
    if args.max_batch_size < 1 or args.load <= 0 or args.duration <= 0:
        parser.error("--max-batch-size must be at least 1, --load and --duration positive")
    if args.in_process:
        args.side_by_side = False  # one process, one event loop: the engines would share a GIL
    if args.engine_threads is None and args.side_by_side:
        args.engine_threads = max(1, (os.cpu_count() or 2) // len(SCHEDULERS))
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.model != "demo" and Path(args.model).exists():  # servers run in a temporary dir
        args.model = str(Path(args.model).resolve())
    return args


def set_mix(long_fraction: float, long_tokens: tuple[int, int]) -> None:
    """Use another length mix than the default (``--long-fraction``, ``--long-tokens``)."""
    global LONG_FRACTION, LONG_TOKENS, MEAN_OUTPUT_TOKENS
    LONG_FRACTION, LONG_TOKENS = long_fraction, long_tokens
    MEAN_OUTPUT_TOKENS = (1 - LONG_FRACTION) * sum(SHORT_TOKENS) / 2 + LONG_FRACTION * sum(
        LONG_TOKENS
    ) / 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_mix(args.long_fraction, tuple(args.long_tokens))
    runner: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flockctl-bench-") as tmp:
        try:
            measured = runner(bench(args, Path(tmp)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            say("interrupted; the engine servers are stopped")
            return 130
        except (RuntimeError, aiohttp.ClientError, OSError) as exc:
            say(f"failed: {exc or type(exc).__name__}")
            return 1
    schedulers, decode = measured["schedulers"], measured["decode"]
    report = {
        "machine": {
            **machine(),
            **(
                {"device": decode["device"], "torch_threads": decode["torch_threads"]}
                if decode
                else {}
            ),
        },
        "model": {"name": args.model, **(decode["model"] if decode else {})},
        "settings": {
            "mode": "in-process" if args.in_process else "http",
            "side_by_side": args.side_by_side,
            "engine_threads": args.engine_threads,
            "starvation_limit_s": args.starvation_limit,
            "max_batch_size": args.max_batch_size,
            "load": args.load,
            "duration_s": args.duration,
            "jobs": args.jobs,
            "seed": args.seed,
            "output_tokens": {
                "short": list(SHORT_TOKENS),
                "long": list(LONG_TOKENS),
                "long_fraction": LONG_FRACTION,
                "mean": round(MEAN_OUTPUT_TOKENS, 2),
            },
            "capacity_window_s": args.capacity_window,
        },
        "schedulers": schedulers,
        "decode": decode,
        "targets": targets(schedulers, decode, args.load),
        "wall_s": round(time.monotonic() - started, 1),
    }
    vs, met = schedulers["mlfq_vs_fcfs"], report["targets"]["met"]
    say(
        f"MLFQ against FCFS: mean JCT x{vs['mean_jct_speedup']}"
        f" (target x{report['targets']['mlfq_mean_jct_speedup']['min']:g}),"
        f" p99 x{vs['p99_jct_speedup']},"
        f" long x{vs['long_mean_jct_speedup']}, throughput x{vs['throughput_ratio']};"
        + (f" decode engine/transformers {decode['engine_vs_transformers']};" if decode else "")
        + f" targets met: {met}; offered load {schedulers['trace']['offered_load']} of the"
        f" capacity measured before the trace, {schedulers['trace']['offered_load_after']} after"
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
