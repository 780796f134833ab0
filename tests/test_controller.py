"""The controller with real worker processes: scaling, draining, probing, the crash-loop guard.

These start worker processes, so they are end-to-end tests; test_controller_unit.py covers the
same decisions in-process on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import psutil
import pytest
from conftest import Daemon, fake_worker_command, until

CHAT = "/v1/chat/completions"


async def ticks(d: Daemon, n: int) -> None:
    """Wait until the controller has run ``n`` more steps."""
    controller = d.deployment.controller
    step = controller.step
    steps = 0

    def counted(now: float) -> None:
        nonlocal steps
        steps += 1
        step(now)

    controller.step = counted
    try:
        await until(lambda: steps >= n, f"{n} controller steps")
    finally:
        del controller.step


@pytest.mark.e2e
async def test_crash_loop_stops_launching_and_says_why(daemon, http):
    failing = f"{sys.executable} -c 'import sys; print(\"no such model\"); sys.exit(3)' {{port}}"
    d = await daemon(worker_command=failing, min_workers=1, max_start_failures=3)
    controller = d.deployment.controller
    await until(lambda: controller.blocked is not None, "the crash-loop guard")
    assert "3 workers in a row failed before becoming READY" in controller.blocked
    assert "process exited with code 3: no such model" in controller.blocked
    await ticks(d, 3)  # a few more steps launch nothing
    assert d.states() == {"w1": "FAILED", "w2": "FAILED", "w3": "FAILED"}
    async with http.get(f"{d.url}/-/status", headers=d.admin) as resp:
        snap = await resp.json()
    assert snap["autoscaler"]["launch_blocked"] == controller.blocked
    # An operator adding a worker clears the stop and tries again.
    async with http.post(f"{d.url}/-/workers", headers=d.admin) as resp:
        assert resp.status == 201
    await until(lambda: "w4" in d.states(), "a new launch")


@pytest.mark.e2e
async def test_launch_failure_carries_the_error(daemon):
    d = await daemon(worker_command="/nonexistent/server --port {port}", max_start_failures=1)
    await until(lambda: d.deployment.controller.blocked is not None, "the guard")
    w1 = d.deployment.pool.get("w1")
    assert w1.state.value == "FAILED"
    assert "launch failed" in w1.reason and "/nonexistent/server" in w1.reason


@pytest.mark.e2e
async def test_scales_from_zero_on_the_first_request(daemon, http, caplog):
    caplog.set_level(logging.INFO, logger="flockctl.controller")
    d = await daemon(worker_command=fake_worker_command(), min_workers=0, max_workers=1)
    controller = d.deployment.controller
    await until(lambda: controller.last_decision.reason != "initial target", "a first decision")
    assert controller.target == 0 and d.states() == {}  # no request, no worker
    async with http.post(f"{d.url}{CHAT}", json={"max_tokens": 2}) as resp:
        assert resp.status == 200
        assert resp.headers["x-worker-id"] == "w1"
    assert d.states() == {"w1": "READY"}
    # Every change of target is logged; the last decision itself moves on each second.
    changes = [m for m in caplog.messages if m.startswith("autoscaler: target")]
    assert changes[0] == (
        "autoscaler: target 0 -> 1: 1 requests waiting and no worker: scaling from zero to 1"
    )


@pytest.mark.e2e
async def test_qlrm_scales_up_under_load_and_back_down(daemon, http):
    d = await daemon(
        worker_command=fake_worker_command(),
        min_workers=1,
        max_workers=2,
        autoscale_up=2,
        autoscale_down=0.5,
        queue_tracking_window=1,
        upscale_delay=0,
        downscale_delay=0.5,
    )
    await d.wait_ready(1)

    async def slow() -> None:
        payload = {"max_tokens": 40, "fake_token_delay": 0.05}
        async with http.post(f"{d.url}{CHAT}", json=payload) as resp:
            assert resp.status == 200

    load = [asyncio.create_task(slow()) for _ in range(8)]
    await d.wait_ready(2, timeout=20)
    assert d.deployment.controller.target == 2
    assert d.deployment.policy.qlrm > 2
    await asyncio.gather(*load)
    await until(lambda: list(d.states().values()).count("TERMINATED") == 1, "a scale-down")
    assert d.deployment.controller.target == 1
    assert list(d.states().values()).count("READY") == 1


@pytest.mark.e2e
async def test_removing_a_worker_drains_it_first(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=2, max_workers=2)
    await d.wait_ready(2)
    w1 = d.deployment.pool.get("w1")
    payload = {"max_tokens": 10, "fake_token_delay": 0.05}
    d.deployment.pool.get("w2").in_flight += 100  # steer the request to w1
    request = asyncio.create_task(http.post(f"{d.url}{CHAT}", json=payload))
    await until(lambda: w1.in_flight == 1, "the request on w1")
    d.deployment.pool.get("w2").in_flight -= 100
    pid = w1.pid
    async with http.delete(f"{d.url}/-/workers/w1", headers=d.admin) as resp:
        assert resp.status == 202
    assert w1.state.value == "DRAINING"
    resp = await request
    assert resp.status == 200 and resp.headers["x-worker-id"] == "w1"
    resp.release()
    await until(lambda: w1.state.value == "TERMINATED", "w1 terminated")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    # min_workers is 2: a replacement comes up.
    await d.wait_ready(2)


@pytest.mark.e2e
async def test_worker_that_never_gets_ready_fails_after_initial_delay(daemon, tmp_path):
    marker = tmp_path / "unhealthy"
    marker.touch()
    d = await daemon(
        worker_command=fake_worker_command("--unhealthy-file", str(marker)),
        probe={"interval_seconds": 0.05, "initial_delay_seconds": 1.0},
        max_start_failures=1,
    )
    await until(lambda: d.states().get("w1") == "FAILED", "w1 FAILED")
    w1 = d.deployment.pool.get("w1")
    reason = w1.reason
    await until(
        lambda: not psutil.pid_exists(w1.pid) or psutil.Process(w1.pid).status() == "zombie",
        "the failed worker's process to be stopped",
    )
    assert reason.startswith("not READY after 1s (initial_delay_seconds)")
    # The reason quotes the last probe: the worker's 503, or, where a loaded machine started
    # its process late, the refused connection. Which one is the machine's timing, not ours.
    assert "HTTP 503" in reason or "connection refused" in reason.lower(), reason


async def test_ready_worker_goes_not_ready_and_back(daemon, upstream, tmp_path):
    from fake_worker import build_app

    marker = tmp_path / "unhealthy"
    up = await upstream(build_app("u", 4, 0.0, marker))
    d = await daemon(endpoints=[up.url], probe={"interval_seconds": 0.05, "failure_threshold": 2})
    await d.wait_ready(1)
    marker.touch()
    await until(lambda: d.states()["w1"] == "NOT_READY", "NOT_READY")
    assert "2 probes of /health failed in a row: HTTP 503" in d.deployment.pool.get("w1").reason
    marker.unlink()
    await d.wait_ready(1)


@pytest.mark.e2e
async def test_shutdown_stops_local_workers(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=2, max_workers=2)
    await d.wait_ready(2)
    pids = [w.pid for w in d.deployment.pool]
    async with http.post(f"{d.url}/-/shutdown", headers=d.admin) as resp:
        assert resp.status == 202
    await asyncio.wait_for(d.task, 20)
    assert all(w.state.value == "TERMINATED" for w in d.deployment.pool)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


@pytest.mark.e2e
async def test_shutdown_lets_a_request_in_flight_finish_first(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=1, max_workers=1)
    await d.wait_ready(1)
    w1 = d.deployment.pool.get("w1")
    payload = {"stream": True, "max_tokens": 40, "fake_token_delay": 0.05}
    async with http.post(f"{d.url}{CHAT}", json=payload) as resp:
        assert resp.status == 200
        body = await resp.content.readline()  # streaming: the request is on w1 now
        async with http.post(f"{d.url}/-/shutdown", headers=d.admin) as shut:
            assert shut.status == 202
        assert w1.in_flight == 1  # still streaming when the shutdown began
        body += await resp.read()
    assert body.count(b"chat.completion.chunk") == 40 and body.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(d.task, 20)
    assert w1.state.value == "TERMINATED"
    assert not psutil.pid_exists(w1.pid) or psutil.Process(w1.pid).status() == "zombie"


@pytest.mark.e2e
async def test_admin_add_beyond_max_and_remove_twice_are_conflicts(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=1, max_workers=1)
    await d.wait_ready(1)
    async with http.post(f"{d.url}/-/workers", headers=d.admin) as resp:
        assert resp.status == 409
        assert "already at max_workers (1)" in (await resp.json())["error"]["message"]
    async with http.post(f"{d.url}/-/workers", headers=d.admin, json={"url": "http://x"}) as resp:
        assert resp.status == 422
    async with http.post(f"{d.url}/-/workers", headers=d.admin, json={"urll": 1}) as resp:
        assert resp.status == 422
        assert "urll" in (await resp.json())["error"]["message"]
    async with http.delete(f"{d.url}/-/workers/w1", headers=d.admin) as resp:
        assert resp.status == 202
    await until(lambda: d.states()["w1"] == "TERMINATED", "w1 terminated")
    async with http.delete(f"{d.url}/-/workers/w1", headers=d.admin) as resp:
        assert resp.status == 409
        assert "already TERMINATED" in (await resp.json())["error"]["message"]
    await d.wait_ready(1)  # min_workers 1: a replacement
