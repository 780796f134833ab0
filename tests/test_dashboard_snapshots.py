"""Snapshot tests of the dashboard (pytest-textual-snapshot): the overview in two themes, a
worker's detail and the requests screen, fed by a real HTTP status server on 127.0.0.1 serving a
recorded snapshot and request log.

The screenshots live in ``__snapshots__/``; after an intended change to the screens, look at the
report of the failing run, then accept the new ones with ``pytest --snapshot-update``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import TOKEN, until
from dashboard_data import NOW, SIZE, requests_answer, snapshot

from flockctl.themes import load_themes
from flockctl.tui.app import Dashboard
from flockctl.tui.feed import Feed
from flockctl.tui.requests import RequestsTable
from flockctl.tui.widgets import JobsTable, WorkersTable


class Recorded(BaseHTTPRequestHandler):
    """``/-/status``, a worker's detail and log, and the request log, as the tests recorded them."""

    def do_GET(self) -> None:
        snap = snapshot()
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._send(401, {"error": {"message": "bad token"}})
        elif self.path == "/-/status":
            self._send(200, snap)
        elif self.path == "/-/workers/w2":
            probes = [{"at": 1.0, "ok": i != 2, "ms": 1.5, "detail": "HTTP 200"} for i in range(6)]
            probes[2]["detail"] = "timed out after 5s"
            self._send(200, {**snap["workers"][1], "probe_history": probes, "command": "serve"})
        elif self.path.startswith("/-/requests?"):
            self._send(200, requests_answer())
        elif self.path.startswith("/-/logs/w2"):
            lines = ["INFO loaded demo", "INFO serving on 127.0.0.1:9002"]
            self._send(200, {"target": "w2", "offset": 40, "lines": lines, "reset": False})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorded() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def dashboard(url: str, theme: str) -> Dashboard:
    app = Dashboard(Feed(url, TOKEN), interval=60, themes=load_themes(), theme_name=theme)
    app.overview.latency.clock = lambda: NOW  # the recorded requests are of the last minutes
    return app


async def rows_shown(pilot: Any) -> None:
    app = pilot.app
    await until(
        lambda: (
            app.query_one(WorkersTable).row_count == 2
            and app.query_one(JobsTable).row_count
            and app.overview.latency.last == 41
        ),
        "the rows",
        pause=pilot.pause,
    )
    await pilot.pause()


@pytest.mark.parametrize("theme", ["flockctl-dark", "flockctl-light"])
def test_overview(snap_compare: Any, recorded: str, theme: str) -> None:
    assert snap_compare(dashboard(recorded, theme), terminal_size=SIZE, run_before=rows_shown)


def test_worker_detail(snap_compare: Any, recorded: str) -> None:
    async def open_w2(pilot: Any) -> None:
        await rows_shown(pilot)
        await pilot.press("enter")  # the cursor starts on w2
        await until(
            lambda: "✓✓✗" in str(pilot.app.screen.query_one("#probes").content),
            "the probe history",
            pause=pilot.pause,
        )
        await pilot.pause()

    app = dashboard(recorded, "flockctl-dark")
    assert snap_compare(app, terminal_size=SIZE, run_before=open_w2)


def test_requests(snap_compare: Any, recorded: str) -> None:
    async def open_requests(pilot: Any) -> None:
        await rows_shown(pilot)
        await pilot.press("r")
        table = pilot.app.screen.query_one(RequestsTable)
        await until(
            lambda: table.row_count == 41 and 0 < table.max_scroll_y == table.scroll_y,
            "the recorded requests, scrolled to the newest",
            pause=pilot.pause,
        )
        await pilot.pause()

    app = dashboard(recorded, "flockctl-dark")
    assert snap_compare(app, terminal_size=SIZE, run_before=open_requests)
