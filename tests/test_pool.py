"""Balancing policies, capacity and the FIFO waiting queue of the worker pool."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from conftest import until
from fake_worker import build_app

from flockctl.server.policies import PowerOfTwo, make_policy
from flockctl.server.pool import NoWorker, QueueFull, WorkerPool
from flockctl.server.workers import InvalidTransition, Worker, WorkerState

S = WorkerState


def ready_worker(pool: WorkerPool, wid: str) -> Worker:
    w = Worker(id=wid, provisioner="static", url=f"http://127.0.0.1/{wid}")
    pool.add(w)
    for state in (S.PROVISIONING, S.STARTING, S.READY):
        pool.set_state(w, state)
    return w


def test_state_machine_rejects_impossible_moves():
    w = Worker(id="w1", provisioner="local")
    with pytest.raises(InvalidTransition, match="PENDING -> READY"):
        w.transition(S.READY)
    w.transition(S.PROVISIONING)
    w.transition(S.STARTING)
    w.transition(S.READY)
    assert w.ever_ready and w.ready_at
    w.transition(S.NOT_READY, "probe failed")
    assert w.reason == "probe failed"
    w.transition(S.READY)
    w.transition(S.DRAINING)
    w.transition(S.TERMINATED)
    with pytest.raises(InvalidTransition):
        w.transition(S.READY)


def test_least_connection_picks_the_least_busy():
    pool = WorkerPool(make_policy("least-connection"), capacity=10, max_queue=10)
    a, b = ready_worker(pool, "a"), ready_worker(pool, "b")
    a.in_flight = 3
    assert pool.try_acquire() is b
    assert b.in_flight == 1


def test_round_robin_cycles():
    pool = WorkerPool(make_policy("round-robin"), capacity=10, max_queue=10)
    ws = [ready_worker(pool, x) for x in "abc"]
    got = [pool.try_acquire() for _ in range(6)]
    assert got == ws + ws


def test_power_of_two_prefers_the_less_loaded_of_two():
    policy = PowerOfTwo(random.Random(1))
    pool = WorkerPool(policy, capacity=100, max_queue=10)
    a, b = ready_worker(pool, "a"), ready_worker(pool, "b")
    a.in_flight = 50
    assert all(pool.try_acquire() is b for _ in range(10))


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown balancing policy 'random'") as info:
        make_policy("random")
    for name in ("least-connection", "power-of-two", "round-robin"):
        assert name in str(info.value)


def test_capacity_and_tried_workers_are_respected():
    pool = WorkerPool(make_policy("least-connection"), capacity=1, max_queue=10)
    a, b = ready_worker(pool, "a"), ready_worker(pool, "b")
    assert pool.try_acquire(tried={a}) is b
    assert pool.try_acquire(tried={a}) is a  # only a has room: a retry may reuse it
    assert pool.try_acquire() is None
    pool.release(a)
    assert pool.try_acquire() is a


def test_only_ready_workers_get_requests():
    pool = WorkerPool(make_policy("least-connection"), capacity=5, max_queue=10)
    a = ready_worker(pool, "a")
    pool.set_state(a, S.NOT_READY, "probe failed")
    assert pool.try_acquire() is None
    pool.set_state(a, S.READY)
    assert pool.try_acquire() is a


async def test_waiters_are_served_in_order_when_slots_free():
    pool = WorkerPool(make_policy("least-connection"), capacity=1, max_queue=10)
    a = ready_worker(pool, "a")
    assert pool.try_acquire() is a
    order: list[int] = []

    async def wait(i: int) -> None:
        w = await pool.acquire(5)
        order.append(i)
        pool.release(w)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert pool.queued == 3
    pool.release(a)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert pool.queued == 0 and a.in_flight == 0


async def test_queue_bounds_and_timeout():
    pool = WorkerPool(make_policy("least-connection"), capacity=1, max_queue=1)
    first = asyncio.create_task(pool.acquire(0.2))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await pool.acquire(1)
    with pytest.raises(NoWorker):
        await first
    assert pool.queued == 0


async def test_a_worker_becoming_ready_wakes_waiters():
    pool = WorkerPool(make_policy("least-connection"), capacity=2, max_queue=10)
    w = Worker(id="a", provisioner="static", url="http://x")
    pool.add(w)
    pool.set_state(w, S.PROVISIONING)
    pool.set_state(w, S.STARTING)
    waiters = [asyncio.create_task(pool.acquire(5)) for _ in range(3)]
    await asyncio.sleep(0.01)
    pool.set_state(w, S.READY)
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in waiters) == 2  # capacity 2: the third still waits
    pool.release(w)
    await asyncio.sleep(0.01)
    assert all(t.done() for t in waiters)


async def test_cancelled_waiter_passes_its_wakeup_on():
    pool = WorkerPool(make_policy("least-connection"), capacity=1, max_queue=10)
    a = ready_worker(pool, "a")
    pool.try_acquire()
    t1 = asyncio.create_task(pool.acquire(5))
    t2 = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0.01)
    pool.release(a)  # wakes t1 ...
    t1.cancel()  # ... which goes away before it runs
    got = await asyncio.wait_for(t2, 1)
    assert got is a


def test_capacity_is_the_flag_else_what_the_worker_reports_else_none():
    auto = WorkerPool(make_policy("least-connection"), capacity=None, max_queue=10)
    w = ready_worker(auto, "a")
    assert (w.capacity, w.capacity_source) == (None, None)
    assert all(auto.try_acquire() is w for _ in range(500))  # no limit
    w.reported_capacity = 264
    assert (w.capacity, w.capacity_source) == (264, "worker")
    flagged = WorkerPool(make_policy("least-connection"), capacity=30, max_queue=10)
    f = ready_worker(flagged, "f")
    f.reported_capacity = 264
    assert (f.capacity, f.capacity_source) == (30, "flag")
    assert f.to_dict()["capacity"] == 30 and f.to_dict()["capacity_source"] == "flag"


async def test_a_worker_reporting_more_capacity_wakes_waiters():
    pool = WorkerPool(make_policy("least-connection"), capacity=None, max_queue=10)
    w = ready_worker(pool, "a")
    w.reported_capacity = 1
    assert pool.try_acquire() is w
    waiters = [asyncio.create_task(pool.acquire(5.0)) for _ in range(2)]
    await until(lambda: pool.queued == 2, "two requests waiting")
    w.reported_capacity = 3
    pool.capacity_changed(w)
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [w, w]
    assert w.in_flight == 3


async def test_an_engine_reporting_its_capacity_in_stats_caps_its_requests(
    daemon, upstream, http, tmp_path
):
    stats = tmp_path / "stats.json"
    stats.write_text(
        json.dumps({"engine": "flockctl", "queue_lengths": [], "jobs": [], "capacity": 2})
    )
    engine = await upstream(build_app("e", 4, 0.0, None, engine_stats=stats))
    d = await daemon(endpoints=[engine.url])
    await d.wait_ready(1)
    pool = d.deployment.pool
    await until(lambda: pool.ready()[0].capacity == 2, "the capacity from /stats")
    view = d.deployment.snapshot()["workers"][0]
    assert (view["capacity"], view["capacity_source"]) == (2, "worker")
    seen: list[tuple[int, int]] = []

    async def one() -> None:
        async with http.post(
            f"{d.url}/v1/chat/completions", json={"fake_token_delay": 0.05, "max_tokens": 4}
        ) as resp:
            assert resp.status == 200

    async def sample() -> None:
        while not all(t.done() for t in requests):
            seen.append((pool.in_flight, pool.queued))
            await asyncio.sleep(0.005)

    requests = [asyncio.create_task(one()) for _ in range(5)]
    await asyncio.gather(sample(), *requests)
    assert max(f for f, _ in seen) == 2
    assert max(q for _, q in seen) >= 2
