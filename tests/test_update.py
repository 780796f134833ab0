"""``flockctl update``: a deployment moves to its next version without refusing a request.

In-process first: the controller with an in-memory provisioner, a clock the test moves and probes
the test passes by hand, so each step of a rolling or blue-green update happens when the test
says. Then end to end: real fake-worker processes under steady plain and streaming load while
``flockctl update`` runs, and a broken new version rolled back.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import pytest
from cli_driver import Result, flockctl, processes_with
from conftest import FAKE_WORKER, TOKEN, free_port, until
from fleet import MemoryProvisioner, Rig, start_rig

from flockctl.server.update import Update
from flockctl.server.workers import WorkerState

S = WorkerState


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await start_rig(MemoryProvisioner())
    assert r.by_version(1) == ["w1", "w2"]
    yield r
    await r.controller.stop(drain=False)


async def test_rolling_update_replaces_one_worker_at_a_time(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "rolling", max_surge=1)
    await rig.tick()
    # One new worker above the target; no old one goes before it is READY.
    assert [w.id for w in rig.controller.live()] == ["w3"]
    assert rig.by_version(1) == ["w1", "w2"]
    await rig.tick()
    assert len(rig.controller.live()) == 1, "a second new worker before the first was READY"
    rig.ready_all()
    await rig.tick()
    # w3 READY: one old worker drained, and the next new one started.
    assert len(rig.by_version(1)) == 1
    assert [w.id for w in rig.controller.live()] == ["w3", "w4"]
    assert update.running
    rig.ready_all()
    await rig.tick()
    await rig.tick()
    assert rig.by_version(1) == []
    assert rig.by_version(2) == ["w3", "w4"]
    assert update.state == "succeeded"
    assert sorted(rig.provisioner.terminated) == ["w1", "w2"]


async def test_blue_green_switches_only_when_the_whole_new_set_is_ready(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "blue-green")
    await rig.tick()
    assert [w.id for w in rig.controller.live()] == ["w3", "w4"]
    rig.pool.set_state(rig.pool.get("w3"), S.READY)  # type: ignore[arg-type]
    await rig.tick()
    assert rig.by_version(1) == ["w1", "w2"], "the old set drained before the new one was ready"
    rig.ready_all()
    await rig.tick()
    await rig.tick()
    assert rig.by_version(1) == []
    assert update.state == "succeeded"


async def test_a_crash_looping_new_version_is_rolled_back(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "rolling")
    for _ in range(4):
        await rig.tick()
        for worker in rig.controller.live():
            if worker.state == S.STARTING:
                rig.provisioner.exited[worker.id] = "process exited with code 1: bad flag"
    assert update.state == "rolled_back"
    assert update.reason is not None and "bad flag" in update.reason
    # The old set kept serving throughout, and the controller launches the old version again.
    assert rig.by_version(1) == ["w1", "w2"]
    assert rig.controller.version == 1 and rig.controller.blocked is None
    assert not [w for w in rig.pool if w.version == 2 and w.live]


async def test_a_new_version_never_ready_is_rolled_back_after_the_timeout(rig: Rig) -> None:
    update = Update(rig.controller, "u2", 1, 2, "blue-green", timeout=60)
    await rig.tick()
    await rig.tick(59)
    assert update.running
    await rig.tick(2)
    assert update.state == "rolled_back"
    assert update.reason is not None and "not READY within 60s" in update.reason
    assert rig.by_version(1) == ["w1", "w2"]


# -- end to end: real daemon, real worker processes, real load -------------------------------------


def worker_command(marker: Path, version: str, *extra: str) -> str:
    """A fake worker whose answers name ``version`` as their model; the marker (a file that
    never exists) makes this test's workers findable by their command line."""
    parts = [sys.executable, str(FAKE_WORKER), "--port", "{port}", "--model", version]
    return " ".join([*parts, "--unhealthy-file", str(marker), *extra])


