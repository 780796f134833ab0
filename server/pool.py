"""The worker pool: every worker of the deployment, and the admission of requests to them.

A request takes a slot on a READY worker that is under ``worker_capacity``. When none has a free
slot it waits in a bounded FIFO queue; a slot freed or a worker becoming READY wakes the waiters
in order. The queue's length is load the autoscaler sees, so a deployment scales up from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator

from flockctl.server.policies import BalancingPolicy
from flockctl.server.request_meta import NO_META, RequestMeta
from flockctl.server.workers import LIVE, TERMINAL, Worker, WorkerState


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: the caller answers 429."""


class NoWorker(Exception):
    """No worker freed up within the queue timeout: the caller answers 503."""


class WorkerPool:
    def __init__(
        self,
        policy: BalancingPolicy,
        capacity: int,
        max_queue: int,
        keep_ended: int = 20,
    ) -> None:
        self.policy = policy
        self.capacity = capacity
        self.max_queue = max_queue
        self.keep_ended = keep_ended
        self._workers: dict[str, Worker] = {}
        self._ready: list[Worker] = []
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._listeners: list[Callable[[Worker, WorkerState], None]] = []
        #: Requests that reached the balancer so far (the request-rate autoscaler's input).
        self.arrived = 0
        self._listeners.append(policy.worker_changed)

    # -- membership and state ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def add(self, worker: Worker) -> None:
        self._workers[worker.id] = worker
        self._refresh(worker)

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
        for listener in self._listeners:
            listener(worker, old)
        self._prune()

    def _refresh(self, worker: Worker) -> None:
        in_ready = worker in self._ready
        if worker.state == WorkerState.READY and not in_ready:
            self._ready.append(worker)
            self._wake(self.capacity - worker.in_flight)
        elif worker.state != WorkerState.READY and in_ready:
            self._ready.remove(worker)

    def _prune(self) -> None:
        ended = [w for w in self._workers.values() if w.state in TERMINAL]
        for w in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._workers[w.id]

    # -- admission -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self._workers.values())

    def try_acquire(
        self, tried: set[Worker] | None = None, meta: RequestMeta = NO_META
    ) -> Worker | None:
        """A slot on a READY worker under capacity, preferring workers not in ``tried``."""
        cap = self.capacity
        free = [w for w in self._ready if w.in_flight < cap]
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
        """Wait (FIFO, bounded) for a slot; raises QueueFull or NoWorker."""
        if not self._waiters:
            worker = self.try_acquire(tried, meta)
            if worker is not None:
                return worker
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        first = True
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoWorker
            fut: asyncio.Future[None] = loop.create_future()
            # A waiter woken but beaten to the slot keeps its place at the head of the queue.
            if first:
                self._waiters.append(fut)
            else:
                self._waiters.appendleft(fut)
            first = False
            timer = loop.call_later(remaining, self._expire, fut)
            try:
                await fut
            except asyncio.CancelledError:
                # Woken and then cancelled: hand the wake-up to the next waiter, or it is lost.
                if fut.done() and not fut.cancelled():
                    self._wake(1)
                else:
                    self._discard(fut)
                raise
            finally:
                timer.cancel()
            worker = self.try_acquire(tried, meta)
            if worker is not None:
                if self._waiters and self._has_free_slot():
                    self._wake(1)
                return worker

    def _expire(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            self._discard(fut)
            fut.set_exception(NoWorker())

    def _discard(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _has_free_slot(self) -> bool:
        return any(w.in_flight < self.capacity for w in self._ready)

    def release(self, worker: Worker) -> None:
        """Give back the slot taken by ``try_acquire``/``acquire``."""
        worker.in_flight -= 1
        if self._waiters and worker.state == WorkerState.READY:
            self._wake(1)

    def _wake(self, n: int) -> None:
        while n > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1
