"""The controller in-process: an in-memory provisioner, a clock the test moves, and probes the
test passes by hand. Each tick is ``controller.step(clock())``, so every decision happens exactly
when a test says; the process-level behaviour is in test_controller.py (end to end)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import until
from fleet import Clock, MemoryProvisioner, Probes

from flockctl.server.autoscaler import AutoscalerPolicy, FixedPolicy, QueueLengthRunningMean
from flockctl.server.controller import Controller
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.workers import Worker, WorkerState

S = WorkerState


@dataclass
class Rig:
    controller: Controller
    pool: WorkerPool
    provisioner: MemoryProvisioner
    probes: Probes
    clock: Clock

    def tick(self, seconds: float = 0.0) -> None:
        """Move the clock on and run one controller step at the new time."""
        self.clock.advance(seconds)
        self.controller.step(self.clock())

    def states(self) -> dict[str, str]:
        return {w.id: w.state.value for w in self.pool}

    def worker(self, worker_id: str) -> Worker:
        worker = self.pool.get(worker_id)
        assert worker is not None, f"no worker {worker_id}: {self.states()}"
        return worker

    async def ready(self, *ids: str) -> None:
        """Let each launch finish (STARTING, watched), then pass its readiness probe."""
        for worker_id in ids:
            worker = await until(lambda i=worker_id: self.pool.get(i), f"{worker_id} to exist")
            await until(lambda w=worker: w.state == S.STARTING, f"{worker_id} STARTING")
            assert worker_id in self.probes.watched
            self.pool.set_state(worker, S.READY)


@pytest.fixture
async def rig() -> AsyncIterator[Callable[..., Rig]]:
    made: list[Controller] = []

    def build(policy: AutoscalerPolicy, initial_target: int, capacity: int = 4, **kw: Any) -> Rig:
        pool = WorkerPool(make_policy("least-connection"), capacity, max_queue=16)
        provisioner, probes, clock = MemoryProvisioner(), Probes(), Clock()
        controller = Controller(
            pool,
            provisioner,
            policy,
            probes,  # type: ignore[arg-type]  # only watch() is called
            initial_target,
            clock=clock,
            **kw,
        )
        made.append(controller)
        return Rig(controller, pool, provisioner, probes, clock)

    yield build
    for controller in made:
        await controller.stop(drain=False)


def qlrm(
    min_workers: int, max_workers: int, downscale_delay: float = 30.0, autoscale_up: float = 2
) -> AutoscalerPolicy:
    return QueueLengthRunningMean(
        min_workers,
        max_workers,
        autoscale_up=autoscale_up,
        autoscale_down=0.5,
        window=10,
        upscale_delay=0,
        downscale_delay=downscale_delay,
    )


async def settle() -> None:
    """Let every task that can run go as far as it can without waiting (no wall time)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def waiting_request(pool: WorkerPool) -> asyncio.Task[Worker]:
    """A request waiting in the balancer's queue for a worker, as the proxy makes one."""
    request = asyncio.create_task(pool.acquire(timeout=60))
    await until(lambda: pool.queued == 1, "the request to wait in the queue")
    return request


async def test_scales_from_zero_on_a_waiting_request(rig: Callable[..., Rig]) -> None:
    r = rig(qlrm(0, 2), initial_target=0)
    r.tick()
    assert r.controller.target == 0 and r.states() == {}
    assert r.controller.last_decision.reason == (
        "qlrm 0.00 < autoscale_down 0.5 but at min_workers: holding 0"
    )
    r.tick(5)
    assert r.provisioner.launched == []  # no request, no worker, however long

    request = await waiting_request(r.pool)
    r.tick(1)
    assert r.controller.target == 1
    assert r.controller.last_decision.reason == (
        "1 requests waiting and no worker: scaling from zero to 1"
    )
    await r.ready("w1")
    served_by = await asyncio.wait_for(request, 10)
    assert served_by.id == "w1" and served_by.in_flight == 1
    r.pool.release(served_by)
    assert r.provisioner.launched == ["w1"]


