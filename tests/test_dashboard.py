"""The dashboard against a real HTTP status feed on 127.0.0.1: a small server of the tests' own
that serves recorded snapshots, which the tests change, stop and restart."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from flockctl.themes import ThemeError, load_theme, load_themes
from flockctl.tui.app import Dashboard
from flockctl.tui.feed import Feed
from flockctl.tui.widgets import JobsTable, WorkersTable

TOKEN = "s3cret"
SIZE = (140, 40)


def snapshot() -> dict[str, Any]:
    engine = {
        "engine": "flockctl",
        "queue_lengths": [1, 1],
        "jobs": [
            {"id": "job-10", "state": "running", "level": 0, "generated_tokens": 5, "age": 1.2},
            {"id": "job-2", "state": "swapped", "level": 1, "preemptions": 3, "age": 75},
        ],
    }
    worker = {
        "state": "READY",
        "provisioner": "local",
        "in_flight": 1,
        "served": 10,
        "latency_p50_ms": 12.5,
        "gpu_memory": {"used": 2 << 30, "total": 8 << 30},
        "engine": engine,
    }
    return {
        "schema": 1,
        "deployment": {"name": "default", "endpoint": "http://127.0.0.1:3000", "policy": "lc"},
        "autoscaler": {
            "policy": "qlrm",
            "target": 2,
            "min_workers": 1,
            "max_workers": 4,
            "qlrm": 0.5,
            "qlrm_history": [[1.0, 0.0], [2.0, 0.5]],
            "thresholds": {"autoscale_up": 7, "autoscale_down": 4},
            "last_decision": {"target": 2, "reason": "holding"},
        },
        "requests": {"total": 10, "in_flight": 1, "queued": 0, "failed": 0, "rate": 0.5},
        "ready_workers": 2,
        "workers": [
            {**worker, "id": "w10", "url": "http://127.0.0.1:9010"},
            {**copy.deepcopy(worker), "id": "w2", "url": "http://127.0.0.1:9002"},
        ],
    }


class StatusFeed:
    """Serves ``self.snap`` at ``/-/status`` to callers with the token; stoppable and restartable
    on the same port."""

    def __init__(self) -> None:
        self.snap = snapshot()
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _status(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"message": "bad token"}}, status=401)
        self.requests += 1
        return web.json_response(self.snap)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/-/status", self._status)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def feed() -> AsyncIterator[StatusFeed]:
    server = StatusFeed()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def app_for(feed: StatusFeed, **kw: Any) -> Dashboard:
    return Dashboard(Feed(feed.url, TOKEN, timeout=1.0), interval=0.05, themes=load_themes(), **kw)


async def until(pilot: Any, condition: Callable[[], bool], what: str, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def keys(table: Any) -> list[str]:
    """Row keys in the order the table shows them."""
    return table.row_keys


def cell(table: Any, row: str, column: str) -> str:
    return table.cell(row, column.upper())


async def test_rows_appear_in_order_and_update_by_key(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        workers = app.query_one(WorkersTable)
        jobs = app.query_one(JobsTable)
        await until(pilot, lambda: workers.row_count == 2, "two worker rows")
        assert keys(workers) == ["w2", "w10"]  # natural order, not string order
        assert cell(workers, "w2", "state") == "● READY"  # a glyph and a word, not colour alone
        assert cell(workers, "w2", "memory").endswith("2.0/8.0 GiB")
        assert keys(jobs) == ["w2/job-2", "w2/job-10", "w10/job-2", "w10/job-10"]
        assert cell(jobs, "w2/job-2", "state") == "◌ swapped"

        feed.snap["workers"][0]["served"] = 99
        feed.snap["workers"][0]["state"] = "DRAINING"
        await until(pilot, lambda: cell(workers, "w10", "served") == "99", "w10 served 99")
        assert keys(workers) == ["w2", "w10"] and workers.row_count == 2
        assert "DRAINING" in cell(workers, "w10", "state")

        del feed.snap["workers"][1]
        await until(pilot, lambda: keys(workers) == ["w10"], "w2 gone")
        assert keys(jobs) == ["w10/job-2", "w10/job-10"]


async def test_pause_stops_polling_and_resume_catches_up(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        workers = app.query_one(WorkersTable)
        await until(pilot, lambda: workers.row_count == 2, "two worker rows")
        await pilot.press("p")
        await pilot.pause(0.1)
        seen = feed.requests
        feed.snap["workers"][0]["served"] = 42
        await pilot.pause(0.4)
        assert feed.requests <= seen + 1  # at most the poll already under way
        assert cell(workers, "w10", "served") == "10"
        assert "paused" in str(app.query_one("#connection").render())
        await pilot.press("p")
        await until(pilot, lambda: cell(workers, "w10", "served") == "42", "the update")


async def test_disconnect_keeps_the_last_data_and_reconnects(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        workers = app.query_one(WorkersTable)
        connection = app.query_one("#connection")
        await until(pilot, lambda: workers.row_count == 2, "two worker rows")
        await feed.stop()
        await until(pilot, lambda: connection.has_class("lost"), "the disconnected line")
        assert "disconnected" in str(connection.render())
        assert workers.row_count == 2  # the last good data stays
        feed.snap["workers"][0]["served"] = 7
        await feed.start()  # same port
        await until(pilot, lambda: cell(workers, "w10", "served") == "7", "data after reconnect")
        await until(pilot, lambda: not connection.has_class("lost"), "the line cleared")


async def test_a_rejected_token_shows_as_the_daemons_answer(feed: StatusFeed) -> None:
    app = Dashboard(Feed(feed.url, "wrong", timeout=1.0), interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        connection = app.query_one("#connection")
        await until(pilot, lambda: connection.has_class("lost"), "the error line")
        assert "HTTP 401: bad token" in str(connection.render())


@pytest.mark.parametrize(
    "name", ["flockctl-dark", "flockctl-light", "flockctl-colorblind", "flockctl-terminal"]
)
async def test_each_theme_applies(feed: StatusFeed, name: str) -> None:
    app = app_for(feed, theme_name=name)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.query_one(WorkersTable).row_count == 2, "rows")
        assert app.theme == name


def test_theme_files_load_and_errors_name_the_field(tmp_path: Path) -> None:
    themes = load_themes()
    assert {"flockctl-dark", "flockctl-light", "flockctl-colorblind", "flockctl-terminal"} <= set(
        themes
    )
    assert themes["flockctl-terminal"].ansi and not themes["flockctl-light"].dark
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "flockctl-dark"\n[colors]\nprimary = "#FF0000"\n')
    assert load_themes(tmp_path)["flockctl-dark"].primary == "#FF0000"  # the user's file wins
    for text, words in (
        ('name = "x"\n[colors]\nprimary = "#FF0000"\nprimery = "#00FF00"\n', "primery"),
        ('[colors]\nprimary = "#FF0000"\n', "'name'"),
        ('name = "x"\n', "'primary'"),
        ('name = "x"\ncolour = 1\n[colors]\nprimary = "#FF0000"\n', r"unknown field\(s\): colour"),
        ('name = "x\n', "not valid TOML"),
    ):
        mine.write_text(text)
        with pytest.raises(ThemeError, match=words) as info:
            load_theme(mine)
        assert str(mine) in str(info.value)


async def test_the_poller_waits_for_each_poll_before_the_next(feed: StatusFeed) -> None:
    slow = StatusFeed()
    calls: list[float] = []
    inflight = 0
    most = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal inflight, most
        inflight += 1
        most = max(most, inflight)
        calls.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.15)
        inflight -= 1
        return web.json_response(slow.snap)

    slow._status = handler  # type: ignore[method-assign]
    await slow.start()
    try:
        app = Dashboard(Feed(slow.url, TOKEN), interval=0.01)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: len(calls) >= 3, "three polls")
        assert most == 1  # never two polls at once, however short the interval
    finally:
        await slow.stop()


def test_cli_refuses_an_unknown_theme_and_a_missing_daemon(
    flockctl_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from flockctl.cli import app

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    runner = CliRunner()
    r = runner.invoke(app, ["dashboard", "--theme", "nope"])
    assert r.exit_code == 2
    assert "--theme 'nope': no such theme; known: " in r.output
    assert "flockctl-colorblind" in r.output
    r = runner.invoke(app, ["dashboard", "--name", "idle"])
    assert r.exit_code == 3
    assert 'no daemon named "idle" is running' in r.output
    (tmp_path / "flockctl" / "themes").mkdir(parents=True)
    (tmp_path / "flockctl" / "themes" / "broken.toml").write_text('name = "b"\n')
    r = runner.invoke(app, ["dashboard"])
    assert r.exit_code == 2 and "broken.toml: [colors] must set at least 'primary'" in r.output
