"""Per-job routes through the balancer: ``/jobs/{id}`` goes to the worker that holds the job.

flockctl's engine begins every job id (and so every response id, ``cmpl-<id>``) with its instance
token, a few random characters drawn when the engine process starts, and reports that token in
its ``/stats``. The stats puller keeps each worker's stats, so finding the holder of a job is a
look-up among the workers, with nothing stored per request: the relay of inference traffic does
no work for this. A job whose token no worker reports is asked of the live workers whose token is
not known yet (one that turned READY since the last pull); when none holds it (its engine ended,
or the id is made up) the balancer answers 404 itself, in the same error shape as its others.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from flockctl.server.workers import Worker, WorkerState

#: Characters of the instance token at the start of a job id (the engine's ``INSTANCE_CHARS``).
INSTANCE_CHARS = 6
#: Workers that may hold jobs: serving, failing probes for a while, or finishing their work.
HOLDING = frozenset({WorkerState.READY, WorkerState.NOT_READY, WorkerState.DRAINING})


def instance_of(job_id: str) -> str:
    """The instance token of a job or response id (``cmpl-``/``chatcmpl-`` prefix allowed)."""
    return job_id.rpartition("-")[2][:INSTANCE_CHARS]


def holder(workers: Iterable[Worker], job_id: str) -> Worker | None:
    """The worker whose engine gave out ``job_id``, or None when no live worker did."""
    token = instance_of(job_id)
    if len(token) < INSTANCE_CHARS:
        return None
    for worker in workers:
        stats = worker.engine
        if worker.state in HOLDING and worker.url and stats and stats.get("instance") == token:
            return worker
    return None


def unlearned(workers: Iterable[Worker]) -> list[Worker]:
    """Live workers whose instance token is not known yet (turned READY since the last stats
    pull, or not flockctl's engine): where a job with an unknown token may still be."""
    return [
        w
        for w in workers
        if w.state in HOLDING and w.url and not (w.engine and w.engine.get("instance"))
    ]


def not_found(job_id: str) -> bytes:
    """The balancer's own 404 body for a job no live worker holds."""
    message = (
        f"no job {job_id!r} on any live worker: it never existed, its worker has stopped, or it"
        " finished too long ago"
    )
    body = {"error": {"message": message, "type": "not_found", "code": "job_not_found"}}
    return json.dumps(body).encode()
