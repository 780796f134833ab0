"""One simulation: a trace replayed through the daemon's own controller, pool and policies.

The objects are the daemon's, built as ``flockctl up`` builds them from the same config:
``Controller`` (launch, drain, scale-down order, demand floor, crash-loop guard), the autoscaler
policy from ``make_autoscaler``, the balancing policy, and ``WorkerPool`` (capacity, the bounded
admission queue, queue timeout, 429 and 503). They run on ``SimulatedLoop``, whose clock is the
simulated one, and every clock they take is that loop's. Only the edges are simulated: the
provisioner (a launch takes the PROVISIONING part of the cold start, a spot worker may be
preempted), the prober (a STARTING worker is READY when its cold start ends) and the worker
itself (``EngineModel``). A request walks the balancer's path: counted as arrived, a slot from
``pool.acquire``, retried on another worker if its worker is lost before the first token, and
its first byte and end reported to the policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from flockctl.server.config import DeploymentConfig
from flockctl.server.controller import Controller
from flockctl.server.deployment import make_autoscaler
from flockctl.server.policies import (
    BalancingPolicy,
    Latency,
    PolicySettings,
    PowerOfTwo,
    make_policy,
)
from flockctl.server.pool import NoWorker, QueueFull, WorkerPool
from flockctl.server.provisioners.base import ALIVE, Provisioner, ResourceHealth
from flockctl.server.simulate.clock import SimulatedLoop
from flockctl.server.simulate.service import EngineModel, ServiceModel, WorkerLost
from flockctl.server.simulate.trace import Trace
from flockctl.server.workers import Worker, WorkerState


@dataclass
class ScaleEvent:
    t: float
    before: int
    after: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "from": self.before, "to": self.after, "reason": self.reason}


@dataclass
class Sample:
    """The deployment at one instant of simulated time (for the plot)."""

    t: float
    live: int
    ready: int
    queued: int
    in_flight: int


@dataclass
class Raw:
    """What one simulation recorded, before any statistics."""

    duration: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    #: Per request served: arrival, time to first token, end-to-end latency.
    served: list[tuple[float, float, float]] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=lambda: {429: 0, 503: 0})
    #: Requests whose worker went away after their first token (a spot preemption).
    failed: int = 0
    retried: int = 0
    worker_seconds: float = 0.0
    cost: float = 0.0
    max_workers: int = 0
    preempted: int = 0
    scale_events: list[ScaleEvent] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Lifetime:
    """When a simulated worker was launched, and when it ended (None while it runs)."""

    launched: float
    ended: float | None = None


class SimProvisioner(Provisioner):
    """Workers that exist only in the simulation; it keeps the books of their running time."""

    name = "simulated"

    def __init__(
        self,
        model: ServiceModel,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        warm: bool = True,
    ):
        self.model = model
        self.loop = loop
        self.rng = rng
        #: Whether the workers there at the start are up already (a deployment serving the
        #: traffic before the trace begins); else they launch at the start like any other.
        self.warm = warm
        self.lifetimes: dict[str, Lifetime] = {}
        self._lost: set[str] = set()
        self.preempted = 0

    async def launch(self, worker: Worker) -> None:
        self.lifetimes[worker.id] = Lifetime(self.loop.time())
        worker.spot = self.model.spot_price_per_hour is not None or None
        if not self.at_start():
            await asyncio.sleep(self.model.provisioning_s)
        worker.url = f"sim://{worker.id}"
        worker.handle = EngineModel(self.model, self.loop)
        rate = self.model.preemptions_per_hour
        if worker.spot and rate > 0:
            self.loop.call_later(self.rng.expovariate(rate / 3600.0), self._preempt, worker)

    def at_start(self) -> bool:
        """Whether a worker launched now is one of the warm ones there at the start."""
        return self.warm and self.loop.time() == 0.0

    def _preempt(self, worker: Worker) -> None:
        if self.lifetimes[worker.id].ended is not None:
            return
        self._lost.add(worker.id)
        self.preempted += 1
        self.lifetimes[worker.id].ended = self.loop.time()  # the cloud stops billing it now
        worker.handle.lose()

    async def terminate(self, worker: Worker) -> None:
        times = self.lifetimes.get(worker.id)
        if times is not None and times.ended is None:
            times.ended = self.loop.time()
            if isinstance(worker.handle, EngineModel):
                worker.handle.lose()

    def health(self, worker: Worker) -> ResourceHealth:
        if worker.id in self._lost:
            return ResourceHealth(False, "spot machine preempted (simulated)", preempted=True)
        return ALIVE

    def worker_seconds(self, end: float) -> float:
        return math.fsum(
            (end if t.ended is None else t.ended) - t.launched for t in self.lifetimes.values()
        )


class SimProber:
    """A STARTING worker turns READY when the rest of its cold start has passed."""

    def __init__(self, pool: WorkerPool, provisioner: SimProvisioner) -> None:
        self.pool = pool
        self.model = provisioner.model
        self.loop = provisioner.loop
        self.provisioner = provisioner

    def watch(self, worker: Worker) -> None:
        worker.reported_capacity = self.model.worker_capacity
        if self.provisioner.at_start():
            self._ready(worker)
            return
        delay = self.model.cold_start_s - self.model.provisioning_s
        self.loop.call_later(delay, self._ready, worker)

    def _ready(self, worker: Worker) -> None:
        if worker.state == WorkerState.STARTING:
            self.pool.set_state(worker, WorkerState.READY)


def balancing_policy(
    cfg: DeploymentConfig, seed: int, loop: asyncio.AbstractEventLoop
) -> BalancingPolicy:
    """The policy ``flockctl up`` would make, its randomness seeded and its clock the loop's."""
    if cfg.policy == "latency":
        return Latency(cfg.latency_decay, random.Random(seed), loop.time)
    if cfg.policy == "power-of-two":
        return PowerOfTwo(random.Random(seed))
    routing = PolicySettings(cfg.prefix_min_match, cfg.prefix_balance, cfg.prefix_tree_chars)
    return make_policy(cfg.policy, routing)


