"""The daemon's admin API routes, written once: the daemon declares its routes with the templates,
and the CLI's client and the dashboard build their request paths with the functions.

A worker id or a log target becomes one URL path segment, percent-quoted, so whatever it holds
(a space, ``?``, ``#``, ``/``) reaches the daemon whole instead of turning into a query, a
fragment or another route. The whole API sits under ``/-/`` (``ADMIN_PREFIX``), which the
balancer never proxies.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

ADMIN_PREFIX = "/-/"

# The route templates the daemon declares (FastAPI path syntax).
STATUS = "/-/status"
OPENAPI = "/-/openapi.json"
WORKERS = "/-/workers"
WORKER = "/-/workers/{worker_id}"
WORKER_DRAIN = "/-/workers/{worker_id}/drain"
AUTOSCALER = "/-/autoscaler"
LOGS = "/-/logs/{target:path}"
REQUESTS = "/-/requests"
SHUTDOWN = "/-/shutdown"
UPDATE = "/-/update"
#: The balancer's per-job route (not the admin API: it is relayed to the worker holding the job).
JOB = "/jobs/{job_id}"
JOBS_PREFIX = "/jobs/"

#: The most request log records one ``GET /-/requests`` returns.
MAX_REQUESTS = 1000

#: The log target of the daemon itself (any other target is a worker id).
DAEMON_LOG = "daemon"


def segment(value: str) -> str:
    """``value`` as one URL path segment: every character but letters, digits and ``-._~``
    quoted, so nothing in it can end the segment."""
    return quote(value, safe="")


def worker_path(worker_id: str) -> str:
    """``GET`` one worker's detail; ``DELETE`` it (drain and lower the target)."""
    return f"{WORKERS}/{segment(worker_id)}"


def drain_path(worker_id: str) -> str:
    """``POST``: drain a worker and keep the target, so a fresh one replaces it."""
    return f"{worker_path(worker_id)}/drain"


def logs_path(target: str, *, tail: int | None = None, offset: int | None = None) -> str:
    """``GET`` the lines of the daemon's log (``DAEMON_LOG``) or a worker's, with the query
    that asks for the last ``tail`` lines or those after byte ``offset``."""
    query = {k: v for k, v in (("tail", tail), ("offset", offset)) if v is not None}
    path = f"{ADMIN_PREFIX}logs/{segment(target)}"
    return f"{path}?{urlencode(query)}" if query else path


def requests_path(
    *,
    after: int | None = None,
    limit: int | None = None,
    status: tuple[str, ...] | list[str] = (),
    slow: float | None = None,
    worker: str | None = None,
    text: str | None = None,
) -> str:
    """``GET`` the daemon's recent request log records (the newest ``limit``, those numbered
    after ``after``) that match: a status or class (``503``, ``5xx``; repeatable), at least
    ``slow`` ms, sent to ``worker``, holding ``text``."""
    query: list[tuple[str, str]] = [("status", s) for s in status]
    for name, value in (
        ("after", after),
        ("limit", limit),
        ("slow", None if slow is None else f"{slow:g}"),
        ("worker", worker),
        ("text", text),
    ):
        if value is not None and value != "":
            query.append((name, str(value)))
    return f"{REQUESTS}?{urlencode(query)}" if query else REQUESTS


def job_path(job_id: str) -> str:
    """``GET`` a job (or a response id naming it) through the balancer: the engine's timeline."""
    return f"{JOBS_PREFIX}{segment(job_id)}"