@dataclass
class Load:
    """Plain and streaming requests, back to back, from a few clients, until stopped."""

    url: str
    failures: list[str] = field(default_factory=list)
    #: (when the request started, the model its answer named).
    answers: list[tuple[float, str]] = field(default_factory=list)
    running: bool = True

    async def client(self, session: aiohttp.ClientSession, stream: bool) -> None:
        payload = {"prompt": "hi", "max_tokens": 6, "stream": stream}
        payload["fake_token_delay"] = 0.01
        while self.running:
            began = time.time()
            try:
                async with session.post(f"{self.url}/v1/completions", json=payload) as resp:
                    body = await resp.read()
                if resp.status != 200:
                    self.failures.append(f"HTTP {resp.status}: {body[:200]!r}")
                    continue
                if stream:
                    if not body.endswith(b"data: [DONE]\n\n"):
                        self.failures.append(f"stream cut short: {body[-200:]!r}")
                        continue
                    first = body.split(b"\n\n")[0].removeprefix(b"data: ")
                    model = json.loads(first)["model"]
                else:
                    model = json.loads(body)["model"]
                self.answers.append((began, model))
            except (aiohttp.ClientError, ValueError) as exc:
                self.failures.append(repr(exc))

    async def run(self, clients: int = 4) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self.client(session, n % 2 == 1) for n in range(clients)))


@pytest.fixture
def deployment(tmp_path: Path) -> Any:
    """A two-worker local deployment of version v1; brought down at the end, nothing left."""
    marker = tmp_path / "marker-never-exists"
    port = free_port()
    result = flockctl(
        "up", "--name", "upd", "--port", str(port), "--node-control-key", TOKEN,
        "--worker-command", worker_command(marker, "v1"), "--replicas", "2",
        "--probe-interval", "0.1", "--drain-timeout", "20",
    )  # fmt: skip
    assert result.code == 0, result.err
    yield f"http://127.0.0.1:{port}", marker
    flockctl("down", "--name", "upd", "--timeout", "30")
    assert processes_with(marker) == []