async def test_the_running_loop_decides_on_the_injected_clock(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flockctl.controller")
    r = rig(qlrm(0, 1), initial_target=0, tick=0.01, decide_interval=1.0)
    steps = 0
    step = r.controller.step

    def counted(now: float) -> None:
        nonlocal steps
        steps += 1
        step(now)

    r.controller.step = counted  # type: ignore[method-assign]
    r.controller.start()
    await until(lambda: r.controller.last_decision.reason != "initial target", "a first decision")
    request = await waiting_request(r.pool)
    seen = steps
    await until(lambda: steps >= seen + 5, "five more ticks")
    # The clock has not moved: the loop ticked, but the next decision is not due yet.
    assert r.controller.target == 0 and r.provisioner.launched == []
    r.clock.advance(1.0)
    await until(lambda: r.controller.target == 1, "the target to rise")
    await r.ready("w1")
    assert (await asyncio.wait_for(request, 10)).id == "w1"
    said = [m for m in caplog.messages if m.startswith("autoscaler: target")]
    assert said == [
        "autoscaler: target 0 -> 1: 1 requests waiting and no worker: scaling from zero to 1"
    ]


async def test_scales_down_only_after_the_delay_and_keeps_the_busy_worker(
    rig: Callable[..., Rig],
) -> None:
    r = rig(qlrm(1, 3, downscale_delay=30), initial_target=2)
    r.tick()
    assert r.controller.target == 2
    assert r.controller.last_decision.reason.endswith("scaling down in 30s if it holds")
    await r.ready("w1", "w2")
    busy = r.pool.try_acquire()  # one request in flight: the idle worker is the one to go
    assert busy is not None
    idle = next(w for w in r.pool.ready() if w is not busy)

    r.tick(29)
    assert r.controller.target == 2 and idle.state == S.READY
    assert r.controller.last_decision.reason.endswith("scaling down in 1s if it holds")
    r.tick(1)
    assert r.controller.target == 1
    assert "for 30s: scaling down to 1" in r.controller.last_decision.reason
    await until(lambda: idle.state == S.TERMINATED, "the idle worker to be stopped")
    assert busy.state == S.READY and r.provisioner.terminated == [idle.id]
    for _ in range(5):
        r.tick(60)  # min_workers 1, and the request in flight needs its worker
        await settle()
    assert r.controller.target == 1 and busy.state == S.READY
    assert r.provisioner.launched == ["w1", "w2"]


async def test_scale_down_drains_a_busy_worker_before_stopping_it(
    rig: Callable[..., Rig],
) -> None:
    # Three requests over two workers of capacity 4 need one: scale-down may go to 1.
    r = rig(qlrm(1, 2, downscale_delay=5, autoscale_up=10), initial_target=2, capacity=4)
    r.tick()
    await r.ready("w1", "w2")
    w1, w2 = r.worker("w1"), r.worker("w2")
    # w1 the busier (two requests), so the least busy, w2 with one, is the one to go.
    assert [r.pool.try_acquire(t) for t in ({w2}, {w2}, {w1})] == [w1, w1, w2]

    r.tick(5)
    assert r.controller.target == 1 and w2.state == S.DRAINING
    for _ in range(3):
        r.tick(1)
        await settle()  # the drain has run as far as it can
        got = r.pool.try_acquire()
        assert got is w1  # a draining worker takes no new request
        r.pool.release(got)
    assert w2.state == S.DRAINING and r.provisioner.terminated == []
    r.pool.release(w2)  # its request finishes
    await until(lambda: w2.state == S.TERMINATED, "w2 to be stopped once drained")
    assert r.provisioner.terminated == ["w2"]
    r.tick(1)
    assert r.provisioner.launched == ["w1", "w2"]  # the target is 1: no replacement


async def test_a_worker_not_ready_past_replace_after_is_drained_and_replaced(
    rig: Callable[..., Rig],
) -> None:
    r = rig(FixedPolicy(1), initial_target=1, replace_after=120)
    r.tick()
    await r.ready("w1")
    w1 = r.worker("w1")
    r.pool.set_state(w1, S.NOT_READY, "3 probes of /health failed in a row")
    r.tick(60)
    assert w1.state == S.NOT_READY and r.provisioner.launched == ["w1"]
    r.tick(61)
    assert w1.state == S.DRAINING
    assert w1.reason == "NOT_READY for 120s (replace_after): replaced by w2"
    assert r.controller.target == 1
    await until(lambda: w1.state == S.TERMINATED, "w1 to be stopped")
    await r.ready("w2")
    assert r.provisioner.launched == ["w1", "w2"] and r.provisioner.terminated == ["w1"]
    assert r.controller.start_failures == 0  # w1 had been READY: not a crash loop


async def test_a_worker_whose_process_exits_is_failed_and_replaced(
    rig: Callable[..., Rig],
) -> None:
    r = rig(FixedPolicy(2), initial_target=2)
    r.tick()
    await r.ready("w1", "w2")
    r.provisioner.exited["w1"] = "process exited with code 1"
    r.tick(0.25)
    assert r.states() == {"w1": "FAILED", "w2": "READY", "w3": "PENDING"}
    assert r.worker("w1").reason == "process exited with code 1"
    await until(lambda: "w1" in r.provisioner.terminated, "what is left of w1 to be removed")
    await r.ready("w3")
    assert r.controller.blocked is None


async def test_a_crash_loop_stops_launching_until_an_operator_adds_a_worker(
    rig: Callable[..., Rig],
) -> None:
    r = rig(FixedPolicy(1), initial_target=1, max_start_failures=3)
    for n in (1, 2, 3):
        r.tick(1)
        await until(lambda n=n: r.states().get(f"w{n}") == "STARTING", f"w{n} STARTING")
        r.provisioner.exited[f"w{n}"] = "process exited with code 3: no such model"
    r.tick(1)
    assert r.states() == {"w1": "FAILED", "w2": "FAILED", "w3": "FAILED"}
    blocked = r.controller.blocked
    assert blocked is not None
    assert "3 workers in a row failed before becoming READY" in blocked
    assert "(last, w3: process exited with code 3: no such model)" in blocked
    for _ in range(10):
        r.tick(60)
        await settle()
    assert r.provisioner.launched == ["w1", "w2", "w3"] and len(r.states()) == 3
    r.controller.add_worker()
    assert r.controller.blocked is None
    await r.ready("w4")
    assert r.controller.start_failures == 0