class Simulation:
    def __init__(
        self,
        trace: Trace,
        cfg: DeploymentConfig,
        model: ServiceModel,
        seed: int = 0,
        samples: int = 120,
        warm: bool = True,
    ) -> None:
        self.trace = trace
        self.cfg = cfg
        self.model = model
        self.seed = seed
        self.loop = SimulatedLoop()
        self.raw = Raw()
        self.pool = WorkerPool(
            balancing_policy(cfg, seed, self.loop),
            cfg.worker_capacity,
            cfg.max_queue,
            clock=self.loop.time,
        )
        self.provisioner = SimProvisioner(model, self.loop, random.Random(seed + 1), warm)
        self.controller = Controller(
            self.pool,
            self.provisioner,
            make_autoscaler(cfg),
            SimProber(self.pool, self.provisioner),  # type: ignore[arg-type]
            initial_target=cfg.initial_target(),
            drain_timeout=cfg.drain_timeout,
            max_start_failures=cfg.max_start_failures,
            replace_after=cfg.replace_after,
            clock=self.loop.time,
        )
        self._record_decisions()
        self.pool.on_transition(self._count_live)
        self.sample_every = max(trace.duration / max(samples, 1), 0.25)
        self._pending = 0
        self._all_done: asyncio.Future[None] | None = None

    def _record_decisions(self) -> None:
        """Note every change of the target with the autoscaler's reason for it."""
        controller = self.controller
        apply = controller.apply

        def recording(decision: Any) -> None:
            before = controller.target
            apply(decision)
            if decision.target != before:
                event = ScaleEvent(self.loop.time(), before, decision.target, decision.reason)
                self.raw.scale_events.append(event)

        controller.apply = recording  # type: ignore[method-assign]

    def _count_live(self, worker: Worker, old: WorkerState) -> None:
        if worker.state == WorkerState.PROVISIONING:
            self.raw.max_workers = max(self.raw.max_workers, len(self.pool.live()))

    def run(self) -> Raw:
        # The controller's log lines would say what the scale events already say, thousands of
        # times over, stamped with the wall clock.
        quiet = logging.getLogger("flockctl.controller")
        was = quiet.disabled
        quiet.disabled = True
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self._shutdown()
            asyncio.set_event_loop(None)
            self.loop.close()
            quiet.disabled = was
        return self.raw

    async def _main(self) -> None:
        loop = self.loop
        self._all_done = loop.create_future()
        self.controller.start()
        sampler = loop.create_task(self._sample())
        requests = self.trace.requests
        self._pending = len(requests)
        for req in requests:
            delay = req.t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            loop.create_task(self._request(req.t, req.prompt_tokens, req.output_tokens))
        if self._pending:
            await self._all_done
        if loop.time() < self.trace.duration:
            await asyncio.sleep(self.trace.duration - loop.time())
        sampler.cancel()
        end = loop.time()
        self.raw.duration = end
        self.raw.worker_seconds = self.provisioner.worker_seconds(end)
        self.raw.cost = self.raw.worker_seconds * self.model.price_per_hour / 3600.0
        self.raw.preempted = self.provisioner.preempted

    async def _sample(self) -> None:
        pool = self.pool
        while True:
            live = pool.live()
            self.raw.samples.append(
                Sample(
                    self.loop.time(),
                    len(live),
                    sum(1 for w in live if w.state == WorkerState.READY),
                    pool.queued,
                    pool.in_flight,
                )
            )
            await asyncio.sleep(self.sample_every)

    async def _request(self, arrival: float, prompt: int, output: int) -> None:
        try:
            await self._serve(arrival, prompt, output)
        finally:
            self._pending -= 1
            if self._pending == 0 and self._all_done is not None and not self._all_done.done():
                self._all_done.set_result(None)

    async def _serve(self, arrival: float, prompt: int, output: int) -> None:
        loop, pool, raw = self.loop, self.pool, self.raw
        pool.arrived += 1
        raw.arrivals.append(arrival)
        tried: set[Worker] = set()
        deadline = arrival + self.cfg.queue_timeout
        for attempt in range(max(self.cfg.max_attempts, 1)):
            try:
                worker = await pool.acquire(max(deadline - loop.time(), 0.0), tried)
            except QueueFull:
                raw.refused[429] += 1
                return
            except NoWorker:
                raw.refused[503] += 1
                return
            sent = loop.time()
            try:
                engine = worker.handle
                if not isinstance(engine, EngineModel):
                    raise WorkerLost
                job = engine.submit(prompt, output)
                try:
                    await job.first
                except WorkerLost:
                    tried.add(worker)
                    raw.retried += attempt + 1 < self.cfg.max_attempts
                    continue
                first = loop.time()
                pool.policy.observe_first_byte(worker, first - sent)
                try:
                    await job.done
                except WorkerLost:
                    raw.failed += 1
                    return
                end = loop.time()
                pool.policy.observe_end(worker, end - first, max(output, 1))
                worker.served += 1
                raw.served.append((arrival, first - arrival, end - arrival))
                return
            finally:
                pool.release(worker)
        raw.refused[503] += 1

    def _shutdown(self) -> None:
        """Stop what still runs (launches, drains, the controller) without letting it act."""
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def simulate(
    trace: Trace,
    cfg: DeploymentConfig,
    model: ServiceModel,
    seed: int = 0,
    samples: int = 120,
    warm: bool = True,
) -> Raw:
    """Replay ``trace`` through a deployment configured as ``cfg``; workers follow ``model``."""
    return Simulation(trace, cfg, model, seed, samples, warm).run()
