"""What the dashboard tests show: a recorded ``/-/status`` snapshot of two engine workers, and
the terminal size they draw it on (the screenshots in ``__snapshots__/`` are this size).

It holds the keys the dashboard reads as always there (``flockctl.schema.StatusSnapshot``); the
parts it draws as ``-`` when absent (a worker's pid, the deployment's provisioner) are left out,
as the screenshots were taken so."""

from __future__ import annotations

import copy
from typing import Any

SIZE = (140, 40)


def snapshot() -> dict[str, Any]:
    """A fresh copy each call: tests change theirs as the daemon would."""
    engine = {
        "engine": "flockctl",
        "queue_lengths": [1, 1],
        "jobs": [
            {"id": "job-10", "state": "running", "level": 0, "generated_tokens": 5, "age": 1.2},
            {"id": "job-2", "state": "swapped", "level": 1, "preemptions": 3, "age": 75},
        ],
    }
    worker: dict[str, Any] = {
        "state": "READY",
        "provisioner": "local",
        "in_flight": 1,
        "served": 10,
        "latency_p50_ms": 12.5,
        "gpu_memory": {"used": 2 << 30, "total": 8 << 30},
        "engine": engine,
    }
    return {
        "schema": 1,
        "deployment": {
            "name": "default",
            "endpoint": "http://127.0.0.1:3000",
            "policy": "lc",
            "model": None,
        },
        "autoscaler": {
            "policy": "qlrm",
            "target": 2,
            "min_workers": 1,
            "max_workers": 4,
            "qlrm": 0.5,
            "qps": None,
            "qlrm_history": [[1.0, 0.0], [2.0, 0.5]],
            "thresholds": {"autoscale_up": 7, "autoscale_down": 4},
            "last_decision": {"at": 2.0, "target": 2, "reason": "holding"},
            "launch_blocked": None,
            "consecutive_start_failures": 0,
        },
        "requests": {"total": 10, "in_flight": 1, "queued": 0, "failed": 0, "rate": 0.5},
        "ready_workers": 2,
        "workers": [
            {**worker, "id": "w10", "url": "http://127.0.0.1:9010"},
            {**copy.deepcopy(worker), "id": "w2", "url": "http://127.0.0.1:9002"},
        ],
    }
