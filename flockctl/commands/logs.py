"""``flockctl logs``: the daemon's or a worker's log from the state directory, a SkyPilot
worker's job log through SkyPilot, or the balancer's request log (``flockctl logs requests``,
``flockctl.commands.request_logs``); it needs no running daemon."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from flockctl.commands.common import JsonOpt, NameOpt, check_name
from flockctl.commands.request_logs import SlowOpt, StatusOpt, request_logs
from flockctl.console import fail, say
from flockctl.exitcodes import ExitCode
from flockctl.state import state_dir, tail_lines


def logs(
    target: Annotated[
        str, typer.Argument(help="'daemon', a worker id, or 'requests' (the request log).")
    ] = "daemon",
    name: NameOpt = "default",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    tail: Annotated[int, typer.Option("--tail", help="Lines to print first.", min=0)] = 100,
    as_json: JsonOpt = False,
    status: StatusOpt = None,
    slow: SlowOpt = None,
) -> None:
    """Print the daemon's log, a worker's log, or the request log (works after the daemon
    stopped, too).

    A SkyPilot worker's log is its cluster's job log, streamed through SkyPilot; the launch
    progress is shown when the job has no log yet. `flockctl logs requests` prints a table of
    the requests the balancer served (JSON lines with --json), filtered by --status and --slow.
    """
    check_name(name)
    if target != "requests" and (as_json or status or slow is not None):
        fail("--json, --status and --slow apply to: flockctl logs requests", ExitCode.USAGE)
    directory = state_dir(name)
    if not directory.is_dir():
        fail(f'no deployment named "{name}" (nothing at {directory})', ExitCode.NOT_RUNNING)
    if target == "requests":
        request_logs(directory, follow=follow, tail=tail, as_json=as_json, status=status, slow=slow)
        return
    path = directory / ("daemon.log" if target == "daemon" else f"workers/{target}.log")
    if target != "daemon" and "/" not in target and _cluster_logs(directory, target, follow, tail):
        return
    if "/" in target or not path.is_file():
        known = sorted(p.stem for p in (directory / "workers").glob("*.log"))
        fail(
            f"no log for {target!r}; known: daemon{''.join(', ' + k for k in known)}",
            ExitCode.NOT_FOUND,
        )
    for line in tail_lines(path, tail):
        print(line)
    if follow:
        _follow(path)


def _cluster_logs(directory: Path, worker_id: str, follow: bool, tail: int) -> bool:
    """Stream a SkyPilot worker's job log; False when ``worker_id`` has no cluster (any more)."""
    from flockctl.server.provisioners.skypilot import recorded_clusters

    record = recorded_clusters(directory).get(worker_id)
    if record is None:
        return False
    from flockctl.server.provisioners.sky_sdk import SkyError, make_sdk

    cluster = record["cluster"]
    try:
        code = make_sdk().tail_logs(cluster, follow, tail, sys.stdout)
    except KeyboardInterrupt:
        return True
    except SkyError as exc:
        launch_log = directory / "workers" / f"{worker_id}.log"
        if not launch_log.is_file():
            fail(f"no job log for {worker_id} on cluster {cluster}: {exc}", ExitCode.NOT_FOUND)
        say(f"no job log on cluster {cluster} yet ({exc}); its launch log follows")
        for line in tail_lines(launch_log, tail):
            print(line)
        if follow:
            _follow(launch_log)
        return True
    if code:
        say(f"the job on cluster {cluster} ended with exit code {code}")
    return True


def _follow(path: Path) -> None:
    """Print what is appended to ``path`` until Ctrl-C, starting over when it is truncated."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            while True:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                    sys.stdout.flush()
                    continue
                if path.stat().st_size < f.tell():  # truncated or rotated
                    f.seek(0)
                time.sleep(0.25)
    except KeyboardInterrupt:
        return
