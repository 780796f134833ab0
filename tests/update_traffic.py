"""Traffic that runs through an update in the update tests, and the admin call that starts one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


@contextlib.asynccontextmanager
async def load(url: str, models: list[str]) -> AsyncIterator[dict[str, Any]]:
    """One client per model, sending requests one after another (streamed every other one)
    until the block ends; every answer must be a 200 with the whole stream. Yields the counts:
    ``ok`` and the ``failed`` answers, described."""
    seen: dict[str, Any] = {"ok": 0, "failed": []}
    stop = asyncio.Event()

    async def client(model: str) -> None:
        stream = False
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                stream = not stream
                body = {"model": model, "prompt": "hi", "max_tokens": 3, "stream": stream}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    data = await resp.read()
                if resp.status == 200 and (not stream or data.rstrip().endswith(b"[DONE]")):
                    seen["ok"] += 1
                else:
                    seen["failed"].append(f"{model}: HTTP {resp.status} {data[:200]!r}")

    tasks = [asyncio.create_task(client(m)) for m in models]
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def post_update(d: Any, http: aiohttp.ClientSession, **body: Any) -> tuple[int, Any]:
    """``POST /-/update`` to the daemon ``d``: its status and JSON answer."""
    async with http.post(f"{d.url}/-/update", json=body, headers=d.admin) as resp:
        return resp.status, await resp.json()
