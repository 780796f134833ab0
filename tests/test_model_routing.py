"""Routing by model: a request naming a model goes only to workers serving it, waits in its
model's queue, and an unknown model is refused naming the models served."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from cli_driver import flockctl, ready_ids
from conftest import fake_worker_command, free_port, until, until_sync
from fake_worker import build_app

from flockctl.server.policies import make_policy
from flockctl.server.pool import QueueFull, WorkerPool
from flockctl.server.request_meta import RequestMeta
from flockctl.server.workers import Worker, WorkerState

S = WorkerState
CHAT = "/v1/chat/completions"


def ready_worker(pool: WorkerPool, wid: str, *models: str) -> Worker:
    w = Worker(id=wid, provisioner="static", url=f"http://127.0.0.1/{wid}", models=models)
    pool.add(w)
    for state in (S.PROVISIONING, S.STARTING, S.READY):
        pool.set_state(w, state)
    return w


def two_models(capacity: int = 1, max_queue: int = 10) -> tuple[WorkerPool, Worker, Worker]:
    pool = WorkerPool(make_policy("least-connection"), capacity=capacity, max_queue=max_queue)
    return pool, ready_worker(pool, "a", "alpha"), ready_worker(pool, "b", "beta")


def asks(model: str | None) -> RequestMeta:
    return RequestMeta(model=model)


def test_a_request_goes_only_to_a_worker_serving_its_model():
    pool, a, b = two_models(capacity=10)
    assert pool.routes_by_model
    assert {pool.try_acquire(meta=asks("beta")) for _ in range(4)} == {b}
    assert {pool.try_acquire(meta=asks("alpha")) for _ in range(4)} == {a}
    # Without a model, anywhere: the least busy (both have 4 now, then the one freed).
    pool.release(a)
    assert pool.try_acquire(meta=asks(None)) is a


def test_one_model_served_means_no_routing_by_model():
    pool = WorkerPool(make_policy("least-connection"), capacity=10, max_queue=10)
    w = ready_worker(pool, "a", "alpha")
    assert not pool.routes_by_model
    assert not pool.unknown_model("other")  # the worker answers that itself
    assert pool.try_acquire(meta=asks("other")) is w


def test_an_unknown_model_is_told_apart_from_a_served_one():
    pool, _, _ = two_models()
    assert pool.models() == ("alpha", "beta")
    assert pool.unknown_model("gamma")
    assert not pool.unknown_model("alpha") and not pool.unknown_model(None)
    # A READY worker whose models are not known might serve it: not refused.
    ready_worker(pool, "c")
    assert not pool.unknown_model("gamma")


async def test_a_waiter_is_woken_only_by_a_slot_on_a_worker_serving_its_model():
    pool, a, b = two_models(capacity=1)
    assert pool.try_acquire(meta=asks("alpha")) is a
    assert pool.try_acquire(meta=asks("beta")) is b
    waiter = asyncio.create_task(pool.acquire(5.0, meta=asks("alpha")))
    await until(lambda: pool.queued_by_model() == {"alpha": 1}, "an alpha request waiting")
    pool.release(b)  # beta's slot frees: nothing for the alpha request
    await asyncio.sleep(0)
    assert not waiter.done() and pool.queued == 1
    # A beta request takes beta's free slot at once, ahead of the alpha waiter.
    assert await asyncio.wait_for(pool.acquire(1.0, meta=asks("beta")), 1) is b
    pool.release(a)
    assert await asyncio.wait_for(waiter, 1) is a
    assert pool.queued == 0


async def test_models_sharing_a_worker_are_served_in_arrival_order():
    pool = WorkerPool(make_policy("least-connection"), capacity=1, max_queue=10)
    both = ready_worker(pool, "ab", "alpha", "beta")
    ready_worker(pool, "g", "gamma")  # a second model set: routing by model is on
    assert pool.try_acquire(meta=asks("alpha")) is both
    order: list[str] = []

    async def one(model: str) -> None:
        worker = await pool.acquire(5.0, meta=asks(model))
        order.append(model)
        await asyncio.sleep(0)
        pool.release(worker)

    tasks = []
    for n, model in enumerate(("beta", "alpha", "beta", "alpha"), start=1):
        tasks.append(asyncio.create_task(one(model)))
        await until(lambda n=n: pool.queued == n, f"{n} waiting")
    pool.release(both)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["beta", "alpha", "beta", "alpha"]


async def test_the_queue_is_bounded_per_model():
    pool, a, b = two_models(capacity=1, max_queue=1)
    pool.try_acquire(meta=asks("alpha"))
    pool.try_acquire(meta=asks("beta"))
    first = asyncio.create_task(pool.acquire(5.0, meta=asks("alpha")))
    await until(lambda: pool.queued == 1, "one alpha request waiting")
    with pytest.raises(QueueFull):
        await pool.acquire(5.0, meta=asks("alpha"))
    other = asyncio.create_task(pool.acquire(5.0, meta=asks("beta")))  # beta's own queue
    await until(lambda: pool.queued_by_model() == {"alpha": 1, "beta": 1}, "one of each waiting")
    pool.release(a)
    pool.release(b)
    assert await asyncio.wait_for(first, 1) is a
    assert await asyncio.wait_for(other, 1) is b


async def test_the_balancer_routes_by_model_lists_the_union_and_refuses_an_unknown_one(
    daemon, upstream, http
):
    alpha = await upstream(build_app("wa", 4, 0.0, None, model="alpha"))
    beta = await upstream(build_app("wb", 4, 0.0, None, model="beta"))
    d = await daemon(endpoints=[alpha.url, beta.url])
    await d.wait_ready(2)
    await until(lambda: d.deployment.pool.routes_by_model, "both workers' models known")
    # Each model three times in a row: least-connection alone would alternate the workers.
    for model, worker in [("beta", "wb")] * 3 + [("alpha", "wa")] * 3:
        async with http.post(f"{d.url}{CHAT}", json={"model": model}) as resp:
            assert resp.status == 200
            assert resp.headers["x-worker-id"] == worker
            assert (await resp.json())["model"] == model
    async with http.get(f"{d.url}/v1/models") as resp:
        listed = await resp.json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["alpha", "beta"]
    async with http.post(f"{d.url}{CHAT}", json={"model": "gamma"}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["param"] == "model"
    assert "'gamma'" in error["message"] and "alpha, beta" in error["message"]
    seen = set()
    for _ in range(4):  # no model: any worker (least-connection alternates between idle ones)
        async with http.post(f"{d.url}{CHAT}", json={}) as resp:
            assert resp.status == 200
            seen.add(resp.headers["x-worker-id"])
    assert seen == {"wa", "wb"}
    status = d.deployment.snapshot()
    assert {w["url"]: w["models"] for w in status["workers"]} == {
        alpha.url: ["alpha"],
        beta.url: ["beta"],
    }


@pytest.mark.e2e
def test_a_real_daemon_routes_two_groups_by_model(tmp_path, flockctl_home):
    groups = "".join(
        f"    - name: {name}\n"
        f"      worker_command: '{fake_worker_command('--model', model)}'\n"
        "      min_workers: 1\n"
        "      max_workers: 1\n"
        for name, model in (("small", "alpha"), ("large", "beta"))
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"flockctl:\n  groups:\n{groups}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = flockctl("up", str(spec), "--port", str(port), "--probe-interval", "0.2")
    try:
        assert started.code == 0, started.err
        until_sync(lambda: len(ready_ids()) == 2, "both groups' workers READY")
        snap = flockctl("status", "--json").json()
        group_of = {w["id"]: w["group"] for w in snap["workers"]}
        assert {w["group"]: w["models"] for w in snap["workers"]} == {
            "small": ["alpha"],
            "large": ["beta"],
        }
        assert [(g["name"], g["target"], g["ready"]) for g in snap["groups"]] == [
            ("small", 1, 1),
            ("large", 1, 1),
        ]
        with httpx.Client(timeout=10) as client:
            for model, group in [("beta", "large")] * 3 + [("alpha", "small")] * 3:
                resp = client.post(f"{url}{CHAT}", json={"model": model, "max_tokens": 2})
                assert resp.status_code == 200 and resp.json()["model"] == model
                assert group_of[resp.headers["x-worker-id"]] == group
            listed = client.get(f"{url}/v1/models").json()
            assert [m["id"] for m in listed["data"]] == ["alpha", "beta"]
            resp = client.post(f"{url}{CHAT}", json={"model": "gamma"})
            assert resp.status_code == 404
            assert "served models: alpha, beta" in resp.json()["error"]["message"]
        shown = flockctl("status").out
        assert "group small" in shown and "group large" in shown
    finally:
        flockctl("down", "--timeout", "20")
