"""The dashboard against a real HTTP status feed on 127.0.0.1: a small server of the tests' own
that serves recorded snapshots, which the tests change, stop and restart."""

from __future__ import annotations

import asyncio
import copy
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import TOKEN, failing_worker, fake_worker_command, free_port, until
from dashboard_data import SIZE, snapshot
from rich.console import Console
from textual.command import CommandList, CommandPalette
from textual.widgets import Input, RichLog, Static

from flockctl.client import ClientError
from flockctl.request_log_reader import RequestFilter
from flockctl.themes import ThemeError, load_theme, load_themes
from flockctl.tui.app import Dashboard, DashboardCommands, binding_ids
from flockctl.tui.dialogs import ConfirmScreen, FormScreen, StartScreen
from flockctl.tui.feed import Feed
from flockctl.tui.latency import LatencyPanel, LatencyWindow, sparkline
from flockctl.tui.layout import share_rows
from flockctl.tui.requests import RequestScreen, RequestsScreen, RequestsTable
from flockctl.tui.screens import LogsScreen, WorkerScreen
from flockctl.tui.settings import SettingsError, load_keymap, remembered
from flockctl.tui.widgets import JobsTable, WorkersTable


class StatusFeed:
    """Serves ``self.snap`` at ``/-/status`` to callers with the token, and the admin routes the
    dashboard's screens and actions use, recording every call; stoppable and restartable on the
    same port."""

    def __init__(self) -> None:
        self.snap = snapshot()
        self.requests = 0
        self.port = 0
        self.calls: list[tuple[str, str, Any]] = []
        self.log: list[str] = [f"line {i}" for i in range(5)]
        self.answer: tuple[int, str] | None = None  # an error every admin action gets
        self._runner: web.AppRunner | None = None

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def _status(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"error": {"message": "bad token"}}, status=401)
        self.requests += 1
        return web.json_response(self.snap)

    async def _worker(self, request: web.Request) -> web.Response:
        wid = request.match_info["id"]
        worker = next((w for w in self.snap["workers"] if w["id"] == wid), None)
        if worker is None:
            return web.json_response({"error": {"message": f"no worker {wid!r}"}}, status=404)
        history = [
            {"at": 1.0, "ok": True, "ms": 1.5, "detail": "HTTP 200"},
            {"at": 2.0, "ok": False, "ms": None, "detail": "timed out after 5s"},
            {"at": 3.0, "ok": True, "ms": 2.0, "detail": "HTTP 200"},
        ]
        return web.json_response({**worker, "probe_history": history, "command": "serve"})

    async def _logs(self, request: web.Request) -> web.Response:
        target = request.match_info["target"]
        if target == "w10":
            msg = "worker w10 has no log: it is a static endpoint"
            return web.json_response({"error": {"message": msg}}, status=404)
        lines = self.log
        if "offset" in request.query:
            offset = int(request.query["offset"])
            if offset > len(lines):
                return web.json_response(
                    {"target": target, "offset": len(lines), "lines": lines, "reset": True}
                )
            new = lines[offset:]
        else:
            new = lines[-int(request.query.get("tail", 200)) :]
        return web.json_response(
            {"target": target, "offset": len(lines), "lines": new, "reset": False}
        )

    async def _action(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.calls.append((request.method, request.path, body))
        if self.answer is not None:
            status, message = self.answer
            return web.json_response({"error": {"message": message}}, status=status)
        return web.json_response({"ok": True}, status=202)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/-/status", self._status)
        app.router.add_get("/-/workers/{id}", self._worker)
        app.router.add_get("/-/logs/{target}", self._logs)
        app.router.add_post("/-/workers", self._action)
        app.router.add_post("/-/workers/{id}/drain", self._action)
        app.router.add_delete("/-/workers/{id}", self._action)
        app.router.add_patch("/-/autoscaler", self._action)
        app.router.add_post("/-/shutdown", self._action)
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
    kw.setdefault("interval", 0.2)
    return Dashboard(Feed(feed.url, TOKEN, timeout=1.0), themes=load_themes(), **kw)


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
        await until(lambda: workers.row_count == 2, "two worker rows", pause=pilot.pause)
        assert keys(workers) == ["w2", "w10"]  # natural order, not string order
        lines = [workers.render_line(y).text for y in range(3)]  # drawn across the screen
        header = "WORKER STATE PROVISIONER URL IN FLIGHT SERVED P50 MS PREEMPT MEMORY"
        assert lines[0].split() == header.split()
        assert lines[1].split()[:4] == ["w2", "●", "READY", "local"] and "2.0/8.0 GiB" in lines[1]
        assert cell(workers, "w2", "state") == "● READY"  # a glyph and a word, not colour alone
        assert cell(workers, "w2", "memory").endswith("2.0/8.0 GiB")
        assert keys(jobs) == ["w2/job-2", "w2/job-10", "w10/job-2", "w10/job-10"]
        assert cell(jobs, "w2/job-2", "state") == "◌ swapped"

        feed.snap["workers"][0]["served"] = 99
        feed.snap["workers"][0]["state"] = "DRAINING"
        await until(
            lambda: cell(workers, "w10", "served") == "99", "w10 served 99", pause=pilot.pause
        )
        assert keys(workers) == ["w2", "w10"] and workers.row_count == 2
        assert "DRAINING" in cell(workers, "w10", "state")

        del feed.snap["workers"][1]
        await until(lambda: keys(workers) == ["w10"], "w2 gone", pause=pilot.pause)
        assert keys(jobs) == ["w10/job-2", "w10/job-10"]


async def test_pause_stops_polling_and_resume_catches_up(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        workers = app.query_one(WorkersTable)
        await until(lambda: workers.row_count == 2, "two worker rows", pause=pilot.pause)
        await pilot.press("p")
        await pilot.pause(0.1)
        seen = feed.requests
        feed.snap["workers"][0]["served"] = 42
        await pilot.pause(0.4)
        assert feed.requests <= seen + 1  # at most the poll already under way
        assert cell(workers, "w10", "served") == "10"
        assert "paused" in str(app.query_one("#connection").render())
        await pilot.press("p")
        await until(lambda: cell(workers, "w10", "served") == "42", "the update", pause=pilot.pause)


async def test_disconnect_keeps_the_last_data_and_reconnects(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        workers = app.query_one(WorkersTable)
        connection = app.query_one("#connection")
        await until(lambda: workers.row_count == 2, "two worker rows", pause=pilot.pause)
        await feed.stop()
        await until(
            lambda: connection.has_class("lost"), "the disconnected line", pause=pilot.pause
        )
        assert "disconnected" in str(connection.render())
        assert workers.row_count == 2  # the last good data stays
        feed.snap["workers"][0]["served"] = 7
        await feed.start()  # same port
        await until(
            lambda: cell(workers, "w10", "served") == "7", "data after reconnect", pause=pilot.pause
        )
        await until(lambda: not connection.has_class("lost"), "the line cleared", pause=pilot.pause)


async def test_a_rejected_token_shows_as_the_daemons_answer(feed: StatusFeed) -> None:
    app = Dashboard(Feed(feed.url, "wrong", timeout=1.0), interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        connection = app.query_one("#connection")
        await until(lambda: connection.has_class("lost"), "the error line", pause=pilot.pause)
        assert "HTTP 401: bad token" in str(connection.render())


@pytest.mark.parametrize(
    "name", ["flockctl-dark", "flockctl-light", "flockctl-colorblind", "flockctl-terminal"]
)
async def test_each_theme_applies(feed: StatusFeed, name: str) -> None:
    app = app_for(feed, theme_name=name)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.query_one(WorkersTable).row_count == 2, "rows", pause=pilot.pause)
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
            await until(lambda: len(calls) >= 3, "three polls", pause=pilot.pause)
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
    (tmp_path / "flockctl" / "themes" / "broken.toml").unlink()
    (tmp_path / "flockctl" / "config.toml").write_text('[dashboard.keys]\nstop = "s"\n')
    r = runner.invoke(app, ["dashboard"])
    assert r.exit_code == 2 and "'stop' is not a binding id" in r.output
    r = runner.invoke(app, ["up", "--dashboard", "--json"])
    assert r.exit_code == 2 and "--dashboard cannot be used with --json" in r.output


def text(widget: Any) -> str:
    """What a Static shows, as plain text (its content may be a Rich table)."""
    console = Console(width=SIZE[0], file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def log_text(view: RichLog) -> str:
    """A log view's lines as one text, wrapped lines joined again."""
    return " ".join(" ".join(line.text.split()) for line in view.lines)


async def ready(pilot: Any, app: Dashboard) -> None:
    await until(
        lambda: app.query_one(WorkersTable).row_count == 2, "two worker rows", pause=pilot.pause
    )


async def type_into(pilot: Any, selector: str, text: str) -> None:
    box = pilot.app.screen.query_one(selector, Input)
    box.value = text
    box.focus()
    await pilot.pause()


async def test_each_action_sends_its_admin_call(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)

        async def sent(n: int) -> tuple[str, str, Any]:
            await until(lambda: len(feed.calls) >= n, f"admin call {n}", pause=pilot.pause)
            await pilot.pause(0.05)
            assert len(feed.calls) == n, feed.calls  # exactly one call per action
            return feed.calls[-1]

        await pilot.press("a")
        assert await sent(1) == ("POST", "/-/workers", None)

        await pilot.press("d")  # the cursor is on the first worker: w2
        assert isinstance(app.screen, ConfirmScreen)
        assert "Drain worker w2?" in str(app.screen.query_one("#question").render())
        await pilot.press("y")
        assert await sent(2) == ("POST", "/-/workers/w2/drain", None)

        await pilot.press("down", "x")
        await pilot.press("n")  # cancelled: nothing sent
        await pilot.pause(0.2)
        assert len(feed.calls) == 2 and app.screen is app.overview
        await pilot.press("x", "y")
        assert await sent(3) == ("DELETE", "/-/workers/w10", None)

        await pilot.press("b")
        assert isinstance(app.screen, FormScreen)
        await type_into(pilot, "#field-min", "5")
        await type_into(pilot, "#field-max", "2")
        await pilot.press("enter")  # refused in the form: min > max
        assert "min 5, max 2" in str(app.screen.query_one("#problem").render())
        await type_into(pilot, "#field-max", "8")
        await pilot.press("enter")
        assert await sent(4) == ("PATCH", "/-/autoscaler", {"min_workers": 5, "max_workers": 8})

        await pilot.press("m")
        await type_into(pilot, "#field-model", "tiny-llama")
        await pilot.press("enter")
        assert await sent(5) == ("POST", "/-/workers", {"model": "tiny-llama"})

        await pilot.press("X")
        assert "Shut deployment 'default' down?" in str(app.screen.query_one("#question").render())
        await pilot.press("y")
        assert await sent(6) == ("POST", "/-/shutdown", None)

        feed.answer = (409, "already at max_workers (4)")
        await pilot.press("a")
        await sent(7)
        await until(
            lambda: any("already at max_workers (4)" in n.message for n in app._notifications),
            "the daemon's refusal shown",
            pause=pilot.pause,
        )


#: A worker id that only arrives whole as one quoted path segment: unquoted, the space, ``/``,
#: ``?`` and ``#`` would split it into other path segments, a query and a fragment.
ODD_ID = "w 2/a?b#c"


async def test_ids_that_need_quoting_reach_their_worker(feed: StatusFeed) -> None:
    feed.snap["workers"][1]["id"] = ODD_ID
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert keys(app.query_one(WorkersTable)) == ["w10", ODD_ID]
        await pilot.press("down", "enter")
        assert isinstance(app.screen, WorkerScreen) and app.screen.worker_id == ODD_ID
        probes = app.screen.query_one("#probes")
        await until(lambda: "✓✗✓" in str(probes.render()), "its probe history", pause=pilot.pause)
        recent = app.screen.query_one("#recent", RichLog)
        await until(lambda: len(recent.lines) == 5, "its last log lines", pause=pilot.pause)

        await pilot.press("d", "y")
        await until(lambda: feed.calls, "the drain call", pause=pilot.pause)
        assert feed.calls == [("POST", f"/-/workers/{ODD_ID}/drain", None)]
        await pilot.press("escape")
        jobs = app.query_one(JobsTable)
        jobs.focus()
        jobs.move_cursor(keys(jobs).index(f"{ODD_ID}/job-2"))
        await pilot.press("x", "y")  # remove, from the worker's job row
        await until(lambda: len(feed.calls) == 2, "the remove call", pause=pilot.pause)
        assert feed.calls[1] == ("DELETE", f"/-/workers/{ODD_ID}", None)


async def test_readonly_turns_every_action_off(feed: StatusFeed) -> None:
    app = app_for(feed, readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        for key in ("a", "d", "x", "b", "m", "X"):
            await pilot.press(key)
            await pilot.pause(0.05)
            assert app.screen is app.overview, key  # no dialog opened
        for action in ("add_worker", "drain", "remove", "bounds", "start_model", "shutdown"):
            assert app.check_action(action, ()) is False
            await app.run_action(action)  # even asked directly (a palette, a remapped key)
        await pilot.pause(0.2)
        assert feed.calls == []
        names = [name for name, _cb, _help in DashboardCommands(app.screen)._commands()]
        assert "Open worker w2" in names and not any("Drain" in n or "Add" in n for n in names)


async def test_worker_detail_shows_probes_engine_and_log_and_esc_goes_back(
    feed: StatusFeed,
) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("enter")  # on w2
        assert isinstance(app.screen, WorkerScreen) and app.screen.worker_id == "w2"
        probes = app.screen.query_one("#probes")
        await until(lambda: "✓✗✓" in str(probes.render()), "the probe history", pause=pilot.pause)
        assert "timed out after 5s" in str(probes.render())
        engine = text(app.screen.query_one("#engine"))
        assert "running" in engine and "L0" in engine
        recent = app.screen.query_one("#recent", RichLog)
        await until(
            lambda: len(recent.lines) == 5, "the worker's last log lines", pause=pilot.pause
        )
        await pilot.press("l")
        assert isinstance(app.screen, LogsScreen) and app.screen.target == "w2"
        await pilot.press("escape", "escape")
        assert app.screen is app.overview

        await pilot.press("down", "enter")  # w10: a static endpoint, it has no log
        await until(
            lambda: "no log: it is a static endpoint" in log_text(app.screen.query_one("#recent")),
            "the log's absence explained",
            pause=pilot.pause,
        )
        del feed.snap["workers"][0]
        await until(
            lambda: "no longer in this deployment" in str(app.screen.query_one("#title").render()),
            "the worker gone",
            pause=pilot.pause,
        )


async def test_logs_follow_filter_timestamps_and_reset(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("l")
        logs = app.screen
        assert isinstance(logs, LogsScreen) and logs.target == "daemon"
        view = logs.query_one("#log", RichLog)
        await until(lambda: len(view.lines) == 5, "the first lines", pause=pilot.pause)
        feed.log += ["ERROR disk full", "line 6"]
        await until(lambda: len(logs.lines) == 7, "the new lines, once each", pause=pilot.pause)
        await pilot.pause(0.2)
        assert [line for _at, line in logs.lines][-2:] == ["ERROR disk full", "line 6"]

        await pilot.press("slash", *"error")
        assert [s.text for s in view.lines] == ["ERROR disk full"]
        assert "1 of 7 lines" in str(logs.query_one("#title").render())
        await pilot.press("enter", "s")  # timestamps
        assert view.lines[0].text.endswith(" ERROR disk full") and view.lines[0].text[2] == ":"
        await pilot.press("escape")  # clears the filter, stays on the screen
        assert app.screen is logs and len(view.lines) == 7
        await pilot.press("f", "w")
        assert not logs.follow and logs.wrap and view.wrap and not view.auto_scroll

        feed.log = ["after rotation"]
        await until(
            lambda: [ln for _at, ln in logs.lines] == ["after rotation"], "reset", pause=pilot.pause
        )


async def test_filter_narrows_both_tables_and_the_cursor_keeps_its_row(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        workers, jobs = app.query_one(WorkersTable), app.query_one(JobsTable)
        await pilot.press("down")
        assert workers.cursor_key == "w10"
        del feed.snap["workers"][1]  # w2, above the cursor, goes
        await until(lambda: workers.row_keys == ["w10"], "w2 gone", pause=pilot.pause)
        assert workers.cursor_key == "w10"
        feed.snap = snapshot()
        await until(lambda: workers.row_count == 2, "w2 back", pause=pilot.pause)
        assert workers.cursor_key == "w10" and workers.cursor == 1

        await pilot.press("slash", *"job-10")
        assert workers.row_keys == [] and jobs.row_keys == ["w2/job-10", "w10/job-10"]
        await pilot.press("escape")
        assert workers.row_count == 2 and jobs.row_count == 4


async def test_keys_are_remapped_from_the_config_file(
    feed: StatusFeed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = tmp_path / "flockctl" / "config.toml"
    config.parent.mkdir()
    config.write_text('[dashboard.keys]\npause = "space"\n"logs.wrap" = "W"\n')
    keymap = load_keymap(binding_ids())
    assert keymap == {"pause": "space", "logs.wrap": "W"}
    app = app_for(feed, keymap=keymap)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("p")
        assert app.running.is_set()  # p no longer pauses
        await pilot.press("space")
        assert not app.running.is_set()

    for text, words in (
        ('[dashboard.keys]\npuase = "space"\n', "'puase' is not a binding id; known: .*pause"),
        ("[dashboard.keys]\npause = 3\n", "pause: must be a key name"),
        ('[dashboard]\ntheme = "x"\n', r"unknown field\(s\): theme"),
        ("[dashboard\n", "not valid TOML"),
    ):
        config.write_text(text)
        with pytest.raises(SettingsError, match=words) as info:
            load_keymap(binding_ids())
        assert str(config) in str(info.value)


async def test_the_picked_theme_is_remembered(
    feed: StatusFeed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    app = app_for(feed, theme_name="flockctl-dark", remember_theme=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("t")  # the theme picker: a palette of every registered theme
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"flockctl-light")
        found = app.screen.query_one(CommandList)
        await until(
            lambda: found.option_count == 1, "the one theme that matches", pause=pilot.pause
        )
        await pilot.press("enter")
        await until(lambda: app.theme == "flockctl-light", "the theme picked", pause=pilot.pause)
        assert app.screen is app.overview
    assert remembered() == {"theme": "flockctl-light"}


async def test_no_color_keeps_states_readable(
    feed: StatusFeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert app.no_color
        assert any(type(f).__name__ in ("Monochrome", "NoColor") for f in app._filters)
        # Without colour the state still reads: a glyph and a word.
        assert app.query_one(WorkersTable).cell("w2", "STATE") == "● READY"


async def test_without_a_daemon_it_offers_to_start_one_then_watches_it(feed: StatusFeed) -> None:
    asked: list[tuple[Path | None, int]] = []

    def starter(spec: Path | None, workers: int) -> tuple[str, str]:
        asked.append((spec, workers))
        if spec is not None:
            raise ClientError(f"{spec}: no such file")
        return feed.url, TOKEN  # the deployment it "started"

    app = Dashboard(None, 0.2, load_themes(), name="demo", starter=starter)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, StartScreen)
        assert "No deployment named 'demo' is running" in text(app.screen.query_one("#question"))
        for key in ("a", "d", "l", "slash"):
            await pilot.press(key)  # nothing to act on yet
        assert isinstance(app.screen, StartScreen) and feed.requests == 0

        app.screen.query_one("#worker-count", Input).value = "0"
        await pilot.click("#demo")
        assert "0 is not a number from 1 to 64" in text(app.screen.query_one("#problem"))
        app.screen.query_one("#spec", Input).value = "missing.yaml"
        await pilot.click("#from-spec")
        await until(
            lambda: "no such file" in text(app.screen.query_one("#problem")),
            "err",
            pause=pilot.pause,
        )
        assert not app.screen.query_one("#demo").disabled  # another try is possible

        app.screen.query_one("#worker-count", Input).value = "3"
        await pilot.click("#demo")
        await ready(pilot, app)
        assert asked == [(Path("missing.yaml"), 0), (None, 3)]
        assert app.screen is app.overview


@pytest.mark.e2e
def test_start_deployment_runs_a_real_daemon_from_a_spec(tmp_path: Path) -> None:
    from flockctl import daemon
    from flockctl.state import running_daemon, state_dir
    from flockctl.tui.launch import start_deployment

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "flockctl:\n"
        f"  worker_command: {fake_worker_command()!r}\n"
        "  min_workers: 1\n"
        f"  port: {free_port()}\n"
    )
    try:
        endpoint, token = start_deployment("started", spec, 0)
        record = running_daemon("started")
        assert record is not None and (record.endpoint, record.token) == (endpoint, token)
        with pytest.raises(ClientError, match=r"spec\.yaml") as info:
            start_deployment("other", tmp_path / "nope" / "spec.yaml", 0)
        assert info.value.code == 2
    finally:
        daemon.stop("started", state_dir("started"), 30)
    assert running_daemon("started") is None


def crowd(workers: int, jobs_each: int) -> dict[str, Any]:
    """The recorded snapshot with ``workers`` engine workers of ``jobs_each`` jobs each."""
    snap = snapshot()
    base = snap["workers"][0]
    snap["workers"] = []
    for w in range(1, workers + 1):
        worker = copy.deepcopy(base)
        worker["id"] = f"w{w}"
        worker["engine"]["jobs"] = [
            {"id": f"job-{j}", "state": "running", "age": 1.0} for j in range(jobs_each)
        ]
        snap["workers"].append(worker)
    return snap


def test_share_rows_serves_the_smaller_need_in_full() -> None:
    assert share_rows(30, [3, 101]) == [3, 27]  # few workers: the jobs get the rest
    assert share_rows(30, [41, 5]) == [25, 5]  # few jobs: the workers get the rest
    assert share_rows(30, [41, 101]) == [15, 15]  # both cut: half each
    assert share_rows(31, [41, 101]) == [16, 15]
    assert share_rows(30, [5, 9]) == [5, 25]  # both fit: the last one fills the screen
    assert share_rows(0, [5, 9]) == [0, 0]


async def test_tables_share_the_height_by_what_they_hold(feed: StatusFeed) -> None:
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        workers, jobs = app.query_one(WorkersTable), app.query_one(JobsTable)
        await ready(pilot, app)

        def heights() -> tuple[int, int]:
            return workers.size.height, jobs.size.height

        # Two workers and 4 jobs: the workers table is as tall as its rows, no blank rows.
        await until(
            lambda: heights()[0] == 3, "the workers table fitting its 2 rows", pause=pilot.pause
        )
        available = sum(heights())
        assert available > 20 and heights()[1] == available - 3

        feed.snap = crowd(2, 100)  # few workers, many jobs: the jobs get every other row
        await until(lambda: jobs.row_count == 200, "200 jobs", pause=pilot.pause)
        await until(
            lambda: heights() == (3, available - 3), "the jobs table growing", pause=pilot.pause
        )

        feed.snap = crowd(40, 0)  # many workers, no jobs: the workers are no longer cut
        feed.snap["workers"][0]["engine"]["jobs"] = [{"id": "job-1", "state": "running"}]
        await until(lambda: workers.row_count == 40, "40 workers", pause=pilot.pause)
        await until(
            lambda: heights() == (available - 3, 3), "the workers table growing", pause=pilot.pause
        )

        feed.snap = crowd(40, 5)  # both cut: half each
        await until(lambda: jobs.row_count == 200, "200 jobs", pause=pilot.pause)
        await until(
            lambda: abs(heights()[0] - heights()[1]) <= 1, "an even split", pause=pilot.pause
        )
        assert sum(heights()) == available


async def test_figures_read_as_flockctl_status_prints_them(feed: StatusFeed) -> None:
    feed.snap["autoscaler"]["qlrm"] = 0.00619762
    feed.snap["workers"][1]["latency_p50_ms"] = 3.3333
    feed.snap["workers"][0]["latency_p50_ms"] = 187.04
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        workers = app.query_one(WorkersTable)
        panel = text(app.query_one("AutoscalerPanel"))
        assert "qlrm 0.01 (autoscale_up 7" in panel and "0.0061" not in panel
        assert panel.count("qlrm 0.01") == 1 and "qlrm: " not in panel
        assert cell(workers, "w2", "p50 ms") == "3.3"
        assert cell(workers, "w10", "p50 ms") == "187.0"
        await pilot.press("enter")
        facts = app.screen.query_one("#facts")
        await until(
            lambda: ["p50", "ms", "3.3"] in [line.split() for line in text(facts).splitlines()],
            "p50 in the detail",
            pause=pilot.pause,
        )


async def test_memory_says_whose_and_preemptions_are_counted(feed: StatusFeed) -> None:
    w10, w2 = feed.snap["workers"]
    w2["gpu_memory"] |= {"device": "cuda:0", "source": "nvml"}
    w10["gpu_memory"] |= {"device": "cpu", "source": "psutil"}
    w2["engine"]["preemptions_total"] = {"descheduled": 4, "swapped": 1, "recomputed": 0}
    w10["engine"] = None  # not flockctl's engine: nothing counted
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        workers = app.query_one(WorkersTable)
        assert cell(workers, "w2", "memory") == "GPU cuda:0 ██░░░░░░░░ 2.0/8.0 GiB"
        assert cell(workers, "w10", "memory") == "host       ██░░░░░░░░ 2.0/8.0 GiB"
        lines = [workers.render_line(y).text for y in range(3)]
        assert lines[1].index("█") == lines[2].index("█")  # the bars line up
        assert cell(workers, "w2", "preempt") == "5" and cell(workers, "w10", "preempt") == "-"

        await pilot.press("enter")  # w2
        facts, engine = app.screen.query_one("#facts"), app.screen.query_one("#engine")
        await until(
            lambda: "GPU cuda:0" in text(facts), "the memory in the detail", pause=pilot.pause
        )
        assert "memory     GPU cuda:0 ██░░░░░░░░ 2.0/8.0 GiB (read by nvml)" in text(facts)
        assert "preemptions  5 (4 descheduled, 1 swapped, 0 recomputed)" in text(engine)


async def test_help_lists_every_screens_keys_including_esc(feed: StatusFeed) -> None:
    app = app_for(feed, keymap={"logs.wrap": "W"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("question_mark")
        shown = [line for part in app.screen.query(Static) for line in text(part).splitlines()]

        def keys_of(binding_id: str) -> str:
            rows = [line for line in shown if line.split()[-1:] == [binding_id]]
            assert rows, f"{binding_id} is not listed"
            return rows[0].rsplit(None, 1)[0].rsplit("  ", 1)[0].strip()

        assert keys_of("back") == "esc"  # listed though nothing is open to go back from
        assert keys_of("filter") == "/"
        assert keys_of("logs.follow") == "f" and keys_of("logs.timestamps") == "s"
        assert keys_of("logs.wrap") == "W"  # as remapped
        assert keys_of("confirm.no") == "n esc" and keys_of("form.cancel") == "esc"
        assert keys_of("table.select") == "⏎" and keys_of("help.close") == "esc ? q"
        listed = {line.split()[-1] for line in shown if line.strip()}
        assert binding_ids() <= listed


async def test_long_log_lines_draw_no_horizontal_scrollbar(feed: StatusFeed) -> None:
    feed.log = ["x" * 300, "short"]
    partial_blocks = "▉▊▋▌▍▎"  # a horizontal scrollbar's thumb ends
    app = app_for(feed)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("enter")
        recent = app.screen.query_one("#recent", RichLog)
        await until(lambda: "short" in log_text(recent), "the log lines", pause=pilot.pause)
        assert log_text(recent).count("x") == 300  # wrapped: all of it shows
        assert recent.scrollbar_size_horizontal == 0
        assert not set(partial_blocks) & set(app.export_screenshot())

        await pilot.press("l")
        view = app.screen.query_one("#log", RichLog)
        await until(lambda: len(view.lines) == 2, "the log view's lines", pause=pilot.pause)
        assert view.virtual_size.width > view.size.width  # wrap is off: the line is cut...
        assert view.scrollbar_size_horizontal == 0  # ...with no bar under it
        assert not set(partial_blocks) & set(app.export_screenshot())
        await pilot.press("right")
        assert view.scroll_x > 0  # and it still scrolls sideways


# -- latency panel and requests screen -------------------------------------------------------------


async def test_requests_screen_follows_filters_and_opens_attempts_and_the_jobs_timeline(
    daemon: Any, upstream: Any, http: Any, served: str
) -> None:
    """A real daemon in front of a failing worker and a real engine on a tiny model: the overview
    shows each worker's latency, ``r`` lists the requests, the filter keeps the retried one, and
    ``enter`` shows both its attempts and the engine job's timeline through ``/jobs/{id}``."""
    failing, hits = failing_worker(503)
    bad = await upstream(failing)
    d = await daemon(endpoints=[bad.url, served], policy="round-robin")
    await d.wait_ready(2)
    ids = {w.url: w.id for w in d.deployment.pool}
    for _ in range(2):  # round robin sends one of them to the failing worker first
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        async with http.post(f"{d.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
    assert hits["n"] >= 1
    app = Dashboard(Feed(d.url, TOKEN, timeout=5.0), interval=0.1, themes=load_themes())
    async with app.run_test(size=SIZE) as pilot:
        panel = app.overview.query_one(LatencyPanel)

        def served_row() -> list[str]:
            rows = [line for line in text(panel).splitlines() if ids[served] in line]
            return rows[0].split() if rows and "P99 MS" in text(panel) else []

        # both requests ended on the engine; the daemon records the second one's latency as its
        # response ends, so a refresh may show the first alone before both
        await until(
            lambda: served_row()[1:2] == ["2"], "the engine worker's latency", pause=pilot.pause
        )

        await pilot.press("r")
        assert isinstance(app.screen, RequestsScreen)
        table = app.screen.query_one(RequestsTable)
        await until(lambda: table.row_count == 2, "both requests", pause=pilot.pause)
        assert table.cell(table.row_keys[-1], "WORKER") == ids[served]
        assert table.cursor_key == table.row_keys[-1]  # following the newest

        await pilot.press("slash")
        await type_into(pilot, "#filter", "5xx")
        await until(lambda: table.row_count == 0, "no failed request", pause=pilot.pause)
        await pilot.press("ctrl+a", "ctrl+k")  # clear the line
        await type_into(pilot, "#filter", "9xx")
        title = app.screen.query_one("#title")
        await until(lambda: "'9xx'" in text(title), "the bad filter named", pause=pilot.pause)
        await pilot.press("ctrl+a", "ctrl+k")
        await type_into(pilot, "#filter", f"worker:{ids[bad.url]}")
        await until(lambda: table.row_count == 1, "the retried request", pause=pilot.pause)
        await pilot.press("enter")  # applies the filter and leaves the box
        table.focus()
        await pilot.press("enter")

        assert isinstance(app.screen, RequestScreen)
        attempts = text(app.screen.query_one("#attempts"))
        first, second = (line for line in attempts.splitlines() if line.strip()[:1] in "12")
        assert ids[bad.url] in first and "503" in first
        assert ids[served] in second and "200" in second
        timeline = app.screen.query_one("#timeline")
        await until(lambda: "finished" in text(timeline), "the job's timeline", pause=pilot.pause)
        shown = text(timeline)
        for event in ("admitted", "scheduled", "first_token", "finished"):
            assert event in shown
        assert app.screen.paths() == []  # a finished job is not fetched again
        await pilot.press("escape")
        assert isinstance(app.screen, RequestsScreen)
        await pilot.press("escape", "escape")
        assert app.screen is app.overview


def test_latency_window_percentiles_buckets_and_a_new_daemon() -> None:
    now = 1_000_000.0
    window = LatencyWindow(clock=lambda: now)

    def record(ago: float, worker: str | None, latency: float) -> dict[str, Any]:
        stamp = datetime.fromtimestamp(now - ago, UTC).isoformat(timespec="milliseconds")
        return {"time": stamp, "worker": worker, "ttfb_ms": latency / 2, "latency_ms": latency}

    fast = [record(5, "a", float(ms)) for ms in range(1, 101)]  # 1..100 ms in the newest bucket
    window.take({"records": [*fast, record(20, "b", 7.0), record(1000, "a", 9999.0)], "last": 103})
    window.take({"records": [record(5, None, 1.0)], "last": 104})  # refused: no worker
    assert window.last == 104 and "after=104" in window.path()
    a, b = window.workers()
    assert (a.worker, a.requests, b.worker, b.requests) == ("a", 100, "b", 1)
    assert a.latency == (50.0, 99.0) and a.ttfb == (25.0, 49.5)
    assert a.p99s[-1] == 99.0 and a.p99s[:-1] == [None] * (len(a.p99s) - 1)
    assert b.p99s[-2] == 7.0  # 20 s ago: the bucket before the newest
    assert sparkline(a.p99s, 99.0).plain.endswith("█")
    window.take({"records": [record(1, "c", 3.0)], "last": 1, "reset": True})
    assert [w.worker for w in window.workers()] == ["c"]


def test_the_one_line_request_filter() -> None:
    keep = RequestFilter.parse("5xx 429 >500ms worker:w1 timeout")
    assert keep.classes == {5} and keep.statuses == {429} and keep.slow_ms == 500
    assert keep.worker == "w1" and keep.text == "timeout"
    assert RequestFilter.parse(keep.describe()) == keep
    slow_503 = {"status": 503, "latency_ms": 800, "worker": "w2", "attempts": [{"worker": "w1"}]}
    assert keep.matches({**slow_503, "note": "read timeout"})
    assert not keep.matches(slow_503)  # no "timeout" in it
    assert not RequestFilter.parse("slow:900").matches(slow_503)
    assert not RequestFilter.parse("worker:w3").matches(slow_503)
    assert not RequestFilter()  # keeps everything
    with pytest.raises(ValueError, match="'7xx'"):
        RequestFilter.parse("7xx")