async def snapshot(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        return (await http.get(f"{url}/-/status")).json()


async def ready_models(url: str) -> list[int]:
    return [w["version"] for w in (await snapshot(url))["workers"] if w["state"] == "READY"]


async def update(*args: str) -> Result:
    return await asyncio.to_thread(flockctl, "update", "--name", "upd", *args, timeout=120)


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.mark.e2e
async def test_rolling_then_blue_green_update_under_load_fails_no_request(deployment: Any) -> None:
    url, marker = deployment
    await until(lambda: _count(ready_models(url), 2), "two READY workers of version 1")
    load = Load(url)
    loading = asyncio.create_task(load.run())
    try:
        await until(lambda: len(load.answers) > 20, "requests answered before the update")
        for version, mode in ((2, "rolling"), (3, "blue-green")):
            old = [w["pid"] for w in (await snapshot(url))["workers"] if w["state"] == "READY"]
            result = await update(
                "--worker-command", worker_command(marker, f"v{version}"), "--mode", mode, "--json"
            )
            assert result.code == 0, result.err
            assert result.json()["state"] == "succeeded"
            ended = time.time()
            snap = await snapshot(url)
            assert snap["deployment"]["version"] == version
            live = [w for w in snap["workers"] if w["state"] not in ("TERMINATED", "FAILED")]
            assert {w["version"] for w in live} == {version}, live
            assert alive(old) == [], f"old workers of {mode} update still running"
            count = len(load.answers)
            await until(
                lambda: len(load.answers) > count + 20,  # noqa: B023
                f"requests after the {mode} update (failures: {load.failures[-3:]})",
            )
            after = {model for began, model in load.answers if began > ended}
            assert after == {f"v{version}"}, f"answers after the {mode} update: {after}"
    finally:
        load.running = False
        await loading
    assert load.failures == []
    assert len(load.answers) > 60


async def _count(models: Any, n: int) -> bool:
    return len(await models) >= n


@pytest.mark.e2e
async def test_a_broken_new_version_is_rolled_back_without_a_failed_request(
    deployment: Any,
) -> None:
    url, marker = deployment
    await until(lambda: _count(ready_models(url), 2), "two READY workers of version 1")
    load = Load(url)
    loading = asyncio.create_task(load.run())
    try:
        await until(lambda: len(load.answers) > 10, "requests answered before the update")
        # The new version exits at once: the crash-loop guard stops it and the update rolls back.
        broken = f"{sys.executable} -c 'raise SystemExit(3)' {{port}} {marker}"
        result = await update("--worker-command", broken)
        assert result.code == 9, result.err
        assert "rolled back" in result.err and "version 1 serves" in result.err
        snap = await snapshot(url)
        assert snap["deployment"]["version"] == 1
        assert snap["deployment"]["update"]["state"] == "rolled_back"
        assert "failed before becoming READY" in snap["deployment"]["update"]["reason"]
        # A new version that never gets READY: rolled back after --update-timeout.
        stuck = worker_command(marker, "v3", "--start-delay", "3600")
        result = await update("--worker-command", stuck, "--mode", "blue-green",
                              "--update-timeout", "2")  # fmt: skip
        assert result.code == 9 and "not READY within 2s" in result.err, result.err
        count = len(load.answers)
        await until(lambda: len(load.answers) > count + 10, "requests after the rollbacks")
    finally:
        load.running = False
        await loading
    assert load.failures == []
    assert {model for _, model in load.answers} == {"v1"}
    assert (await snapshot(url))["ready_workers"] == 2


@pytest.mark.e2e
async def test_rollback_brings_back_the_previous_version(deployment: Any) -> None:
    url, marker = deployment
    await until(lambda: _count(ready_models(url), 2), "two READY workers of version 1")
    first = await update("--rollback")
    assert first.code == 9 and "no earlier version" in first.err, first.err
    assert (await update("--worker-command", worker_command(marker, "v2"))).code == 0
    result = await update("--rollback", "--json")
    assert result.code == 0, result.err
    view = result.json()
    assert (view["from_version"], view["to_version"], view["rollback_to"]) == (2, 3, 1)
    snap = await snapshot(url)
    live = [w for w in snap["workers"] if w["state"] == "READY"]
    assert len(live) == 2 and {w["version"] for w in live} == {3}
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert answer.json()["model"] == "v1"


# -- in-process: the admin API and a static deployment ---------------------------------------------


async def test_a_static_deployment_moves_to_the_new_endpoints_under_load(
    daemon: Any, upstream: Any, http: aiohttp.ClientSession
) -> None:
    old = [await upstream(worker_id=n) for n in ("a", "b")]
    new = [await upstream(worker_id=n) for n in ("c", "d")]
    d = await daemon(endpoints=[u.url for u in old])
    await d.wait_ready(2)
    served: list[tuple[float, str]] = []
    failures: list[str] = []
    running = True

    async def client() -> None:
        while running:
            began = time.time()
            async with http.post(f"{d.url}/v1/completions", json={"prompt": "hi"}) as resp:
                await resp.read()
                if resp.status != 200:
                    failures.append(str(resp.status))
                served.append((began, resp.headers["x-worker-id"]))

    clients = [asyncio.create_task(client()) for _ in range(3)]
    try:
        await until(lambda: len(served) > 10, "requests before the update")
        body = {"changes": {"endpoints": [u.url for u in new]}, "mode": "blue-green"}
        async with http.post(f"{d.url}/-/update", json=body, headers=d.admin) as resp:
            assert resp.status == 202, await resp.text()
            started = await resp.json()
        assert (started["from_version"], started["to_version"]) == (1, 2)
        deployment = d.deployment
        await until(lambda: deployment.version == 2, "version 2 serving")
        ended = time.time()
        count = len(served)
        await until(lambda: len(served) > count + 10, "requests after the update")
    finally:
        running = False
        await asyncio.gather(*clients)
    assert failures == []
    assert {who for began, who in served if began > ended} == {"c", "d"}
    live = [w for w in deployment.pool if w.live]
    assert sorted(w.url for w in live) == sorted(u.url for u in new)
    assert {w.version for w in live} == {2}
    snap = deployment.snapshot()
    assert snap["deployment"]["update"] is not None
    assert snap["deployment"]["update"]["state"] == "succeeded"
    saved = json.loads((deployment.state_dir / "config.v2.json").read_text())
    assert saved["endpoints"] == [u.url for u in new]
    assert json.loads((deployment.state_dir / "config.json").read_text()) == saved


async def test_the_admin_api_refuses_updates_it_cannot_do(
    daemon: Any, upstream: Any, http: aiohttp.ClientSession
) -> None:
    first = await upstream(worker_id="a")
    d = await daemon(endpoints=[first.url])
    await d.wait_ready(1)

    async def post(body: dict[str, Any]) -> tuple[int, str]:
        async with http.post(f"{d.url}/-/update", json=body, headers=d.admin) as resp:
            return resp.status, (await resp.json())["error"]["message"]

    config = d.deployment.cfg.model_dump(mode="json")
    assert await post({"rollback": True}) == (
        409,
        "version 1 is the first this deployment ran; there is no earlier version to go back to",
    )
    status, message = await post({"config": {**config, "port": 1}})
    assert status == 422 and message.startswith("port: cannot change with flockctl update")
    status, message = await post({"changes": {"api_key": "k"}})
    assert status == 422 and message.startswith("changes.api_key: an update cannot change it")
    status, message = await post({"config": config, "changes": {}})
    assert status == 422 and "not both" in message
    status, message = await post({"config": {**config, "max_workers": 0}})
    assert status == 422 and message.startswith("config.max_workers")
    async with http.post(f"{d.url}/-/update", json={"rollback": True}) as resp:
        assert resp.status == 401


async def test_the_dashboard_updates_a_static_deployment_after_confirmation(
    daemon: Any, upstream: Any
) -> None:
    from textual.widgets import Input

    from flockctl.tui.app import Dashboard
    from flockctl.tui.dialogs import ConfirmScreen, FormScreen
    from flockctl.tui.feed import Feed
    from flockctl.tui.widgets import WorkersTable

    old = await upstream(worker_id="a")
    new = await upstream(worker_id="b")
    d = await daemon(endpoints=[old.url])
    await d.wait_ready(1)
    app = Dashboard(Feed(d.url, TOKEN, timeout=2.0), interval=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.query_one(WorkersTable)
        await until(lambda: table.row_count == 1, "the worker row", pause=pilot.pause)
        await pilot.press("U")
        assert isinstance(app.screen, FormScreen)
        box = app.screen.query_one("#field-endpoints", Input)
        assert box.value == old.url
        box.value = new.url
        box.focus()
        await pilot.press("enter")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Update default to its next version?" in str(
            app.screen.query_one("#question").render()
        )
        await pilot.press("n")  # cancelled: nothing changes
        await pilot.pause(0.2)
        assert d.deployment.update is None
        await pilot.press("U")
        app.screen.query_one("#field-endpoints", Input).value = new.url
        app.screen.query_one("#field-endpoints", Input).focus()
        await pilot.press("enter", "y")
        await until(lambda: d.deployment.version == 2, "version 2 serving", pause=pilot.pause)
        await until(lambda: table.row_count == 2, "both workers listed", pause=pilot.pause)
        await until(
            lambda: table.cell("w2", "WORKER") == "w2 v2",
            "w2 shown as version 2",
            pause=pilot.pause,
        )
    assert [w.url for w in d.deployment.pool if w.live] == [new.url]


def test_update_takes_the_worker_flags_of_up_under_the_same_names() -> None:
    from typer.main import get_command

    from flockctl.cli import app

    commands = get_command(app).commands  # type: ignore[attr-defined]
    up = {p.name: p.opts for p in commands["up"].params}
    own = {"mode", "max_surge", "update_timeout", "rollback", "group", "wait"}
    shared = [p for p in commands["update"].params if p.name not in own]
    assert {p.name for p in shared} >= {"model", "worker_command", "endpoint", "max_workers"}
    for param in shared:
        assert param.name in up, f"update --{param.name} is not a flag of up"
        assert param.opts == up[param.name], f"update spells {param.name} {param.opts}"
