"""The worker pool: every worker of the deployment, and the admission of requests to them.

A request takes a slot on a READY worker that serves its model and is under its capacity (the
``--worker-capacity`` flag, else what the worker reports, else no limit). When none has a free
slot it waits in a bounded FIFO queue of its model (requests without a model have a queue of
their own and may go to any worker). A slot freed, a worker becoming READY or a worker reporting
more capacity wakes the oldest waiter that worker can serve, across the queues, so one model
cannot starve another on a worker serving both. The queues' lengths are load the autoscaler
sees (per group, through ``queued_by_model``), so a deployment scales up from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from flockctl.server.policies import BalancingPolicy
from flockctl.server.request_meta import NO_META, RequestMeta
from flockctl.server.workers import LIVE, TERMINAL, Worker, WorkerState

#: A waiter: its arrival number (older first across the queues) and the future it waits on.
_Waiter = tuple[int, "asyncio.Future[None]"]


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: the caller answers 429."""


class NoWorker(Exception):
    """No worker freed up within the queue timeout: the caller answers 503."""


class WorkerPool:
    def __init__(
        self,
        policy: BalancingPolicy,
        capacity: int | None,
        max_queue: int,
        keep_ended: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        #: What queue timeouts are measured on (``flockctl simulate`` passes simulated time).
        self.clock = clock
        #: ``--worker-capacity`` where given; None: each worker's own (reported, else no limit).
        self.capacity = capacity
        #: Requests waiting at most, per model.
        self.max_queue = max_queue
        self.keep_ended = keep_ended
        self._workers: dict[str, Worker] = {}
        self._ready: list[Worker] = []
        self._waiters: dict[str | None, deque[_Waiter]] = {}
        self._queued = 0
        self._arrival = itertools.count()
        self._listeners: list[Callable[[Worker, WorkerState], None]] = []
        #: Models the deployment declares (its groups' and its own), served or not right now.
        self.declared_models: frozenset[str] = frozenset()
        self._models: tuple[str, ...] = ()
        #: Requests that reached the balancer so far (the request-rate autoscaler's input).
        self.arrived = 0
        #: Requests that asked for a slot so far, by the model they are routed by (None: none),
        #: so each worker group's request-rate autoscaler counts its own.
        self.arrived_by_model: dict[str | None, int] = {}
        self._listeners.append(policy.worker_changed)

    # -- membership and state ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def add(self, worker: Worker) -> None:
        worker.capacity_flag = self.capacity
        self._workers[worker.id] = worker
        self._refresh(worker)
        self.models_changed()

    def live(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.state in LIVE]

    def ready(self) -> list[Worker]:
        return list(self._ready)

    def on_transition(self, listener: Callable[[Worker, WorkerState], None]) -> None:
        """Call ``listener(worker, old_state)`` after every state change made through the pool."""
        self._listeners.append(listener)

    def set_state(self, worker: Worker, state: WorkerState, reason: str | None = None) -> None:
        """Change a worker's state; keeps the READY list and the waiters in step."""
        old = worker.transition(state, reason)
        if old == state:
            return
        self._refresh(worker)
        if old == WorkerState.READY or state == WorkerState.READY:
            self.models_changed()
        for listener in self._listeners:
            listener(worker, old)
        self._prune()

    def _refresh(self, worker: Worker) -> None:
        in_ready = worker in self._ready
        if worker.state == WorkerState.READY and not in_ready:
            self._ready.append(worker)
            self._wake_for(worker)
        elif worker.state != WorkerState.READY and in_ready:
            self._ready.remove(worker)

    def _prune(self) -> None:
        ended = [w for w in self._workers.values() if w.state in TERMINAL]
        for w in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._workers[w.id]

    def capacity_changed(self, worker: Worker) -> None:
        """``worker`` reported another capacity: waiters it now has room for are woken."""
        if worker.state == WorkerState.READY:
            self._wake_for(worker)

    # -- models --------------------------------------------------------------------------------

    def models_changed(self) -> None:
        """Recompute the models served (call after a worker learned its models)."""
        served = {m for w in self._workers.values() if w.state in LIVE for m in w.models}
        self._models = tuple(sorted(served | self.declared_models))

    def models(self) -> tuple[str, ...]:
        """Every model the deployment serves or declares, sorted (``GET /v1/models``)."""
        return self._models

    @property
    def routes_by_model(self) -> bool:
        """Whether requests must be told apart by model: more than one model is served."""
        return len(self._models) > 1

    def model_of(self, meta: RequestMeta) -> str | None:
        """The model a request is routed by: its own where more than one is served, else None
        (a deployment of one model sends every request anywhere, as its workers judge it)."""
        return meta.model if len(self._models) > 1 else None

    def unknown_model(self, model: str | None) -> bool:
        """Whether no worker can serve ``model``: the deployment routes by model, ``model`` is
        not one of its models, and no READY worker left its models unsaid (it might serve it).
        A deployment of one model leaves that answer to its workers."""
        if model is None or len(self._models) < 2 or model in self._models:
            return False
        return all(w.models for w in self._ready)

    # -- admission -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    def queued_by_model(self) -> dict[str | None, int]:
        """Requests waiting, by the model they asked for (None: no model)."""
        return {model: len(q) for model, q in self._waiters.items() if q}

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self._workers.values())

    def try_acquire(
        self, tried: set[Worker] | None = None, meta: RequestMeta = NO_META
    ) -> Worker | None:
        """A slot on a READY worker serving the request's model and under capacity, preferring
        workers not in ``tried``."""
        model = self.model_of(meta)
        free = [w for w in self._ready if w.has_room() and w.serves(model)]
        if not free:
            return None
        if tried:
            fresh = [w for w in free if w not in tried]
            if fresh:
                free = fresh
        worker = self.policy.choose(free, meta)
        worker.in_flight += 1
        return worker

    async def acquire(
        self, timeout: float, tried: set[Worker] | None = None, meta: RequestMeta = NO_META
    ) -> Worker:
        """Wait (FIFO per model, bounded) for a slot; raises QueueFull or NoWorker."""
        model = self.model_of(meta)
        if not tried:  # a request's first attempt (a retry has tried a worker already)
            self.arrived_by_model[model] = self.arrived_by_model.get(model, 0) + 1
        if not self._queued or (
            model is not None and not self._waiters.get(model) and not self._waiters.get(None)
        ):
            worker = self.try_acquire(tried, meta)
            if worker is not None:
                return worker
        queue = self._waiters.setdefault(model, deque())
        if len(queue) >= self.max_queue:
            raise QueueFull
        deadline = self.clock() + timeout
        loop = asyncio.get_running_loop()
        seq = next(self._arrival)
        first = True
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise NoWorker
            fut: asyncio.Future[None] = loop.create_future()
            entry = (seq, fut)
            # A waiter woken but beaten to the slot keeps its place at the head of its queue.
            queue = self._waiters.setdefault(model, deque())
            if first:
                queue.append(entry)
            else:
                queue.appendleft(entry)
            self._queued += 1
            if first:
                # Workers other models' waiters cannot use may have room for this one.
                self._kick()
            first = False
            timer = loop.call_later(remaining, self._expire, model, entry)
            try:
                await fut
            except asyncio.CancelledError:
                # Woken and then cancelled: hand the wake-up to the next waiter, or it is lost.
                if fut.done() and not fut.cancelled():
                    self._kick()
                else:
                    self._discard(model, entry)
                raise
            finally:
                timer.cancel()
            worker = self.try_acquire(tried, meta)
            if worker is not None:
                if self._queued:
                    self._kick()
                return worker

    def _expire(self, model: str | None, entry: _Waiter) -> None:
        fut = entry[1]
        if not fut.done():
            self._discard(model, entry)
            fut.set_exception(NoWorker())

    def _discard(self, model: str | None, entry: _Waiter) -> None:
        queue = self._waiters.get(model)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(entry)
            self._queued -= 1

    def release(self, worker: Worker) -> None:
        """Give back the slot taken by ``try_acquire``/``acquire``."""
        worker.in_flight -= 1
        if self._queued and worker.state == WorkerState.READY:
            self._wake_one(worker)

    def _kick(self) -> None:
        """Wake, for every READY worker with room, the oldest waiter it can serve."""
        for worker in self._ready:
            if not self._queued:
                return
            if worker.has_room():
                self._wake_one(worker)

    def _wake_for(self, worker: Worker) -> None:
        """Wake as many waiters as ``worker`` has free slots for (all it serves: no limit)."""
        cap = worker.capacity
        n = self._queued if cap is None else cap - worker.in_flight
        while n > 0 and self._wake_one(worker):
            n -= 1

    def _wake_one(self, worker: Worker) -> bool:
        """Wake the oldest waiter ``worker`` serves, across the queues; False if there is none."""
        queues: Iterable[deque[_Waiter]]
        if worker.models:
            queues = [q for m in (None, *worker.models) if (q := self._waiters.get(m))]
        else:
            queues = [q for q in self._waiters.values() if q]
        oldest: deque[_Waiter] | None = None
        for q in queues:
            if oldest is None or q[0][0] < oldest[0][0]:
                oldest = q
        if oldest is None:
            return False
        _, fut = oldest.popleft()
        self._queued -= 1
        fut.set_result(None)
        return True
