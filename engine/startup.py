"""What an engine says while it starts: 503 with the phase it is in, on its own port.

Loading can take minutes: the demo model builds on first use, a hub model downloads, a large one
moves to the device. A port that refuses connections for that long tells nobody anything, so
until the real server runs, a small threaded responder on the engine's socket answers every
request with ``503``, ``Retry-After`` and::

    {"status": "starting", "phase": "building demo model: target 62%, about 40 s left",
     "elapsed_s": 31.2, "error": {...}}

flockctl's prober shows ``phase`` as the worker's reason in ``status`` and the dashboard; a person
with curl sees the same. The standard library's ``http.server`` is enough here (a few requests a
second, each answered at once and closed); the socket is then handed to uvicorn unchanged, so no
connection is refused between the two.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import socket
from types import TracebackType
from typing import Any

log = logging.getLogger("flockctl.engine")

#: A request body up to this size is read (and dropped) before the 503; a larger one is not.
MAX_DRAINED_BODY = 1 << 16
#: Seconds between two log lines that only report progress within the same step.
LOG_EVERY = 5.0


class StartupPhase:
    """The phase of a starting engine, set by the loading thread and read by the responder.

    Every change of step (the text before the first ``:``) is logged at once; progress within a
    step at most every ``log_every`` seconds, so a worker log that is a file gets a plain line
    every few seconds instead of nothing (or of escape-coded progress bars).
    """

    def __init__(self, log_every: float = LOG_EVERY) -> None:
        self.started = time.monotonic()
        self._text = "starting"
        self._lock = threading.Lock()
        self._log_every = log_every
        self._logged_step = ""
        self._logged_at = float("-inf")

    @property
    def text(self) -> str:
        with self._lock:
            return self._text

    def set(self, text: str) -> None:
        now = time.monotonic()
        step = text.split(":", 1)[0]
        with self._lock:
            self._text = text
            due = step != self._logged_step or now - self._logged_at >= self._log_every
            if due:
                self._logged_step, self._logged_at = step, now
        if due:
            log.info("starting: %s", text)

    def body(self) -> dict[str, Any]:
        phase = self.text
        return {
            "status": "starting",
            "phase": phase,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "error": {
                "message": f"the engine is starting ({phase}); retry shortly",
                "type": "service_unavailable",
                "code": 503,
            },
        }


class StartupResponder:
    """Answer 503 with ``phase.body()`` on ``sock`` until the ``with`` block ends.

    The socket is put in the listening state and stays so afterwards: uvicorn serves it next.
    """

    def __init__(self, sock: socket, phase: StartupPhase) -> None:
        self._sock = sock
        self._phase = phase
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StartupResponder:
        self._sock.listen(128)
        server = ThreadingHTTPServer(
            self._sock.getsockname()[:2], _handler(self._phase), bind_and_activate=False
        )
        server.socket.close()  # the one TCPServer made; ours is already bound
        server.socket = self._sock
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="startup", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()  # not server_close(): that would close the engine's socket
        if self._thread is not None:
            self._thread.join()


def _handler(phase: StartupPhase) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 5  # a client that sends no request head in this time is dropped
        server_version = "flockctl-engine"
        sys_version = ""

        def _answer(self) -> None:
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) <= MAX_DRAINED_BODY:
                self.rfile.read(int(length))  # so the client is not reset while still sending
            payload = json.dumps(phase.body()).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Retry-After", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.close_connection = True

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

        def log_message(self, format: str, *args: Any) -> None:
            """Requests while starting are probes; the log keeps the phases, not each probe."""

    return Handler
