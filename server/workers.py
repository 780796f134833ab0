"""Workers and their state machine.

``PENDING -> PROVISIONING -> STARTING -> READY <-> NOT_READY -> DRAINING -> TERMINATED``, plus
``FAILED`` (with a reason) from any live state, and ``PREEMPTED`` when the cloud took a spot
worker's machines away (it is replaced like a failed one, but it is not the worker's fault, so it
does not count toward the crash-loop guard). Every change goes through ``Worker.transition`` so
an impossible move is a bug that shows, not a silent inconsistency.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from flockctl.schema import EngineView, GpuMemory, ProbeRecord, WorkerView


class WorkerState(str, Enum):
    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    STARTING = "STARTING"
    READY = "READY"
    NOT_READY = "NOT_READY"
    DRAINING = "DRAINING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"
    PREEMPTED = "PREEMPTED"


S = WorkerState
#: States that count toward the target number of workers.
LIVE = frozenset({S.PENDING, S.PROVISIONING, S.STARTING, S.READY, S.NOT_READY})
TERMINAL = frozenset({S.TERMINATED, S.FAILED, S.PREEMPTED})

_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    S.PENDING: frozenset({S.PROVISIONING, S.DRAINING, S.FAILED, S.TERMINATED}),
    S.PROVISIONING: frozenset({S.STARTING, S.DRAINING, S.FAILED, S.PREEMPTED}),
    S.STARTING: frozenset({S.READY, S.DRAINING, S.FAILED, S.PREEMPTED}),
    S.READY: frozenset({S.NOT_READY, S.DRAINING, S.FAILED, S.PREEMPTED}),
    S.NOT_READY: frozenset({S.READY, S.DRAINING, S.FAILED, S.PREEMPTED}),
    S.DRAINING: frozenset({S.TERMINATED, S.FAILED, S.PREEMPTED}),
    S.TERMINATED: frozenset(),
    S.FAILED: frozenset(),
    S.PREEMPTED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A state change the lifecycle does not allow."""


