"""The controller: keeps the number of live workers at the autoscaler's target.

Every tick it checks each worker's resource (a local process that exited is FAILED at once, a
spot cluster the cloud took back is PREEMPTED), asks the autoscaler policy for a target once per
``decide_interval``, launches the missing workers and drains the surplus. Where the provisioner
splits workers between spot and on-demand machines (SkyServe's on-demand fallback), each kind is
kept at its own share of the target. A crash loop (``max_start_failures`` workers in a row that
failed before ever being READY) stops launching, and the reason is shown to the user until a
worker is added by hand (``POST /-/workers``) or the deployment is restarted. A preemption is not
the worker's fault and does not count toward it.

Scale-down never strands a request: the policies keep the workers that the requests in flight and
waiting need (``autoscaler.demand_floor``), and while a request waits no worker that is still
coming up (PENDING, PROVISIONING, STARTING) is taken, since that is the worker the request waits
for. Otherwise scale-down takes workers out of rotation first, then those not serving yet, then
idle READY ones, then the least busy. A worker's reason says when this holds it.

A worker NOT_READY for ``replace_after`` seconds is drained, stopped and replaced (the target
stays). Fixed URLs cannot be relaunched: such a worker stays out of rotation until it answers.

Operators steer it through the admin API: add a worker (the target goes up), remove one (the
target goes down), drain one to recycle it (the target stays, so a fresh worker replaces it), or
change the min/max bounds (the target is moved into them at once).

A deployment with worker groups (``flockctl: groups``) runs one controller per group, each with
its own autoscaler policy: it counts, launches, drains and replaces only its own group's workers
(scale-down never picks another group's), and it scales on its own queue (the requests waiting
for its model, which the deployment counts for it). Worker ids are drawn from one sequence
shared by every group.

Every worker belongs to a version of the deployment (1 at ``flockctl up``; ``flockctl update``
makes the next). The controller keeps the workers of its current ``version`` at the target; those
of other versions are an update's to drain (``flockctl.server.update``), which also caps how many
of the current version run at once while it rolls (``update_cap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flockctl.schema import AutoscalerView, DecisionView, SpotView
from flockctl.server.autoscaler import AutoscalerPolicy, Decision, Observation, describe_demand
from flockctl.server.pool import WorkerPool
from flockctl.server.prober import Prober
from flockctl.server.provisioners.base import Provisioner
from flockctl.server.workers import LIVE, Worker, WorkerIds, WorkerState

if TYPE_CHECKING:
    from flockctl.server.update import Update

log = logging.getLogger("flockctl.controller")
S = WorkerState
#: Workers on their way up: what a waiting request is waiting for.
COMING_UP = frozenset({S.PENDING, S.PROVISIONING, S.STARTING})
#: The order scale-down takes workers in, by state (then the least busy, then the newest).
_TAKEN_FIRST = {S.NOT_READY: 0, S.PENDING: 1, S.PROVISIONING: 2, S.STARTING: 3, S.READY: 4}


def scale_down_order(live: list[Worker], waiting: bool) -> list[Worker]:
    """The workers scale-down may take now, first to go first.

    Out of rotation (NOT_READY) first, then those not serving yet, then READY ones, idle before
    busy. While requests wait (``waiting``), no worker coming up is taken at all: a request
    waits for exactly that worker, and stopping it would launch another for the same request.
    """
    takeable = [w for w in live if not (waiting and w.state in COMING_UP)]
    return sorted(takeable, key=lambda w: (_TAKEN_FIRST[w.state], w.in_flight, -w.created_at))


@dataclass(frozen=True)
class WorkerGroup:
    """One group of workers a controller keeps: what they run (``command``, a template, and the
    ``model`` it serves; None for the provisioner's own command) under its ``name``."""

    name: str
    command: str | None = None
    model: str | None = None


@dataclass
class DecisionRecord:
    at: float
    target: int
    reason: str

    def to_dict(self) -> DecisionView:
        return {"at": self.at, "target": self.target, "reason": self.reason}


class Controller:
    def __init__(
        self,
        pool: WorkerPool,
        provisioner: Provisioner,
        policy: AutoscalerPolicy,
        prober: Prober,
        initial_target: int,
        drain_timeout: float = 30.0,
        max_start_failures: int = 3,
        tick: float = 0.25,
        decide_interval: float = 1.0,
        replace_after: float = 180.0,
        clock: Callable[[], float] = time.time,
        group: WorkerGroup | None = None,
        ids: WorkerIds | None = None,
        queue: Callable[[], int] | None = None,
        arrivals: Callable[[], int] | None = None,
        adopts: bool = True,
        group_of: Callable[[Worker], str | None] | None = None,
    ) -> None:
        self.pool = pool
        #: The group this controller keeps; None: every worker of the pool (no groups).
        self.group = group
        self.ids = ids or WorkerIds()
        #: Requests waiting for this group's workers; None: the pool's whole queue.
        self._queue = queue
        #: Requests that arrived for this group so far; None: every request the pool saw.
        self._arrivals = arrivals
        #: Whether this controller re-adopts recorded workers and starts the provisioner (one
        #: controller per deployment does), and which group an adopted worker joins.
        self.adopts = adopts
        self.group_of = group_of
        self.provisioner = provisioner
        self.policy = policy
        self.prober = prober
        self.target = initial_target
        self.drain_timeout = drain_timeout
        self.max_start_failures = max_start_failures
        self.tick = tick
        self.decide_interval = decide_interval
        self.replace_after = replace_after
        #: What each tick's ``now`` is read from: wall-clock seconds, the clock a worker's
        #: ``not_ready_since`` is on. A simulation or a test passes its own.
        self.clock = clock
        self.last_decision = DecisionRecord(time.time(), initial_target, "initial target")
        self.blocked: str | None = None
        self.start_failures = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._launches: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._next_decide = 0.0
        self._stopping = False
        #: Workers the last decision kept for the requests in flight and waiting, and why.
        self._held: tuple[int, str] = (0, "")
        #: The deployment version new workers get; workers of other versions are not counted.
        self.version = 1
        #: While an update rolls: the most workers of ``version`` kept live (None: the target).
        self.update_cap: int | None = None
        #: The update in progress or last run (stepped with the controller, on its clock).
        self.update: Update | None = None
        pool.on_transition(self._on_transition)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.adopts:
            for worker in self.provisioner.adopt():
                self.ids.seen(worker.id)
                if self.group_of is not None:
                    worker.group = self.group_of(worker)
                worker.version = self.version
                self.pool.add(worker)
                self.prober.watch(worker)
                log.info("re-adopted worker %s (pid %s, %s)", worker.id, worker.pid, worker.url)
            self.provisioner.start()
        self._loop_task = asyncio.create_task(self._run(), name="controller")

    async def stop(self, drain: bool = True) -> None:
        """Stop scaling, drain (bounded) and terminate every worker."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._launches.values()):
            task.cancel()
        await asyncio.gather(*self._launches.values(), return_exceptions=True)
        workers = [w for w in self.pool if self.owns(w) and (w.live or w.state == S.DRAINING)]
        await asyncio.gather(
            *(self._drain_and_terminate(w, drain) for w in workers), return_exceptions=True
        )
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                self.step(self.clock())
            except Exception:  # pragma: no cover - a bug must not stop the control loop
                log.exception("controller step failed")
            await asyncio.sleep(self.tick)

    # -- one step ------------------------------------------------------------------------------

    def owns(self, worker: Worker) -> bool:
        """Whether ``worker`` is one of this controller's: of its group, or of no group for the
        deployment's own controller (every worker, in a deployment without groups)."""
        return worker.group == (None if self.group is None else self.group.name)

    def live(self) -> list[Worker]:
        """This controller's live workers of its current version."""
        return [w for w in self.pool.live() if self.owns(w) and w.version == self.version]

    def others(self, states: frozenset[WorkerState] = LIVE) -> list[Worker]:
        """This controller's workers in ``states`` that run another version than its own."""
        return [
            w for w in self.pool if w.state in states and self.owns(w) and w.version != self.version
        ]

    @property
    def serving_version(self) -> int:
        """The version this controller's workers serve: while an update rolls, the one it
        replaces (its new workers are not the group's until it succeeds)."""
        update = self.update
        return update.old if update is not None and update.running else self.version

    @property
    def queued(self) -> int:
        """Requests waiting for this controller's workers."""
        return self._queue() if self._queue is not None else self.pool.queued

    def observe(self) -> Observation:
        live = self.live()
        mine = [w for w in self.pool if self.owns(w)]
        ready = [w for w in live if w.state == S.READY]
        return Observation(
            in_flight=sum(w.in_flight for w in mine),
            queued=self.queued,
            live=len(live),
            ready=len(ready),
            target=self.target,
            arrived=self._arrivals() if self._arrivals is not None else self.pool.arrived,
            worker_capacity=self._capacity(ready),
        )

    def _capacity(self, ready: list[Worker]) -> int:
        """Requests one worker takes, for the demand floor: the flag, else the least any READY
        worker reports; 0 when unknown (then any request needs one worker)."""
        if self.pool.capacity is not None:
            return self.pool.capacity
        known = [w.reported_capacity for w in ready if w.reported_capacity is not None]
        return min(known) if known else 0

    def step(self, now: float) -> None:
        """Check resources, maybe decide, then reconcile the workers with the target."""
        for worker in [w for w in self.pool.live() if self.owns(w)]:
            if worker.state in (S.PENDING, S.PROVISIONING):
                continue
            health = self.provisioner.health(worker)
            if not health.alive:
                state = S.PREEMPTED if health.preempted else S.FAILED
                log.warning("worker %s %s: %s", worker.id, state.value, health.reason)
                self.pool.set_state(worker, state, health.reason)
        self.replace_unready(now)
        if now >= self._next_decide:
            self._next_decide = now + self.decide_interval
            self.apply(self.policy.decide(self.observe(), now))
        if self.update is not None:
            self.update.step(now)
        self.reconcile()

    def apply(self, decision: Decision) -> None:
        if decision.target != self.target:
            log.info(
                "autoscaler: target %d -> %d: %s", self.target, decision.target, decision.reason
            )
        self.target = decision.target
        self._held = (decision.held, decision.held_for)
        self.last_decision = DecisionRecord(time.time(), decision.target, decision.reason)

    def replace_unready(self, now: float) -> None:
        """Replace every worker NOT_READY for ``replace_after`` seconds; keep fixed URLs, which
        cannot be relaunched, out of rotation (NOT_READY already is) until a probe passes."""
        if self._stopping:
            return
        for worker in self.live():
            since = worker.not_ready_since
            if worker.state != S.NOT_READY or since is None or now - since < self.replace_after:
                continue
            if self.provisioner.relaunches:
                self.replace(worker)
                continue
            kept = (
                f"NOT_READY for {self.replace_after:g}s; a static endpoint is kept out of"
                " rotation until it answers"
            )
            if worker.reason != kept:
                log.warning("worker %s (%s): %s", worker.id, worker.url, kept)
                worker.reason = kept

    def replace(self, worker: Worker) -> None:
        """Drain ``worker`` (stopped once drained, by force if it does not stop) and launch its
        replacement at once, of the same kind and command; the target stays."""
        said = f"NOT_READY for {self.replace_after:g}s (replace_after)"
        self.drain(worker)
        if self.blocked is not None:
            worker.reason = f"{said}: drained; not replaced while launching is stopped"
        elif len(self.live()) >= self.target:
            worker.reason = f"{said}: drained; the target needs no replacement"
        else:
            model = worker.model if worker.command is not None else None
            new = self.launch(worker.command, model, spot=worker.spot)
            worker.reason = f"{said}: replaced by {new.id}"
        log.warning("worker %s %s", worker.id, worker.reason)

    def reconcile(self) -> None:
        if self._stopping:
            return
        live = self.live()
        for worker in live:
            worker.held = None
        plan = self.provisioner.spot_plan
        if plan is None:
            want = self.target if self.update_cap is None else min(self.target, self.update_cap)
            self._reconcile(live, want, None)
        else:
            spot = [w for w in live if w.spot]
            ondemand = [w for w in live if not w.spot]
            want_spot, want_ondemand = self.split()
            self._reconcile(spot, want_spot, True)
            self._reconcile(ondemand, want_ondemand, False)
        self._mark_held()

    def _mark_held(self) -> None:
        """Say on the workers the last decision kept for the requests (those scale-down would
        take first), so a user sees why a worker the policy wanted gone is still there."""
        count, needs = self._held
        if not count:
            return
        free = [w for w in self.live() if w.held is None]
        for worker in scale_down_order(free, waiting=False)[:count]:
            worker.held = f"kept: {needs}"

    def split(self) -> tuple[int, int]:
        """The target as (spot, on-demand) workers, under the provisioner's spot plan."""
        plan = self.provisioner.spot_plan
        if plan is None:
            return 0, self.target
        ready_spot = sum(1 for w in self.live() if w.spot and w.state == S.READY)
        return plan.split(self.target, ready_spot)

    def _reconcile(self, live: list[Worker], want: int, spot: bool | None) -> None:
        """Launch or drain workers of one kind until ``want`` of them are live."""
        missing = want - len(live)
        if missing > 0 and self.blocked is None:
            room = self.provisioner.capacity(len(self.pool.live()))
            if room is not None:
                missing = min(missing, room)
            for _ in range(max(missing, 0)):
                self.launch(spot=spot)
        elif missing < 0:
            waiting = self.queued > 0
            taken = scale_down_order(live, waiting)[:-missing]
            spared = [w for w in scale_down_order(live, False)[:-missing] if w not in taken]
            for worker in taken:
                self.drain(worker)
            if spared:
                needs = describe_demand(self.observe())
                for worker in spared:
                    worker.held = (
                        f"kept: {needs}, and a worker coming up is not scaled down while"
                        " requests wait"
                    )

    # -- actions -------------------------------------------------------------------------------

    def next_id(self) -> str:
        return self.ids.next()

    @property
    def _seq(self) -> int:
        """The number of the last worker id given out, by any group."""
        return self.ids.last

    def launch(
        self, command: str | None = None, model: str | None = None, spot: bool | None = None
    ) -> Worker:
        """Start one worker; ``command`` replaces the provisioner's command for it alone, and
        ``spot`` asks for spot (True) or on-demand (False) machines where that applies. A
        group's worker runs the group's command unless told otherwise."""
        group = self.group
        if group is not None and command is None:
            command, model = group.command, group.model
        worker = Worker(
            id=self.next_id(),
            provisioner=self.provisioner.name,
            command=command,
            model=model,
            spot=spot,
            group=None if group is None else group.name,
            version=self.version,
        )
        self.pool.add(worker)
        self._launches[worker.id] = asyncio.create_task(
            self._launch(worker), name=f"launch-{worker.id}"
        )
        return worker

    async def _launch(self, worker: Worker) -> None:
        try:
            self.pool.set_state(worker, S.PROVISIONING)
            log.info("launching worker %s (%s)", worker.id, self.provisioner.name)
            await self.provisioner.launch(worker)
            if worker.state != S.PROVISIONING:  # drained while launching
                await self.provisioner.terminate(worker)
                self._end(worker, None)
                return
            self.pool.set_state(worker, S.STARTING)
            self.prober.watch(worker)
        except asyncio.CancelledError:
            await self.provisioner.terminate(worker)
            self._end(worker, "launch cancelled")
            raise
        except Exception as exc:
            reason = f"launch failed: {exc}"
            log.warning("worker %s %s", worker.id, reason)
            await self.provisioner.terminate(worker)
            self._end(worker, reason)
        finally:
            self._launches.pop(worker.id, None)

    def _end(self, worker: Worker, reason: str | None) -> None:
        """A launch that will not go on: TERMINATED if it was being drained, else FAILED."""
        if worker.state == S.DRAINING:
            self.pool.set_state(worker, S.TERMINATED)
        elif worker.live:
            self.pool.set_state(worker, S.FAILED, reason or "launch abandoned")

    def add_worker(self, command: str | None = None, model: str | None = None) -> Worker:
        """An operator asked for one more worker: raise the target and clear a crash-loop stop.

        ``command`` (with the ``model`` it serves) makes this worker run something other than
        the deployment's worker command.
        """
        self.blocked = None
        self.start_failures = 0
        live = self.live()
        spot: bool | None = None
        if self.provisioner.spot_plan is None:
            self.target = len(live) + 1
        else:
            # Live workers may outnumber the target (on-demand covering spot ones not READY);
            # the new worker is of the kind the raised target is short of.
            self.target += 1
            want_spot, _ = self.split()
            spot = sum(1 for w in live if w.spot) < want_spot
        self.policy.operator_target(self.target)
        self._held = (0, "")
        reason = "worker added by operator" + (f" (model {model})" if model else "")
        self.last_decision = DecisionRecord(time.time(), self.target, reason)
        return self.launch(command, model, spot)

    def remove_worker(self, worker: Worker) -> None:
        """An operator removed a worker: lower the target (not below min) and drain it."""
        self.target = max(self.policy.min_workers, len(self.live()) - 1)
        self.policy.operator_target(self.target)
        self._held = (0, "")
        self.last_decision = DecisionRecord(
            time.time(), self.target, f"worker {worker.id} removed by operator"
        )
        self.drain(worker)

    def recycle_worker(self, worker: Worker) -> None:
        """An operator drained a worker: keep the target, so a fresh worker replaces it.

        A worker that ran its own command (another model) is replaced by one running the same;
        any other is replaced by the next reconcile, like a worker that failed.
        """
        self.last_decision = DecisionRecord(
            time.time(), self.target, f"worker {worker.id} drained by operator"
        )
        self.drain(worker)
        if (
            worker.command is not None
            and (self.group is None or worker.command != self.group.command)
            and self.blocked is None
            and not self._stopping
            and len(self.live()) < self.target
        ):
            self.launch(worker.command, worker.model)

    def set_bounds(self, min_workers: int, max_workers: int) -> None:
        """An operator changed min/max: the policy keeps within them from now on, and the
        target moves into them at once (workers launch or drain right away)."""
        self.policy.set_bounds(min_workers, max_workers)
        self.target = min(max(self.target, min_workers), max_workers)
        self._held = (0, "")
        self.last_decision = DecisionRecord(
            time.time(),
            self.target,
            f"bounds set by operator: min {min_workers}, max {max_workers}",
        )
        log.info("bounds set by operator: min %d, max %d", min_workers, max_workers)
        self.reconcile()

    def drain(self, worker: Worker) -> None:
        if worker.state not in LIVE:
            return
        self.pool.set_state(worker, S.DRAINING)
        log.info("draining worker %s", worker.id)
        launch = self._launches.get(worker.id)
        if launch is not None:
            launch.cancel()
            return
        self._spawn(self._drain_and_terminate(worker, True))

    async def _drain_and_terminate(self, worker: Worker, drain: bool) -> None:
        if worker.live:
            self.pool.set_state(worker, S.DRAINING)
        if drain:
            deadline = time.monotonic() + self.drain_timeout
            while worker.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self.provisioner.terminate(worker)
        if worker.state == S.DRAINING:
            self.pool.set_state(worker, S.TERMINATED)
            log.info("worker %s terminated", worker.id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- crash-loop guard ----------------------------------------------------------------------

    def _on_transition(self, worker: Worker, old: WorkerState) -> None:
        if not self.owns(worker):
            return
        ended = worker.state in (S.FAILED, S.PREEMPTED)
        if ended and old not in (S.PENDING, S.PROVISIONING):
            # Whatever ended it (exit, probe, timeout, preemption), what is left of it must go.
            self._spawn(self.provisioner.terminate(worker))
        if worker.state == S.READY:
            self.start_failures = 0
        elif (
            worker.state == S.FAILED
            and not worker.ever_ready
            and not self._stopping
            and worker.version == self.version
        ):
            self.start_failures += 1
            if self.start_failures >= self.max_start_failures and self.blocked is None:
                self.blocked = (
                    f"stopped launching: {self.start_failures} workers in a row failed before"
                    f" becoming READY (last, {worker.id}: {worker.reason}). Check"
                    f" `flockctl logs {worker.id}`, fix the worker command, then add a worker"
                    " (POST /-/workers) or restart with flockctl up"
                )
                log.error("%s", self.blocked)

    def to_dict(self) -> AutoscalerView:
        """The autoscaler as the status snapshot shows it (``autoscaler``)."""
        policy = self.policy
        out: AutoscalerView = {
            "policy": policy.name,
            "target": self.target,
            "min_workers": policy.min_workers,
            "max_workers": policy.max_workers,
            "qlrm": policy.qlrm,
            "qps": policy.qps,
            "qlrm_history": [[round(t, 3), round(v, 4)] for t, v in policy.history()[-60:]],
            "last_decision": self.last_decision.to_dict(),
            "launch_blocked": self.blocked,
            "consecutive_start_failures": self.start_failures,
        }
        thresholds = policy.thresholds()
        if thresholds:
            out["thresholds"] = thresholds
        plan = self.provisioner.spot_plan
        if plan is not None:
            want_spot, want_ondemand = self.split()
            spot: SpotView = {
                "base_ondemand_fallback_replicas": plan.base_ondemand,
                "dynamic_ondemand_fallback": plan.dynamic,
                "spot_target": want_spot,
                "ondemand_target": want_ondemand,
            }
            out["spot"] = spot
        return out
