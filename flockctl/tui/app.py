"""``flockctl dashboard``: a Textual app that watches one deployment.

One polling worker fetches ``GET /-/status`` and posts a message per snapshot, scheduling the next
poll only after the last one finished; ``p`` pauses it. A daemon that stops answering shows as
disconnected over the last good data, and the worker keeps trying, so it reconnects by itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.theme import Theme
from textual.widgets import Footer, Sparkline, Static

from flockctl.tui.feed import Feed, FeedError
from flockctl.tui.widgets import (
    AutoscalerPanel,
    DeploymentLine,
    JobsTable,
    WorkersTable,
)


class SnapshotArrived(Message):
    def __init__(self, snap: dict[str, Any]) -> None:
        super().__init__()
        self.snap = snap


class FeedLost(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class Dashboard(App[None]):
    TITLE = "flockctl"
    CSS = """
    DeploymentLine { height: auto; padding: 0 1; background: $panel; }
    #connection { height: 1; padding: 0 1; }
    #connection.lost { background: $error; color: $text; }
    #connection.paused { background: $warning; color: $text; }
    WorkersTable { height: 1fr; min-height: 5; }
    #scaling { height: 5; }
    #qlrm { width: 30%; min-width: 20; }
    AutoscalerPanel { width: 1fr; padding: 0 1; }
    JobsTable { height: 1fr; min-height: 5; }
    """
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("p", "toggle_pause", "Pause", id="pause"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(
        self,
        feed: Feed,
        interval: float = 1.0,
        themes: dict[str, Theme] | None = None,
        theme_name: str | None = None,
    ) -> None:
        super().__init__()
        self.feed = feed
        self.interval = interval
        self._themes = themes or {}
        self._theme_name = theme_name
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_at: float | None = None
        self.polls = 0
        self.running = asyncio.Event()
        self.running.set()

    def compose(self) -> ComposeResult:
        yield DeploymentLine("connecting…")
        yield Static("", id="connection")
        yield WorkersTable(id="workers")
        with Horizontal(id="scaling"):
            yield Sparkline([], id="qlrm")
            yield AutoscalerPanel("")
        yield JobsTable(id="jobs")
        yield Footer()

    def on_mount(self) -> None:
        for theme in self._themes.values():
            self.register_theme(theme)
        if self._theme_name:
            self.theme = self._theme_name
        self.run_worker(self._poll(), name="status-poll", group="poll", exclusive=True)

    async def _poll(self) -> None:
        while True:
            await self.running.wait()
            try:
                snap = await self.feed.status()
            except FeedError as exc:
                self.post_message(FeedLost(str(exc)))
            else:
                self.post_message(SnapshotArrived(snap))
            self.polls += 1
            await asyncio.sleep(self.interval)

    def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        snap = message.snap
        self.snapshot, self.snapshot_at = snap, time.time()
        if not self.query(DeploymentLine):
            return  # the app is closing: its widgets are gone
        self.query_one(DeploymentLine).show(snap)
        self.query_one(WorkersTable).show(snap)
        self.query_one(JobsTable).show(snap)
        self.query_one(AutoscalerPanel).show(snap)
        history = (snap.get("autoscaler") or {}).get("qlrm_history") or []
        self.query_one(Sparkline).data = [float(v) for _t, v in history] or [0.0]
        if self.running.is_set():
            self._connection("", None)

    def on_feed_lost(self, message: FeedLost) -> None:
        if not self.query("#connection"):
            return  # the app is closing
        last = (
            time.strftime("%H:%M:%S", time.localtime(self.snapshot_at))
            if self.snapshot_at
            else "never"
        )
        self._connection(f"✗ disconnected: {message.error} (last data {last}; retrying)", "lost")

    def action_toggle_pause(self) -> None:
        if self.running.is_set():
            self.running.clear()
            self._connection("⏸ paused: press p to resume", "paused")
        else:
            self.running.set()
            self._connection("", None)

    def _connection(self, text: str, state: str | None) -> None:
        line = self.query_one("#connection", Static)
        line.update(text)
        line.set_class(state == "lost", "lost")
        line.set_class(state == "paused", "paused")

    async def on_unmount(self) -> None:
        await self.feed.close()
