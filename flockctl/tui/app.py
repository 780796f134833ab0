"""``flockctl dashboard``: a Textual app that watches one deployment and steers it.

One polling worker fetches ``GET /-/status`` (and whatever the screen on top asked for through
``paths()``: a worker's detail, a log from an offset) and posts one message per poll, scheduling
the next only after the last one finished; ``p`` pauses it. A daemon that stops answering shows as
disconnected over the last good data, and the worker keeps trying, so it reconnects by itself.
Actions go through the admin API; the destructive ones ask first, and ``--readonly`` turns them
all off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.message import Message
from textual.theme import Theme

from flockctl import admin_routes as routes
from flockctl.schema import StatusSnapshot
from flockctl.tui.actions import DeploymentActions
from flockctl.tui.dialogs import ConfirmScreen, FormScreen, StartScreen
from flockctl.tui.feed import Feed, FeedError
from flockctl.tui.help import HelpScreen, KeyRow, key_rows
from flockctl.tui.requests import RequestsScreen
from flockctl.tui.screens import (
    ConnectionLine,
    LiveScreen,
    LogsScreen,
    OverviewScreen,
    WorkerScreen,
)
from flockctl.tui.settings import config_path, remember
from flockctl.tui.widgets import LiveTable

#: Starts the deployment: (SPEC file or None for demo workers, how many) -> (endpoint, token).
Starter = Callable[[Path | None, int], tuple[str, str]]
#: Actions that change the deployment: off with --readonly.
MUTATING = frozenset(
    {"add_worker", "start_model", "drain", "remove", "bounds", "update", "shutdown"}
)


class SnapshotArrived(Message):
    def __init__(self, snap: StatusSnapshot, extras: dict[str, Any]) -> None:
        super().__init__()
        self.snap = snap
        self.extras = extras


class FeedLost(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DashboardCommands(Provider):
    """The dashboard's actions in the command palette (ctrl+p)."""

    def _commands(self) -> Iterable[tuple[str, Any, str]]:
        app: Dashboard = self.app  # type: ignore[assignment]
        daemon_log = partial(app.open_logs, routes.DAEMON_LOG)
        yield "Show the daemon's log", daemon_log, "follow daemon.log"
        yield "Show the requests", app.action_requests, "follow the request log, filter it"
        yield "Pause or resume polling", app.action_toggle_pause, "stop or restart updates"
        yield "Keys", app.action_help, "every key and its binding id"
        workers = [str(w["id"]) for w in app.snapshot["workers"]] if app.snapshot else []
        for worker in workers:
            yield f"Open worker {worker}", partial(app.open_worker, worker), "detail screen"
            yield f"Show the log of {worker}", partial(app.open_logs, worker), "follow its log"
        if app.readonly:
            return
        yield "Add a worker", app.action_add_worker, "one more of the deployment's workers"
        yield "Start an engine worker with a model…", app.action_start_model, "choose a model"
        yield "Set min/max workers…", app.action_bounds, "the autoscaler's bounds"
        yield "Shut the deployment down…", app.action_shutdown, "drain and stop everything"
        for worker in workers:
            yield f"Drain worker {worker}…", partial(app.drain, worker), "finish, then replace"
            yield f"Remove worker {worker}…", partial(app.remove, worker), "and lower the target"

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class Dashboard(DeploymentActions):
    TITLE = "flockctl"
    CSS = """
    DeploymentLine, #title { height: auto; padding: 0 1; background: $panel; }
    ConnectionLine { height: auto; padding: 0 1; }
    ConnectionLine.lost { background: $error; color: $text; }
    ConnectionLine.paused { background: $warning; color: $text; }
    WorkersTable { height: 1fr; min-height: 3; }
    #scaling { height: 5; }
    #scaling.grouped { height: auto; min-height: 5; max-height: 14; }
    #qlrm { width: 30%; min-width: 20; }
    AutoscalerPanel { width: 1fr; padding: 0 1; }
    JobsTable { height: 1fr; min-height: 3; }
    LatencyPanel { height: auto; max-height: 7; padding: 0 1; }
    RequestsTable { height: 1fr; }
    #filter { dock: bottom; margin-bottom: 1; }
    #columns { height: auto; }
    #facts, #engine { width: 1fr; height: auto; padding: 1 1 0 1; }
    #probes { height: auto; padding: 1 1 0 1; }
    .heading { padding: 1 1 0 1; text-style: bold; }
    /* No horizontal scrollbar under log lines (its thumb's end showed as a stray ▋): the recent
       lines wrap, and the log view still scrolls sideways with the arrow keys while wrap is off. */
    #recent { height: 14; padding: 0 1; overflow-x: hidden; }
    #log { height: 1fr; scrollbar-size-horizontal: 0; }
    ConfirmScreen, FormScreen, HelpScreen, StartScreen { align: center middle; }
    .row { height: auto; }
    .row Input { width: 1fr; }
    #worker-count { width: 10; }
    #dialog {
        width: 72; height: auto; max-height: 90%; padding: 1 2;
        border: thick $primary; background: $surface;
    }
    HelpScreen #dialog { width: 96; max-width: 100%; }
    #question { text-style: bold; margin-bottom: 1; }
    #buttons { height: auto; margin-top: 1; align-horizontal: right; }
    #buttons Button { margin-left: 2; }
    #problem { height: auto; color: $error; }
    .hint { color: $text-muted; }
    """
    COMMANDS = App.COMMANDS | {DashboardCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit", id="quit"),
        Binding("question_mark", "help", "Keys", id="help"),
        Binding("p", "toggle_pause", "Pause", id="pause"),
        Binding("slash", "filter", "Filter", id="filter"),
        Binding("l", "logs", "Logs", id="logs"),
        Binding("r", "requests", "Requests", id="requests"),
        Binding("escape", "back", "Back", id="back"),
        Binding("t", "change_theme", "Theme", id="theme"),
        Binding("a", "add_worker", "Add", id="add_worker"),
        Binding("m", "start_model", "Model", id="start_model"),
        Binding("d", "drain", "Drain", id="drain"),
        Binding("x", "remove", "Remove", id="remove"),
        Binding("b", "bounds", "Min/max", id="bounds"),
        Binding("U", "update", "Update", id="update", show=False),
        Binding("X", "shutdown", "Shut down", id="shutdown", show=False),
    ]

    def __init__(
        self,
        feed: Feed | None,
        interval: float = 1.0,
        themes: dict[str, Theme] | None = None,
        theme_name: str | None = None,
        *,
        readonly: bool = False,
        keymap: dict[str, str] | None = None,
        remember_theme: bool = False,
        name: str = "default",
        starter: Starter | None = None,
    ) -> None:
        """``feed`` is the daemon to watch; without one, ``starter(spec, workers)`` starts the
        deployment ``name`` (after the user chose how) and returns its endpoint and token."""
        super().__init__()
        if feed is None and starter is None:
            raise ValueError("a Dashboard needs a feed or a starter")
        self.feed = feed
        self.deployment = name
        self._starter = starter
        self.interval = interval
        self.readonly = readonly
        self._themes = themes or {}
        self._theme_name = theme_name
        self._keymap = keymap or {}
        self._remember_theme = remember_theme
        self.snapshot: StatusSnapshot | None = None
        self.snapshot_at: float | None = None
        self.extras: dict[str, Any] = {}
        self.polls = 0
        self.running = asyncio.Event()
        self.running.set()
        self._wake = asyncio.Event()
        self._connection: tuple[str, str | None] = ("", None)
        self._selectable = False
        self.overview = OverviewScreen()

    # -- start, poll, show ---------------------------------------------------------------------

    def on_mount(self) -> None:
        for theme in self._themes.values():
            self.register_theme(theme)
        if self._theme_name:
            self.theme = self._theme_name
        if self._keymap:
            self.set_keymap(self._keymap)
        if self._remember_theme:
            self.theme_changed_signal.subscribe(self, self._on_theme_changed)
        if self.readonly:
            self.sub_title = "read-only"
        if self.feed is None:
            self.push_screen(StartScreen(self.deployment))
        else:
            self._watch(self.feed)

    def _watch(self, feed: Feed) -> None:
        self.feed = feed
        self.run_worker(self._poll(feed), name="status-poll", group="poll", exclusive=True)

    def start_daemon(self, spec: str | None, workers: int) -> None:
        """Start the deployment as the user chose on the start screen, then watch it."""
        assert self._starter is not None
        starter = self._starter

        async def start() -> None:
            try:
                endpoint, token = await asyncio.to_thread(
                    starter, Path(spec).expanduser() if spec else None, workers
                )
            except Exception as exc:  # a ClientError or ConfigError: its message says it all
                if isinstance(self.screen, StartScreen):
                    self.screen.problem(str(exc))
                return
            if isinstance(self.screen, StartScreen):
                self.pop_screen()
            self.notify(f"deployment {self.deployment!r} is up at {endpoint}", title="started")
            self._watch(Feed(endpoint, token))

        self.run_worker(start(), group="start", exclusive=True)

    def get_default_screen(self) -> OverviewScreen:
        return self.overview

    def _on_theme_changed(self, theme: Theme) -> None:
        remember(theme=theme.name)

    def live_screen(self) -> LiveScreen | None:
        """The screen the poller feeds: the topmost live one (a dialog may sit on it)."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, LiveScreen):
                return screen
        return None

    async def _poll(self, feed: Feed) -> None:
        while True:
            await self.running.wait()
            screen = self.live_screen()
            paths = screen.paths() if screen is not None else []
            try:
                snap = await feed.status()
            except FeedError as exc:
                self.post_message(FeedLost(str(exc)))
            else:
                extras: dict[str, Any] = {}
                for path in paths:
                    try:
                        extras[path] = await feed.call("GET", path)
                    except FeedError as exc:
                        extras[path] = exc
                self.post_message(SnapshotArrived(snap, extras))
            self.polls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()

    def poll_now(self) -> None:
        """Poll without waiting out the interval (after an action, or a new screen)."""
        self._wake.set()

    def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        self.snapshot, self.snapshot_at = message.snap, time.time()
        self.extras = message.extras
        screen = self.live_screen()
        if screen is None or not screen.ready or not screen.query(ConnectionLine):
            return  # not composed yet (it shows the data once it is), or the app is closing
        screen.show(message.snap, message.extras)
        selectable = screen.selected_worker() is not None
        if selectable != self._selectable:  # drain and remove turn on or off in the footer
            self._selectable = selectable
            self.refresh_bindings()
        if self.running.is_set():
            self._set_connection("", None)

    def on_feed_lost(self, message: FeedLost) -> None:
        last = (
            time.strftime("%H:%M:%S", time.localtime(self.snapshot_at))
            if self.snapshot_at
            else "never"
        )
        self._set_connection(
            f"✗ disconnected: {message.error} (last data {last}; retrying)", "lost"
        )

    def _set_connection(self, text: str, state: str | None) -> None:
        self._connection = (text, state)
        screen = self.live_screen()
        if screen is not None and screen.ready:
            for line in screen.query(ConnectionLine):
                line.show(text, state)

    def resumed(self, screen: LiveScreen) -> None:
        """``screen`` came back on top: show it the latest data at once."""
        for line in screen.query(ConnectionLine):
            line.show(*self._connection)
        if self.snapshot is not None:
            paths = screen.paths()
            screen.show(self.snapshot, {p: v for p, v in self.extras.items() if p in paths})

    # -- navigation ----------------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        if self.running.is_set():
            self.running.clear()
            self._set_connection("⏸ paused: press p to resume", "paused")
        else:
            self.running.set()
            self._set_connection("", None)

    def open_worker(self, worker_id: str) -> None:
        self.push_screen(WorkerScreen(worker_id))
        self.poll_now()

    def open_logs(self, target: str) -> None:
        self.push_screen(LogsScreen(target))
        self.poll_now()

    def action_logs(self) -> None:
        screen = self.live_screen()
        if screen is None or isinstance(screen, LogsScreen):
            return
        worker = screen.selected_worker() if isinstance(screen, WorkerScreen) else None
        self.open_logs(worker or routes.DAEMON_LOG)

    def action_requests(self) -> None:
        """The request log, followed (from any screen but itself)."""
        if not isinstance(self.live_screen(), RequestsScreen):
            self.push_screen(RequestsScreen())
            self.poll_now()

    def action_filter(self) -> None:
        screen = self.live_screen()
        if screen is not None:
            screen.open_filter()

    async def action_back(self) -> None:
        screen = self.screen
        if isinstance(screen, LiveScreen) and screen.close_filter():
            return
        if screen is not self.overview and len(self.screen_stack) > 1:
            self.pop_screen()

    def action_help(self) -> None:
        """Every key of every screen, not only the ones the screen on top has now."""
        off: set[str] = set()
        if self.readonly:
            off = {
                b.id
                for b in Dashboard.BINDINGS
                if isinstance(b, Binding) and b.action in MUTATING and b.id
            }
        sections: list[tuple[str, list[KeyRow]]] = []
        for heading, bindings in key_sections():
            rows = key_rows(bindings, self._keymap, self.get_key_display, off)
            sections.append((heading, rows))
        sections[0][1].append(("ctrl+p", "Command palette: every action and worker", "-"))
        self.push_screen(HelpScreen(sections, str(config_path()), self.readonly))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.feed is None and action not in ("quit", "help", "change_theme"):
            return False  # nothing to watch yet: the start screen is up
        if action == "back" and self.screen is self.overview:
            return self.overview.filtering()
        if action in MUTATING:
            if self.readonly:
                return False
            if action in ("drain", "remove"):
                screen = self.live_screen()
                return None if screen is None or screen.selected_worker() is None else True
            if not isinstance(self.screen, LiveScreen):
                return False  # not under a dialog
        return True

    async def on_unmount(self) -> None:
        if self.feed is not None:
            await self.feed.close()


def key_sections() -> list[tuple[str, list[BindingType]]]:
    """Every screen's keys under a heading saying where they work, in the order ``?`` lists them."""
    return [
        ("everywhere", Dashboard.BINDINGS),
        ("tables: workers, jobs, requests (r)", LiveTable.BINDINGS),
        ("log view (l)", LogsScreen.BINDINGS),
        ("confirmation", ConfirmScreen.BINDINGS),
        ("forms (m, b)", FormScreen.BINDINGS),
        ("start screen", StartScreen.BINDINGS),
        ("this list", HelpScreen.BINDINGS),
    ]


def binding_ids() -> set[str]:
    """Every binding id a config file's ``[dashboard.keys]`` may remap."""
    return {
        binding.id
        for _heading, bindings in key_sections()
        for binding in bindings
        if isinstance(binding, Binding) and binding.id
    }
