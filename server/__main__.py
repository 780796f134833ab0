"""The control daemon: ``python -m flockctl.server --name NAME [--config FILE]``.

``flockctl up`` writes the resolved config to the deployment's state directory and starts this
in its own session; ``flockctl up --foreground`` runs the same code attached to the terminal.
The daemon binds its port first (a port in use is a one-line error, exit code 7), then serves
the balancer and admin API with uvicorn (uvloop + httptools), and writes ``daemon.json`` once it
answers. SIGINT/SIGTERM or ``POST /-/shutdown`` drain and stop every worker before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvicorn

from flockctl import __version__
from flockctl.exitcodes import ExitCode
from flockctl.net import bind
from flockctl.server.app import create_app
from flockctl.server.config import DeploymentConfig
from flockctl.server.deployment import Deployment
from flockctl.server.http_protocol import protocol_class
from flockctl.server.limits import KEEP_ALIVE_SECONDS, FrontDoor, raise_open_file_limit
from flockctl.state import DaemonRecord, process_start_time, state_dir

log = logging.getLogger("flockctl.daemon")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # httpx logs every request at INFO: every probe of every worker would fill the daemon's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def uvicorn_config(app: Any, cfg: DeploymentConfig) -> uvicorn.Config:
    """How the daemon's app is served (the tests serve it the same way): uvicorn's httptools
    protocol held to the front-door limits (``flockctl.server.http_protocol``)."""
    return uvicorn.Config(
        app,
        loop="none",
        http=protocol_class(FrontDoor.for_config(cfg), getattr(app, "refused", None)),
        ws="none",
        lifespan="on",
        access_log=False,
        # The balancer appends the peer's address to X-Forwarded-For itself; uvicorn's rewriting
        # of the client from those headers cost about 50 us per request (ipaddress parsing).
        proxy_headers=False,
        log_config=None,
        timeout_graceful_shutdown=int(max(cfg.drain_timeout, 1)),
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        backlog=4096,
        server_header=False,
        date_header=False,
    )


async def serve(cfg: DeploymentConfig, directory: Path, sock: socket.socket) -> int:
    """Run the daemon until it is asked to stop; returns the process exit code."""
    outcome = [ExitCode.OK]
    token = cfg.node_control_key or secrets.token_urlsafe(32)
    deployment = Deployment(cfg, directory, token)
    server: uvicorn.Server
    pid = os.getpid()

    def request_shutdown() -> None:
        log.info("shutdown requested over the admin API")
        server.should_exit = True

    def on_stopped() -> None:
        record = DaemonRecord.load(directory)
        if record is not None and record.pid == pid:
            with contextlib.suppress(FileNotFoundError):
                (directory / "daemon.json").unlink()
        log.info("daemon stopped")

    app = create_app(deployment, request_shutdown, on_stopped)
    server = uvicorn.Server(uvicorn_config(app, cfg))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        record = DaemonRecord(
            pid=pid,
            start_time=process_start_time(pid) or 0.0,
            host=cfg.host,
            port=sock.getsockname()[1],
            token=token,
            version=__version__,
            name=cfg.name,
        )
        try:
            record.save(directory)
        except OSError as exc:
            # A daemon nobody can find or stop must not keep running.
            log.error("cannot write %s: %s; stopping", directory / "daemon.json", exc)
            outcome[0] = ExitCode.ERROR
            server.should_exit = True
            return
        log.info(
            "flockctl %s: deployment %r serving on %s", __version__, cfg.name, deployment.endpoint
        )
        # What starting built (modules, the app, the config, the workers' records) lives as long
        # as the daemon: out of the collector's sight, a full collection under load scans only
        # what requests and spans made since, which makes each one about three times shorter.
        gc.collect()
        gc.freeze()

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
    return outcome[0]


def run(cfg: DeploymentConfig, directory: Path) -> int:
    """Bind, serve, return an exit code. Used by ``__main__`` and ``flockctl up --foreground``."""
    directory.mkdir(parents=True, exist_ok=True)
    raise_open_file_limit(cfg)
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"flockctl: port {cfg.port} on {cfg.host} is already in use;"
                " choose another with --port",
                file=sys.stderr,
            )
            return ExitCode.ADDRESS_IN_USE
        print(f"flockctl: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return ExitCode.ERROR
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        runner = asyncio.run
    return runner(serve(cfg, directory, sock))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flockctl.server",
        description="flockctl's control daemon (normally started by `flockctl up`).",
    )
    parser.add_argument("--name", default="default", help="deployment name (state directory)")
    parser.add_argument(
        "--config", type=Path, help="resolved config JSON (default: <state dir>/config.json)"
    )
    args = parser.parse_args(argv)
    directory = state_dir(args.name)
    path = args.config or directory / "config.json"
    try:
        cfg = DeploymentConfig.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        print(f"flockctl: no config at {path}; start deployments with flockctl up", file=sys.stderr)
        return ExitCode.USAGE
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"flockctl: invalid config {path}: {exc}".replace("\n", " "), file=sys.stderr)
        return ExitCode.USAGE
    setup_logging()
    return run(cfg, directory)


if __name__ == "__main__":
    sys.exit(main())