@dataclass(eq=False)
class Worker:
    """One inference server behind the balancer, whatever provisioned it."""

    id: str
    provisioner: str
    state: WorkerState = S.PENDING
    url: str | None = None
    pid: int | None = None
    reason: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ready_at: float | None = None
    ended_at: float | None = None
    #: When the worker last went NOT_READY (None while it is not): ``replace_after`` counts from it.
    not_ready_since: float | None = None
    #: Why scale-down keeps this worker for now (requests waiting need it), None when nothing
    #: holds it; shown after ``reason`` in the snapshot.
    held: str | None = None
    ever_ready: bool = False
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    probe_failures: int = 0
    last_probe: ProbeRecord | None = None
    #: The last readiness probes ``{"at", "ok", "ms", "detail"}``, oldest first, for the worker
    #: detail view (``GET /-/workers/{id}``); kept out of ``to_dict`` so the snapshot stays small.
    probe_history: deque[ProbeRecord] = field(default_factory=lambda: deque(maxlen=30))
    #: The model the worker serves, where known (None for a custom worker command).
    model: str | None = None
    #: Every model name the worker answers to: ``model`` and what its ``/v1/models`` listed
    #: when it turned READY. Empty while unknown; such a worker may be sent any model.
    models: tuple[str, ...] = ()
    #: The worker group it belongs to (``flockctl: groups``); None in a deployment without groups.
    group: str | None = None
    #: The deployment version it runs (``flockctl update`` starts workers of the next one).
    version: int = 1
    #: Requests the worker says it takes at once (flockctl's engine: running batch plus waiting
    #: room, from its ``/stats``); None where it does not say.
    reported_capacity: int | None = None
    #: ``--worker-capacity`` where it was given (the pool sets it): it wins over the worker's own.
    capacity_flag: int | None = None
    #: A command template that replaces the provisioner's own for this worker (an operator
    #: started it with another model); None runs the deployment's worker command.
    command: str | None = None
    #: True for a worker on spot (preemptible) machines, False on on-demand ones, None where the
    #: provisioner has no such notion (local processes, fixed URLs).
    spot: bool | None = None
    #: What the provisioner placed the worker on, for people (a SkyPilot cluster's name).
    resource: str | None = None
    #: Device memory ``{"used", "total", "device", "source"}`` from the engine's ``/stats``.
    gpu_memory: GpuMemory | None = None
    #: The engine's ``/stats`` as last pulled; None for a worker that is not flockctl's engine.
    engine: EngineView | None = None
    #: When ``engine`` was pulled (wall clock), and whether pulls have failed since.
    engine_at: float | None = None
    engine_stale: bool = False
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    #: Provisioner-private data (a process handle, a cluster name); never serialised.
    handle: Any = None

    def transition(self, new: WorkerState, reason: str | None = None) -> WorkerState:
        """Move to ``new``; returns the previous state."""
        old = self.state
        if new == old:
            return old
        if new not in _ALLOWED[old]:
            raise InvalidTransition(f"worker {self.id}: {old.value} -> {new.value} is not allowed")
        self.state = new
        if reason is not None or new in (S.READY, S.STARTING):
            self.reason = reason
        now = time.time()
        self.not_ready_since = now if new == S.NOT_READY else None
        if new not in LIVE:
            self.held = None
        if new == S.STARTING:
            self.started_at = now
        elif new == S.READY:
            self.ready_at = now
            self.ever_ready = True
        elif new in TERMINAL:
            self.ended_at = now
        return old

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def capacity(self) -> int | None:
        """Requests the balancer sends it at once: the flag, else what it reports, else no limit."""
        return self.capacity_flag if self.capacity_flag is not None else self.reported_capacity

    @property
    def capacity_source(self) -> str | None:
        """Where ``capacity`` came from: ``flag``, ``worker``, or None (no limit)."""
        if self.capacity_flag is not None:
            return "flag"
        return "worker" if self.reported_capacity is not None else None

    def has_room(self) -> bool:
        cap = self.capacity
        return cap is None or self.in_flight < cap

    def serves(self, model: str | None) -> bool:
        """Whether a request for ``model`` may go to this worker: any request without a model,
        and any model while the worker's models are not known."""
        return model is None or not self.models or model in self.models

    def learn_models(self, listed: list[str]) -> None:
        """Record the models the worker's ``/v1/models`` listed (its own ``model`` stays)."""
        names = [self.model] if self.model else []
        self.models = tuple(dict.fromkeys([*names, *listed]))

    def latency_p50(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[len(ordered) // 2]

    def to_dict(self) -> WorkerView:
        """The worker as the status snapshot shows it."""
        p50 = self.latency_p50()
        return {
            "id": self.id,
            "provisioner": self.provisioner,
            "state": self.state.value,
            "reason": "; ".join(r for r in (self.reason, self.held) if r) or None,
            "url": self.url,
            "pid": self.pid,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "ended_at": self.ended_at,
            "last_probe": self.last_probe,
            "model": self.model,
            "models": list(self.models),
            "group": self.group,
            "version": self.version,
            "capacity": self.capacity,
            "capacity_source": self.capacity_source,
            "spot": self.spot,
            "resource": self.resource,
            "gpu_memory": self.gpu_memory,
            "engine": self.engine,
            "engine_at": self.engine_at,
            "engine_stale": self.engine_stale,
        }


class WorkerIds:
    """Worker ids ``w1``, ``w2``, ... shared by every controller of a deployment."""

    def __init__(self) -> None:
        self._seq = 0

    @property
    def last(self) -> int:
        """The number of the last id given out (or seen)."""
        return self._seq

    def next(self) -> str:
        self._seq += 1
        return f"w{self._seq}"

    def seen(self, worker_id: str) -> None:
        """A worker re-adopted with ``worker_id``: never give that id out again."""
        self._seq = max(self._seq, _seq_of(worker_id))


def _seq_of(worker_id: str) -> int:
    digits = worker_id.lstrip("w")
    return int(digits) if digits.isdigit() else 0
