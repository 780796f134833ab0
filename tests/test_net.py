"""The URL a client uses for a bind address: one function for the CLI, the daemon and the engine."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from cli_driver import flockctl
from conftest import fake_worker_command, free_port

from flockctl.net import client_url
from flockctl.state import DaemonRecord


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:3000"),
        ("", "http://127.0.0.1:3000"),
        ("::", "http://[::1]:3000"),
        ("[::]", "http://[::1]:3000"),
        ("0:0:0:0:0:0:0:0", "http://[::1]:3000"),
        ("::1", "http://[::1]:3000"),
        ("[::1]", "http://[::1]:3000"),
        ("fd00::5", "http://[fd00::5]:3000"),
        ("fe80::1%eth0", "http://[fe80::1%25eth0]:3000"),
        ("127.0.0.1", "http://127.0.0.1:3000"),
        ("10.0.0.5", "http://10.0.0.5:3000"),
        ("localhost", "http://localhost:3000"),
        ("gpu-box.internal", "http://gpu-box.internal:3000"),
    ],
)
def test_a_bind_address_becomes_a_url_a_client_can_use(host: str, url: str) -> None:
    assert client_url(host, 3000) == url
    assert httpx.URL(url).port == 3000  # and httpx parses it


def test_a_daemon_record_gives_the_url_of_its_bind_address() -> None:
    record = DaemonRecord(1, 0.0, "::", 3000, "token", "0.1.0", "default")
    assert record.endpoint == "http://[::1]:3000"


@pytest.fixture
def ipv6_server() -> Iterator[int]:
    """A plain HTTP server bound to ``::`` (every address), on a free port."""

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    try:
        server = Server(("::", free_port()), Hello)
    except OSError as exc:
        pytest.skip(f"no IPv6 on this machine: {exc}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_up_dry_run_on_every_ipv6_address_shows_a_url_that_answers(ipv6_server: int) -> None:
    port = str(ipv6_server)
    args = ["up", "--worker-command", fake_worker_command(), "--host", "::", "--port", port]
    plan = flockctl(*args, "--dry-run", "--json")
    assert plan.code == 0, plan.err
    endpoint = plan.json()["endpoint"]
    assert endpoint == f"http://[::1]:{port}"
    # What was printed reaches a server bound the way the daemon would be.
    assert httpx.get(endpoint, trust_env=False, timeout=10).text == "hello"
