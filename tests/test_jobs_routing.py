"""``/jobs/{id}`` through the balancer when the holder's instance token is not known yet: a worker
that turned READY since the last stats pull is asked, workers that answer 404 are passed over, and
an id no worker holds is the balancer's own 404."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from conftest import until

from flockctl.engine.engine import Engine


async def test_a_job_on_a_worker_whose_token_is_not_known_yet_is_still_found(
    daemon: Callable, upstream: Callable, served: str, engine: Engine
) -> None:
    other = await upstream()  # a server that has no such job: answers 404 for it
    d = await daemon(endpoints=[other.url, served])
    async with httpx.AsyncClient(base_url=d.url, timeout=30) as http:
        await until(lambda: len(d.deployment.pool.ready()) == 2, "both workers READY")
        # as just after a worker turned READY: no stats pulled, so no instance token known
        assert d.deployment.stats is not None
        await d.deployment.stats.close()
        for worker in d.deployment.pool:
            worker.engine = None
        body = {"prompt": "hello", "max_tokens": 2, "temperature": 0}
        async with httpx.AsyncClient(base_url=served, timeout=30) as direct:
            r = await direct.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        response_id = r.json()["id"]

        found = await http.get(f"/jobs/{response_id}")
        assert found.status_code == 200, found.text
        assert found.json()["id"] == response_id.rpartition("-")[2]

        missing = await http.get(f"/jobs/{response_id[:-4]}0000")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "job_not_found"
