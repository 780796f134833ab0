"""End to end: ``flockctl up --model`` runs two real engine workers on a tiny model; requests go
through the balancer and ``status --json`` shows each worker's jobs with level and preemptions."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cli_driver import flockctl, processes_with
from conftest import free_port, until_sync
from tinymodel import build_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """The model at a path of this test's own: its engine processes are found by that path."""
    return build_tiny_model(tmp_path / "tiny-model-for-e2e")


async def test_up_with_engine_workers_shows_their_jobs(tiny: Path, flockctl_home: Path) -> None:
    port = free_port()
    result = flockctl(
        "up",
        "--port",
        str(port),
        "--model",
        str(tiny),
        "--engine-args",
        "--device cpu --max-batch-size 2",
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--probe-interval",
        "0.2",
        "--initial-delay",
        "120",
    )
    try:
        assert result.code == 0, result.err

        def ready() -> list[dict]:
            snap = flockctl("status", "--json").json()
            workers = [w for w in snap["workers"] if w["state"] == "READY"]
            return workers if len(workers) == 2 else []

        workers = until_sync(ready, "two READY engine workers", 120)
        assert len(processes_with(tiny)) >= 2  # the engines run our model, found by its path

        body = {
            "model": str(tiny),
            "prompt": "the quick brown fox",
            "max_tokens": 200,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        url = f"http://127.0.0.1:{port}/v1/completions"
        async with aiohttp.ClientSession() as session:
            streaming = asyncio.Event()

            async def stream() -> str:
                async with session.post(url, json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    text = []
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            streaming.set()
                            text.append(json.loads(line[6:])["choices"][0]["text"])
                    return "".join(text)

            # a tiny model is fast: enough work queued that status catches jobs in flight, also
            # on a loaded machine where each `flockctl status` takes a second or two (with 200
            # requests the engines drained them between reads there once decode steps sped up)
            tasks = [asyncio.ensure_future(stream()) for _ in range(400)]
            await asyncio.wait_for(streaming.wait(), 60)

            def jobs_queued_on_both() -> dict[str, Any]:
                # two hundred jobs per worker and a batch of two: jobs wait, the queues show it (one
                # snapshot where both hold jobs and some wait: a faster engine drains them
                # between two reads). The table must list a live job under its worker in the
                # same round: read once the JSON had shown them, the engines had sometimes
                # drained every job before the table's first read
                human = flockctl("status")
                assert human.code == 0, human.err
                if not re.search(r"^w[12]\s+[A-Za-z0-9]{22}\s", human.out, re.M):
                    return {}
                snap = flockctl("status", "--json").json()
                jobs = {
                    w["id"]: w["engine"]["jobs"]
                    for w in snap["workers"]
                    if w.get("engine") and w["engine"]["jobs"]
                }
                engines = [w["engine"] for w in snap["workers"] if w.get("engine")]
                waiting = sum(sum(e["queue_lengths"]) for e in engines)
                return {"jobs": jobs, "snap": snap} if len(jobs) == 2 and waiting else {}

            seen = await asyncio.to_thread(
                until_sync,
                jobs_queued_on_both,
                "a live job in `flockctl status`, and jobs on both workers, some queued",
            )
            jobs, snap = seen["jobs"], seen["snap"]
            assert set(jobs) == {w["id"] for w in workers}
            for listed in jobs.values():
                for job in listed:
                    assert re.fullmatch("[A-Za-z0-9]{22}", job["id"]), job["id"]
                    assert job["state"] in {"waiting", "running", "preempted", "swapped"}
                    assert isinstance(job["level"], int) and isinstance(job["preemptions"], int)
                    assert job["prompt_tokens"] > 0
            engines = [w["engine"] for w in snap["workers"] if w.get("engine")]
            assert all(e["max_batch_size"] == 2 and e["scheduler"] == "mlfq" for e in engines)
            assert all(w["gpu_memory"]["used"] > 0 for w in snap["workers"])

            texts = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert len(set(texts)) == 1 and texts[0]  # greedy: every worker says the same
    finally:
        flockctl("down", "--timeout", "30")
    assert until_sync(lambda: not processes_with(tiny), "engine workers to exit", 10)
