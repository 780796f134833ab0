"""``flockctl update`` of a static deployment with worker groups: a group's endpoint list changes
(a kept URL's worker stays and serves the new version, a new URL's worker joins once READY, a
dropped URL's worker drains with its requests finishing), a group's model changes, a group is
added (first) and one removed (last), and a group whose new URL never answers rolls back alone.
What cannot be done (a URL moving between groups, bounds on a static group, a rename) is refused
naming the field.

The real daemon and balancer in-process on 127.0.0.1, each endpoint a real fake-worker HTTP
server (``fake_worker.build_app``) whose answers the test can hold to keep a request in flight.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cli_driver import flockctl
from conftest import FAKE_WORKER, free_port, until, until_sync
from fake_worker import build_app
from update_traffic import load, post_update

from flockctl.render import status_console, status_view

#: A request carrying this header waits at its worker until the test opens the gate.
HOLD = "x-test-hold"


class Endpoints:
    """Fake workers by name, each serving one model; requests marked ``HOLD`` wait for
    ``release()`` before the worker answers them (still in flight at the balancer)."""

    def __init__(self, upstream: Callable[..., Awaitable[Any]]) -> None:
        self.upstream = upstream
        self.gate = asyncio.Event()
        self.urls: dict[str, str] = {}

    async def start(self, name: str, model: str) -> str:
        app = build_app(name, 4, 0.0, None, model=model)

        @web.middleware
        async def hold(request: web.Request, handler: Any) -> web.StreamResponse:
            if HOLD in request.headers:
                await self.gate.wait()
            return await handler(request)

        app.middlewares.append(hold)
        self.urls[name] = (await self.upstream(app)).url
        return self.urls[name]

    def release(self) -> None:
        self.gate.set()
        self.gate = asyncio.Event()


async def spread(
    d: Any, http: aiohttp.ClientSession, eps: Endpoints, model: str, n: int
) -> set[str]:
    """Which workers take ``n`` requests for ``model`` held at once: least-connection gives
    each of ``n`` workers one, so this is every worker serving ``model`` when it has ``n``."""
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    held = [
        asyncio.create_task(http.post(f"{d.url}/v1/completions", json=body, headers={HOLD: "1"}))
        for _ in range(n)
    ]
    pool = d.deployment.pool
    await until(lambda: sum(w.in_flight for w in pool) == n, f"{n} held requests for {model}")
    eps.release()
    who = set()
    for task in held:
        async with await task as resp:
            assert resp.status == 200, (model, await resp.text())
            who.add(resp.headers["x-worker-id"])
    return who


def by_url(d: Any, group: str) -> dict[str, tuple[str, int]]:
    """The live workers of ``group``: URL -> (worker id, version)."""
    return {w.url: (w.id, w.version) for w in d.deployment.pool if w.group == group and w.live}


def versions(d: Any) -> dict[str, int]:
    return {g["name"]: g["version"] for g in d.deployment.snapshot()["groups"]}


@pytest.mark.parametrize("mode", ["rolling", "blue-green"])
async def test_a_static_groups_update_moves_endpoints_models_and_groups_without_losing_a_request(
    daemon: Any, upstream: Any, http: aiohttp.ClientSession, mode: str
) -> None:
    eps = Endpoints(upstream)
    a1, a2, a3 = [await eps.start(n, "alpha") for n in ("a1", "a2", "a3")]
    b1 = await eps.start("b1", "beta")
    o1 = await eps.start("o1", "omega")
    e1 = await eps.start("e1", "gamma")
    groups = [
        {"name": "chat", "model": "alpha", "endpoints": [a1, a2]},
        {"name": "code", "model": "beta", "endpoints": [b1]},
        {"name": "old", "model": "omega", "endpoints": [o1]},
    ]
    d = await daemon(groups=groups, drain_timeout=60)
    await d.wait_ready(4)
    pool = d.deployment.pool
    await until(lambda: pool.routes_by_model, "the workers' models known")
    before = {g: by_url(d, g) for g in ("chat", "code", "old")}

    # Two held requests for alpha: least-connection gives each chat worker one, so the worker
    # at a1, whose URL the update drops, has a request in flight when its drain begins.
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 4, "stream": True}
    held = [
        asyncio.create_task(http.post(f"{d.url}/v1/completions", json=body, headers={HOLD: "1"}))
        for _ in range(2)
    ]
    chat = [w for w in pool if w.group == "chat"]
    await until(lambda: all(w.in_flight == 1 for w in chat), "a held request on each chat worker")
    at_a1 = pool.get(before["chat"][a1][0])
    assert at_a1 is not None

    config = d.deployment.cfg.model_dump(mode="json")
    new_groups = [
        {"name": "chat", "model": "alpha", "endpoints": [a2, a3]},
        {"name": "code", "model": "beta-2", "endpoints": [b1]},
        {"name": "extra", "model": "gamma", "endpoints": [e1]},
    ]
    # (No load for beta: the update renames code's model, after which beta is unknown.)
    async with load(d.url, ["alpha", "omega"]) as seen:
        changed = {**config, "groups": new_groups}
        status, started = await post_update(d, http, config=changed, mode=mode)
        assert status == 202, started
        update = d.deployment.update
        # The dropped URL's worker drains while its request is still held: the update waits.
        await until(lambda: at_a1.state.value == "DRAINING", "a1's worker to drain", 30)
        assert at_a1.in_flight == 1 and update.running
        assert [s.state for s in update.steps] == ["succeeded", "running", "pending", "pending"]
        count = seen["ok"]
        await until(lambda: seen["ok"] > count + 5, "requests while a1's worker drains")
    assert seen["failed"] == [] and seen["ok"] > 0
    eps.release()
    for task in held:
        async with await task as resp:
            text = await resp.text()
            assert resp.status == 200 and text.rstrip().endswith("[DONE]"), text
    await until(lambda: not update.running, "the update to end", 30)

    view = update.to_dict()
    assert view["state"] == "succeeded", view["reason"]
    assert [(g["name"], g["change"], g["state"]) for g in view["groups"]] == [
        ("extra", "add", "succeeded"),
        ("chat", "update", "succeeded"),
        ("code", "update", "succeeded"),
        ("old", "remove", "succeeded"),
    ]
    assert at_a1.state.value == "TERMINATED" and at_a1.in_flight == 0
    # The kept URLs' workers stayed (same id) and serve the new version; a3 and e1 joined.
    after = {g: by_url(d, g) for g in ("chat", "code", "extra")}
    assert after["chat"][a2] == (before["chat"][a2][0], 2) and set(after["chat"]) == {a2, a3}
    assert after["chat"][a3][1] == 2
    assert after["code"] == {b1: (before["code"][b1][0], 2)}
    assert list(after["extra"]) == [e1]
    await until(lambda: not [w for w in pool if w.group == "old" and w.state.value != "TERMINATED"],
                "old's worker to stop")  # fmt: skip
    assert d.deployment.version == 2
    assert versions(d) == {"chat": 2, "code": 2, "extra": 2}
    # Requests follow the new definitions: code serves beta-2 now, and beta is no more.
    for model, who in (("alpha", {"a2", "a3"}), ("beta-2", {"b1"}), ("gamma", {"e1"})):
        assert await spread(d, http, eps, model, len(who)) == who, model
    async with http.post(f"{d.url}/v1/completions", json={"model": "omega"}) as resp:
        assert resp.status == 404
    # status shows each group's version; config.json follows the new version.
    text = status_console(wide=True)
    with text.capture() as captured:
        text.print(status_view(d.deployment.snapshot()))
    lines = {ln.split()[1]: ln for ln in captured.get().splitlines() if ln.startswith("group ")}
    assert set(lines) == {"chat", "code", "extra"}
    assert all("version 2" in line for line in lines.values()), lines
    saved = json.loads((d.deployment.state_dir / "config.json").read_text())
    assert [(g["name"], g["endpoints"]) for g in saved["groups"]] == [
        ("chat", [a2, a3]),
        ("code", [b1]),
        ("extra", [e1]),
    ]


async def test_a_static_group_whose_new_url_never_answers_rolls_back_alone(
    daemon: Any, upstream: Any, http: aiohttp.ClientSession
) -> None:
    eps = Endpoints(upstream)
    a1, a2 = [await eps.start(n, "alpha") for n in ("a1", "a2")]
    b1, b2 = [await eps.start(n, "beta") for n in ("b1", "b2")]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    groups = [
        {"name": "chat", "model": "alpha", "endpoints": [a1, a2]},
        {"name": "code", "model": "beta", "endpoints": [b1]},
    ]
    probe = {"interval_seconds": 0.05, "timeout_seconds": 2, "initial_delay_seconds": 0.3}
    d = await daemon(groups=groups, probe=probe, max_start_failures=2)
    await d.wait_ready(3)
    before = {g: by_url(d, g) for g in ("chat", "code")}
    config = d.deployment.cfg.model_dump(mode="json")
    new_groups = [
        {"name": "chat", "model": "alpha", "endpoints": [a2, dead]},
        {"name": "code", "model": "beta", "endpoints": [b1, b2]},
    ]
    async with load(d.url, ["alpha", "beta"]) as seen:
        status, answer = await post_update(d, http, config={**config, "groups": new_groups})
        assert status == 202, answer
        await until(lambda: not d.deployment.update.running, "the update to end", 60)
    assert seen["failed"] == [] and seen["ok"] > 0
    view = d.deployment.update.to_dict()
    assert view["state"] == "rolled_back"
    assert (
        view["reason"].startswith("group chat: ")
        and "failed before becoming READY" in (view["reason"])
    )
    assert [(g["name"], g["state"]) for g in view["groups"]] == [
        ("chat", "rolled_back"),
        ("code", "skipped"),
    ]
    # chat runs as before: the same two workers at version 1, none at the dead URL, and its
    # next workers get its old list again.
    assert by_url(d, "chat") == before["chat"] and by_url(d, "code") == before["code"]
    assert d.deployment.provisioner.groups["chat"] == [a1, a2]  # type: ignore[attr-defined]
    assert d.deployment.version == 1 and versions(d) == {"chat": 1, "code": 1}
    assert d.deployment.cfg.groups[0].endpoints == [a1, a2]


async def test_static_group_updates_it_cannot_do_are_refused_naming_the_field(
    daemon: Any, upstream: Any, http: aiohttp.ClientSession
) -> None:
    eps = Endpoints(upstream)
    a1 = await eps.start("a1", "alpha")
    b1 = await eps.start("b1", "beta")
    d = await daemon(
        groups=[
            {"name": "chat", "model": "alpha", "endpoints": [a1]},
            {"name": "code", "model": "beta", "endpoints": [b1]},
        ]
    )
    await d.wait_ready(2)
    config = d.deployment.cfg.model_dump(mode="json")
    chat, code = config["groups"]
    spare = f"http://127.0.0.1:{free_port()}"
    cases: dict[str, dict[str, Any]] = {
        # a1 would be chat's and code's worker at once while the groups move in turn
        f"groups.1.endpoints: {a1} moves from group chat to group code": {
            "groups": [{**chat, "endpoints": [spare]}, {**code, "endpoints": [b1, a1]}]
        },
        "groups: code renamed to coder": {"groups": [chat, {**code, "name": "coder"}]},
        "config.groups.0.max_workers: group 'chat' has one worker per endpoint": {
            "groups": [{**chat, "max_workers": 3}, code]
        },
        "config.groups.1.task: group 'code' gives skypilot workers": {
            "groups": [chat, {"name": "code", "task": {"run": "serve", "resources": {"ports": 1}}}]
        },
        "groups: the new config changes no group": {},
    }
    for said, changed in cases.items():
        status, answer = await post_update(d, http, config={**config, **changed})
        message = answer["error"]["message"]
        assert status == 422, (said, answer)
        assert message.startswith(said), (said, message)
    assert d.deployment.update is None and d.deployment.version == 1
    assert sorted(by_url(d, "chat")) == [a1] and sorted(by_url(d, "code")) == [b1]


@pytest.mark.e2e
def test_the_cli_plans_then_moves_a_static_groups_endpoints(tmp_path: Path) -> None:
    """``flockctl up`` with static groups of fake-worker processes, then ``flockctl update
    --group chat --endpoint ...``: first as a dry run (a plan, nothing started), then for real."""
    ports = {name: free_port() for name in ("a1", "a2", "a3", "b1")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    servers = [
        subprocess.Popen(
            [sys.executable, str(FAKE_WORKER), "--port", str(port), "--id", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, port in ports.items()
    ]
    spec = tmp_path / "static.yaml"
    groups = [
        {"name": "chat", "model": "alpha", "endpoints": [url["a1"], url["a2"]]},
        {"name": "code", "model": "beta", "endpoints": [url["b1"]]},
    ]
    spec.write_text(yaml.safe_dump({"flockctl": {"groups": groups}}))
    try:
        up = flockctl("up", str(spec), "--name", "st", "--port", str(free_port()),
                      "--probe-interval", "0.1")  # fmt: skip
        assert up.code == 0, up.err

        def group_state() -> dict[str, tuple[int, int]]:
            snap = flockctl("status", "--name", "st", "--json").json()
            return {g["name"]: (g["version"], g["ready"]) for g in snap["groups"]}

        until_sync(lambda: group_state() == {"chat": (1, 2), "code": (1, 1)}, "both groups")
        move = ("update", "--name", "st", "--group", "chat", "--endpoint", url["a2"],
                "--endpoint", url["a3"])  # fmt: skip
        planned = flockctl(*move, "--dry-run")
        assert planned.code == 0, planned.err
        assert planned.out.splitlines() == [
            "version 1 -> 2 (rolling); dry run, nothing started",
            "group chat: update",
            f"  endpoints: +{url['a3']}, -{url['a1']} (kept: {url['a2']})",
            "  workers: 1 kept (serving the new version as they are), 1 added (READY first),"
            " 1 drained",
            "group code: none",
            "  workers: kept as they are",
        ]
        assert group_state() == {"chat": (1, 2), "code": (1, 1)}  # nothing moved
        as_json = flockctl(*move, "--dry-run", "--json").json()
        assert [(g["name"], g["change"]) for g in as_json["groups"]] == [
            ("chat", "update"),
            ("code", "none"),
        ]
        moved = flockctl(*move, "--json")
        assert moved.code == 0, moved.err
        view = moved.json()
        assert view["state"] == "succeeded" and [g["name"] for g in view["groups"]] == ["chat"]
        snap = flockctl("status", "--name", "st", "--json").json()
        chat = {w["url"]: w["version"] for w in snap["workers"]
                if w["group"] == "chat" and w["state"] == "READY"}  # fmt: skip
        assert chat == {url["a2"]: 2, url["a3"]: 2}
        refused = flockctl("update", "--name", "st", "--group", "code", "--endpoint", url["a2"])
        assert refused.code == 9
        assert refused.err.strip() == (
            "flockctl: update refused: POST /-/update: HTTP 422: config.groups.1.endpoints:"
            f" {url['a2']} is in groups 'chat' and 'code'; a server is one group's worker"
        )
    finally:
        flockctl("down", "--name", "st", "--timeout", "30")
        for server in servers:
            server.terminate()
            server.wait(10)
