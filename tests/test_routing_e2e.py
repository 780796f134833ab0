"""Prefix routing and sticky sessions through the real daemon, with two worker processes.

Without them, least-connection alternates sequential requests between two idle workers (ties go
to the one that served fewer), so every assertion below fails under the default policy.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from conftest import Daemon, fake_worker_command

pytestmark = pytest.mark.e2e


async def served_by(
    http: aiohttp.ClientSession,
    d: Daemon,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> str:
    async with http.post(f"{d.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["x-worker-id"]


def conversation(system: str, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}"})
        messages.append({"role": "assistant", "content": f"answer {i}"})
    messages.append({"role": "user", "content": f"question {turns}"})
    return messages


async def two_workers(daemon: Any, **fields: Any) -> Daemon:
    d = await daemon(worker_command=fake_worker_command(), autoscaler="fixed", replicas=2, **fields)
    await d.wait_ready(2)
    return d


async def test_prefix_policy_keeps_a_conversation_on_one_worker(daemon, http):
    d = await two_workers(daemon, policy="prefix")
    first_system = "You are the first assistant and you answer in long sentences. " * 20
    second_system = "Tu es le second assistant; tu reponds en francais, toujours. " * 20
    first = [await served_by(http, d, {"messages": conversation(first_system, 0)})]
    second = [await served_by(http, d, {"messages": conversation(second_system, 0)})]
    for turn in range(1, 5):
        first.append(await served_by(http, d, {"messages": conversation(first_system, turn)}))
        second.append(await served_by(http, d, {"messages": conversation(second_system, turn)}))
    assert len(set(first)) == 1, first
    assert len(set(second)) == 1, second
    assert first[0] != second[0]  # a new conversation goes to the least loaded worker
    policy = d.deployment.pool.policy
    assert policy.decisions["prefix"] == 8  # type: ignore[attr-defined]


async def test_a_session_sticks_to_its_worker_whatever_its_prompt(daemon, http):
    d = await two_workers(daemon, policy="prefix")
    by_header = [
        await served_by(
            http,
            d,
            {"messages": [{"role": "user", "content": f"topic {i} " * 50}]},
            headers={"x-session-id": "alice"},
        )
        for i in range(4)
    ]
    by_user = [
        await served_by(
            http, d, {"user": "bob", "messages": [{"role": "user", "content": f"{i}" * 300}]}
        )
        for i in range(4)
    ]
    assert len(set(by_header)) == 1, by_header
    assert len(set(by_user)) == 1, by_user
    policy = d.deployment.pool.policy
    assert policy.decisions["session"] == 6  # type: ignore[attr-defined]


async def test_least_connection_spreads_the_same_conversation(daemon, http):
    """The control: least-connection splits the turns, so the tests above can fail."""
    d = await two_workers(daemon)
    system = "You are the first assistant and you answer in long sentences. " * 20
    seen = {await served_by(http, d, {"messages": conversation(system, t)}) for t in range(4)}
    assert len(seen) == 2
