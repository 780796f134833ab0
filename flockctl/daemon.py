"""Starting and stopping a deployment's daemon from the command line.

The daemon runs in its own session (``start_new_session``) so it outlives the terminal; its
output goes to ``daemon.log``. Nothing here imports the server package's web stack, so
``flockctl status`` and ``down`` stay fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flockctl.client import AdminClient, ClientError
from flockctl.exitcodes import ExitCode
from flockctl.state import DaemonRecord, is_same_process, tail_lines, write_json_atomic


def check_port(host: str, port: int) -> None:
    """Raise ClientError(ADDRESS_IN_USE) when ``host:port`` cannot be bound right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ClientError(
                    f"port {port} on {host} is already in use; choose another with --port",
                    ExitCode.ADDRESS_IN_USE,
                ) from None
            raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def write_config(directory: Path, config: dict) -> None:
    write_json_atomic(directory / "config.json", config)


def spawn(name: str, directory: Path) -> subprocess.Popen:
    """Start ``python -m flockctl.server`` detached, logging to ``daemon.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "daemon.log").open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} flockctl up\n".encode())
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "flockctl.server", "--name", name],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=directory,  # never the user's directory: a source checkout there would shadow
        )


def wait_until_up(proc: subprocess.Popen, directory: Path, timeout: float) -> DaemonRecord:
    """Wait until the daemon started as ``proc`` answers ``/health``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = "\n".join(tail_lines(directory / "daemon.log", 20))
            what = (
                ExitCode.ADDRESS_IN_USE
                if code == ExitCode.ADDRESS_IN_USE
                else ExitCode.START_FAILED
            )
            raise ClientError(
                f"the daemon exited with code {code} while starting; the end of its log"
                f" ({directory / 'daemon.log'}):\n{tail}",
                what,
            )
        record = DaemonRecord.load(directory)
        if record is not None and record.pid == proc.pid:
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"{record.endpoint}/health", timeout=2, trust_env=False)
                if resp.status_code == 200:
                    return record
        time.sleep(0.1)
    raise ClientError(
        f"the daemon (pid {proc.pid}) did not answer within {timeout:g}s; it may still be"
        f" starting: see flockctl logs, or stop it with flockctl down",
        ExitCode.TIMEOUT,
    )


def launch(config: dict, directory: Path, timeout: float) -> DaemonRecord:
    """Start a daemon for a resolved config (``DeploymentConfig.model_dump(mode="json")``) and
    wait until it answers; ClientError says why it did not (a busy port, an early exit)."""
    check_port(str(config["host"]), int(config["port"]))
    write_config(directory, config)
    return wait_until_up(spawn(str(config["name"]), directory), directory, timeout)


@dataclass
class StopResult:
    was_running: bool
    forced: bool = False
    orphans: int = 0
    #: Resources that could not be removed, one line each (a cluster SkyPilot failed to down).
    problems: list[str] = field(default_factory=list)


def stop(name: str, directory: Path, timeout: float) -> StopResult:
    """Drain and stop the daemon and every worker; clean up after a daemon that died."""
    record = DaemonRecord.load(directory)
    result = StopResult(was_running=record is not None and record.alive())
    if record is not None and result.was_running:
        try:
            with AdminClient(record, timeout=5) as client:
                client.shutdown()
        except ClientError:
            _signal(record.pid, signal.SIGTERM)  # the daemon drains on SIGTERM as well
        if not _wait_gone(record, timeout):
            result.forced = True
            _signal(record.pid, signal.SIGTERM)
            if not _wait_gone(record, 10):
                _signal(record.pid, signal.SIGKILL)
                _wait_gone(record, 5)
    # What the daemon started and left behind, from its records alone. Imported here: the
    # daemon's package is not loaded by the commands that never stop one.
    from flockctl.server.offline import down_recorded_clusters, stop_recorded_workers

    result.orphans = len(stop_recorded_workers(directory))
    downed, result.problems = down_recorded_clusters(directory)
    result.orphans += len(downed)
    if record is not None and not record.alive():
        with contextlib.suppress(FileNotFoundError):
            (directory / "daemon.json").unlink()
    return result


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(record: DaemonRecord, timeout: float) -> bool:
    """Wait up to ``timeout`` for the daemon to exit; False if it did not.

    Where the OS has pidfds (Linux) the wait is woken by the exit itself, so ``down`` returns as
    soon as the daemon is gone; elsewhere it polls.
    """
    deadline = time.monotonic() + timeout
    pidfd = _pidfd(record.pid)
    try:
        while is_same_process(record.pid, record.start_time):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is None:
                time.sleep(min(0.05, left))
            elif select.select([pidfd], [], [], left)[0]:
                os.close(pidfd)  # it exited; polled from here on (a zombie counts as gone)
                pidfd = None
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A pidfd of process ``pid``, or None where there are none (not Linux) or no such process."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
