"""``--policy latency`` with latency probes, through the real balancer and two HTTP workers.

One worker turns slow (every answer, probes included, takes 2 s): once measured it gets no
more user requests for as long as its probes stay slow, well past the decay that used to send
it a user request to find out; once it is fast again its probes win it its share
back. Probes reach the workers directly: they are neither served requests nor in the request
log.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from conftest import Upstream, until

from flockctl.server import prober as prober_module
from flockctl.server.config import ProbeConfig
from flockctl.server.policies import Latency
from flockctl.server.pool import WorkerPool
from flockctl.server.prober import LATENCY_PROBE_PATH, Prober, probe_client
from flockctl.server.workers import Worker
from flockctl.state import REQUEST_LOG

PROMPT = "user request"


class TimedWorker:
    """A completions server whose answers take ``delay`` seconds; it tells user requests from
    latency probes (which do not send ``PROMPT``) and counts both."""

    def __init__(self, worker_id: str) -> None:
        self.id = worker_id
        self.delay = 0.01
        self.user = 0
        self.probes = 0
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_post(LATENCY_PROBE_PATH, self.complete)

    async def health(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def complete(self, req: web.Request) -> web.Response:
        body = await req.json()
        user = body.get("prompt") == PROMPT
        await asyncio.sleep(self.delay)
        if user:
            self.user += 1
        else:
            self.probes += 1
        choice = {"index": 0, "text": "x", "finish_reason": "length"}
        return web.json_response({"choices": [choice]}, headers={"x-worker-id": self.id})


async def round_of(http: aiohttp.ClientSession, url: str, n: int) -> list[str]:
    """``n`` user requests at once; the worker that answered each. (Two at once: the fast
    worker's expected time counts one in flight, so its answers must take half the slow one's
    before the slow one is chosen.)"""

    async def one() -> str:
        body = {"prompt": PROMPT, "max_tokens": 1}
        async with http.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            await r.read()
            return r.headers["x-worker-id"]

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_a_slow_worker_is_probed_not_sent_user_requests_and_wins_them_back(
    daemon, upstream, http
):
    fast, slow = TimedWorker("fast"), TimedWorker("slow")
    ups: list[Upstream] = [await upstream(fast.app), await upstream(slow.app)]
    d = await daemon(
        endpoints=[u.url for u in ups],
        policy="latency",
        latency_decay=0.5,
        latency_probe_interval=0.05,
    )
    await d.wait_ready(2)
    await until(lambda: fast.probes and slow.probes, "both workers probed before any request")
    sent = 0

    slow.delay = 2.0
    probes_at = slow.probes

    async def measured_slow() -> bool:
        nonlocal sent
        await round_of(http, d.url, 2)
        sent += 2
        return slow.probes > probes_at  # a probe took 2 s

    await until(measured_slow, "a slow probe", timeout=30)
    user_before = slow.user
    probes_before = slow.probes
    served: list[str] = []

    async def two_slow_probes() -> bool:
        nonlocal sent
        served.extend(await round_of(http, d.url, 2))
        sent += 2
        return slow.probes >= probes_before + 2

    # Two probes of 2 s each: eight decay times, in which an idle worker's estimate fell below
    # the fast worker's and a user request was sent to find out.
    await until(two_slow_probes, "two slow probes", timeout=30)
    assert slow.user == user_before, "a user request went to the slow worker"
    assert set(served) == {"fast"}

    slow.delay = 0.01
    back: list[str] = []

    async def slow_serves_again() -> bool:
        nonlocal sent
        back.extend(await round_of(http, d.url, 2))
        sent += 2
        return "slow" in back

    await until(slow_serves_again, "the recovered worker to get user requests again", timeout=30)

    # Probes never count as served requests, nor reach the request log.
    assert fast.user + slow.user == sent
    assert fast.probes > 0 and slow.probes >= probes_before + 2
    assert sum(w.served for w in d.deployment.pool) == sent
    request_log = d.server.config.app.request_log
    request_log.flush()
    lines = (d.deployment.state_dir / REQUEST_LOG).read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["/v1/completions"] * sent


async def test_a_probe_asks_one_token_of_the_worker_s_model_and_an_error_measures_nothing(
    upstream, monkeypatch
):
    bodies: list[dict[str, Any]] = []
    status = {"code": 200}
    answered = asyncio.Event()

    async def complete(req: web.Request) -> web.Response:
        bodies.append(await req.json())
        if status["code"] == 0:  # no answer at all
            await answered.wait()
        return web.json_response({"choices": []}, status=status["code"] or 200)

    app = web.Application()
    app.router.add_post(LATENCY_PROBE_PATH, complete)
    up = await upstream(app)
    policy = Latency(probe_interval=1.0)
    pool = WorkerPool(policy, None, 10)
    worker = Worker(id="w", provisioner="static", url=up.url, model="m1")
    async with probe_client() as client:
        prober = Prober(pool, ProbeConfig(), client)
        seconds = await prober.latency_probe(worker)
        assert seconds is not None and 0 < seconds < prober_module.LATENCY_PROBE_TIMEOUT
        assert bodies[-1]["model"] == "m1" and bodies[-1]["max_tokens"] == 1
        status["code"] = 404  # a server without completions: nothing to learn from
        assert await prober.latency_probe(worker) is None
        status["code"] = 0
        monkeypatch.setattr(prober_module, "LATENCY_PROBE_TIMEOUT", 0.2)
        assert await prober.latency_probe(worker) == 0.2  # as slow as it waited, at least
        answered.set()
