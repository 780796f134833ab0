"""Cleaning up after a daemon that is gone: what ``flockctl down`` does when no daemon answers.

A daemon records what it started in its state directory (``workers.json`` for local worker
processes, ``clusters.json`` for SkyPilot clusters) so that nothing outlives it unnoticed. These
functions act on those records alone, without a running deployment or a provisioner's config:
the CLI calls them after the daemon has stopped or died, and the local provisioner uses the same
code. A recorded process is only signalled when its start time matches the one recorded, so a
recycled pid is never taken for a worker.

Importing this module is cheap (no web stack); SkyPilot's SDK is loaded only when a cluster is
recorded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from flockctl.state import is_same_process, read_json, write_json_atomic

WORKERS_FILE = "workers.json"


def recorded_worker_processes(directory: Path) -> dict[str, int]:
    """The live worker processes recorded in ``directory``: worker id -> pid (the process group
    it leads), only those whose start time matches the record."""
    data = read_json(directory / WORKERS_FILE)
    rows = data.get("workers") if isinstance(data, dict) else None
    live: dict[str, int] = {}
    for row in rows if isinstance(rows, list) else []:
        try:
            worker_id, pid, start = str(row["id"]), int(row["pid"]), float(row["start_time"])
        except (KeyError, TypeError, ValueError):
            continue
        if is_same_process(pid, start):
            live[worker_id] = pid
    return live


def stop_recorded_workers(directory: Path, timeout: float = 5.0) -> list[str]:
    """Stop every live worker process recorded in ``directory`` and clear the record.

    Each worker's process group gets SIGTERM, then SIGKILL if it is still there after
    ``timeout`` seconds. Returns the ids of the workers that were stopped.
    """
    live = recorded_worker_processes(directory)
    if not live:
        return []
    for pid in live.values():
        _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_alive(pid) for pid in live.values()):
        time.sleep(0.05)
    for pid in live.values():
        if _group_alive(pid):
            _kill_group(pid, signal.SIGKILL)
    write_json_atomic(directory / WORKERS_FILE, {"workers": []})
    return list(live)


def down_recorded_clusters(directory: Path) -> tuple[list[str], list[str]]:
    """Tear down every SkyPilot cluster recorded in ``directory``.

    Returns the clusters torn down and one line for each that could not be (the record keeps
    those, so a later ``flockctl down`` tries again).
    """
    from flockctl.server.provisioners.skypilot import down_recorded, recorded_clusters

    if not recorded_clusters(directory):
        return [], []
    from flockctl.server.provisioners.sky_sdk import make_sdk

    return down_recorded(directory, make_sdk())


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
