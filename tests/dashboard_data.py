"""What the dashboard tests show: a recorded ``/-/status`` snapshot of two engine workers, and
the terminal size they draw it on (the screenshots in ``__snapshots__/`` are this size).

It holds the keys the dashboard reads as always there (``flockctl.schema.StatusSnapshot``); the
parts it draws as ``-`` when absent (a worker's pid, the deployment's provisioner) are left out,
as the screenshots were taken so."""

from __future__ import annotations

import copy
import time
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


#: When the recorded requests were answered: the latency panel's clock is set to this in tests.
NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


def requests_answer() -> dict[str, Any]:
    """A recorded ``GET /-/requests`` answer: 40 requests over the 5 minutes before ``NOW``, on
    w10 (fast, then a slow minute) and w2 (steady), one retried after a 503 and one refused."""
    records: list[dict[str, Any]] = []
    for i in range(40):
        worker = "w10" if i % 2 else "w2"
        ago = 295 - i * 7.5
        latency = (
            40.0 + (i % 5) * 6 if worker == "w2" else (220.0 + i * 9 if 20 <= i < 28 else 25.0)
        )
        attempts = [{"worker": worker, "ms": latency, "status": 200}]
        if i == 33:
            attempts.insert(0, {"worker": "w2", "ms": 3.1, "status": 503})
        records.append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - ago)) + ".250Z",
                "request_id": f"7f3a-{i + 1}",
                "trace_id": None,
                "method": "POST",
                "path": "/v1/chat/completions",
                "model": "demo",
                "client": "127.0.0.1",
                "user": None,
                "worker": worker,
                "status": 200,
                "attempts": attempts,
                "queue_ms": 0.4,
                "ttfb_ms": round(latency / 3, 3),
                "latency_ms": latency,
                "bytes_in": 120,
                "bytes_out": 900,
                "prompt_tokens": 12,
                "completion_tokens": 16,
                "response_id": f"chatcmpl-ab12cd{i + 1}",
                "seq": i + 1,
            }
        )
    refused = {**records[-1], "worker": None, "status": 429, "attempts": [], "seq": 41}
    refused.update(request_id="7f3a-41", ttfb_ms=0.2, latency_ms=0.3, response_id=None)
    return {"records": [*records, refused], "last": 41, "reset": False}
