"""Versions survive a daemon restart: after ``kill -9`` of the daemon and ``flockctl up`` again,
the deployment, its groups and its re-adopted workers keep their versions, new workers run the
version that served, an update that was running is reported as interrupted (its new workers
drain, the old ones serve on), and ``--rollback`` still finds the version before.

Real processes: the CLI, the daemon and fake workers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from cli_driver import Result, flockctl, processes_with
from conftest import FAKE_WORKER, TOKEN, free_port, until_sync

pytestmark = pytest.mark.e2e
NAME = "rst"


def worker_command(marker: Path, version: str, *extra: str) -> str:
    """A fake worker whose answers name ``version`` as their model; the marker (a file that
    never exists) makes this test's workers findable by their command line."""
    parts = [sys.executable, str(FAKE_WORKER), "--port", "{port}", "--model", version]
    return " ".join([*parts, "--unhealthy-file", str(marker), *extra])


def status() -> dict[str, Any]:
    result = flockctl("status", "--name", NAME, "--json")
    assert result.code == 0, result.err
    return result.json()


def ready(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["id"]: w for w in snap["workers"] if w["state"] == "READY"}


def answer(url: str) -> str:
    body = {"prompt": "hi", "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=10).json()["model"]


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


@pytest.fixture
def up(tmp_path: Path, flockctl_home: Path) -> Any:
    marker = tmp_path / "marker-never-exists"
    port = free_port()

    def start() -> Result:
        # The same command each time, as a user re-running `flockctl up` after a crash.
        return flockctl(
            "up", "--name", NAME, "--port", str(port), "--node-control-key", TOKEN,
            "--worker-command", worker_command(marker, "v1"), "--replicas", "2",
            "--probe-interval", "0.1", "--drain-timeout", "5",
        )  # fmt: skip

    start.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    start.marker = marker  # type: ignore[attr-defined]
    yield start
    flockctl("down", "--name", NAME, "--timeout", "30")
    assert processes_with(marker) == []


def kill_daemon(home: Path) -> None:
    pid = json.loads((home / NAME / "daemon.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    until_sync(lambda: gone(pid), "the daemon to die", 10)


def test_versions_and_an_interrupted_update_survive_a_killed_daemon(
    up: Any, flockctl_home: Path
) -> None:
    assert up().code == 0
    until_sync(lambda: len(ready(status())) == 2, "two READY workers of version 1")
    moved = flockctl("update", "--name", NAME, "--worker-command", worker_command(up.marker, "v2"))
    assert moved.code == 0, moved.err
    before = status()
    assert before["deployment"]["version"] == 2
    served = {w["id"]: (w["pid"], w["version"]) for w in ready(before).values()}
    assert {v for _, v in served.values()} == {2}

    kill_daemon(flockctl_home)
    assert up().code == 0
    snap = until_sync(lambda: (s := status()) and len(ready(s)) == 2 and s, "re-adopted workers")
    assert snap["deployment"]["version"] == 2
    assert {w["id"]: (w["pid"], w["version"]) for w in ready(snap).values()} == served
    assert snap["deployment"]["update"]["id"] == before["deployment"]["update"]["id"]
    assert snap["deployment"]["update"]["state"] == "succeeded"
    assert answer(up.url) == "v2"
    # A worker launched now runs version 2, although `up` was given version 1's command.
    victim = next(iter(ready(snap).values()))
    os.kill(victim["pid"], signal.SIGKILL)
    until_sync(
        lambda: len(ready(s := status())) == 2 and victim["id"] not in ready(s),
        "a replacement worker",
    )
    replacement = [w for w in ready(status()).values() if w["id"] not in served]
    assert [w["version"] for w in replacement] == [2]
    assert {answer(up.url) for _ in range(6)} == {"v2"}

    # An update cut short: its new workers never get READY, and the daemon dies meanwhile.
    stuck = worker_command(up.marker, "v3", "--start-delay", "3600")
    started = flockctl("update", "--name", NAME, "--worker-command", stuck, "--no-wait")
    assert started.code == 0, started.err
    new = until_sync(
        lambda: [w for w in status()["workers"] if w["version"] == 3 and w["pid"]],
        "a worker of version 3",
    )
    serving = {w["id"] for w in ready(status()).values()}
    kill_daemon(flockctl_home)
    assert up().code == 0
    snap = until_sync(lambda: (s := status()) and len(ready(s)) == 2 and s, "version 2 serving")
    assert snap["deployment"]["version"] == 2
    update = snap["deployment"]["update"]
    assert (update["state"], update["to_version"]) == ("interrupted", 3)
    assert "version 2 serves on" in update["reason"] and "flockctl update again" in update["reason"]
    assert set(ready(snap)) == serving
    until_sync(lambda: all(gone(w["pid"]) for w in new), "version 3's workers to be stopped")
    table = flockctl("status", "--name", NAME, "--wide")
    assert "interrupted: the daemon restarted while this update ran" in table.out

    # The version before the one serving is still known: --rollback goes back to version 1.
    back = flockctl("update", "--name", NAME, "--rollback", "--json")
    assert back.code == 0, back.err
    view = back.json()
    assert (view["from_version"], view["to_version"], view["rollback_to"]) == (2, 4, 1)
    assert {answer(up.url) for _ in range(6)} == {"v1"}


def test_each_groups_version_survives_a_killed_daemon(tmp_path: Path, flockctl_home: Path) -> None:
    marker = tmp_path / "marker-never-exists"
    spec = tmp_path / "groups.yaml"
    groups = [
        {"name": n, "worker_command": worker_command(marker, n), "replicas": 1}
        for n in ("chat", "code")
    ]
    spec.write_text(yaml.safe_dump({"flockctl": {"groups": groups}}))
    args = ("up", str(spec), "--name", NAME, "--port", str(free_port()), "--probe-interval", "0.1")

    def group_versions() -> dict[str, tuple[int, int]]:
        return {g["name"]: (g["version"], g["ready"]) for g in status()["groups"]}

    assert flockctl(*args).code == 0
    try:
        until_sync(lambda: group_versions() == {"chat": (1, 1), "code": (1, 1)}, "both groups")
        new_chat = worker_command(marker, "chat", "--tokens", "8")
        moved = flockctl("update", "--name", NAME, "--group", "chat", "--worker-command", new_chat)
        assert moved.code == 0, moved.err
        before = {w["id"]: (w["pid"], w["group"], w["version"]) for w in ready(status()).values()}
        assert sorted(v[1:] for v in before.values()) == [("chat", 2), ("code", 1)]

        kill_daemon(flockctl_home)
        assert flockctl(*args).code == 0
        until_sync(lambda: group_versions() == {"chat": (2, 1), "code": (1, 1)}, "versions back")
        snap = status()
        assert snap["deployment"]["version"] == 2
        after = {w["id"]: (w["pid"], w["group"], w["version"]) for w in ready(snap).values()}
        assert after == before
    finally:
        flockctl("down", "--name", NAME, "--timeout", "30")
    assert processes_with(marker) == []
