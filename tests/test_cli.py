"""The real CLI in subprocesses against a real daemon and real worker processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from cli_driver import DRIVER, Result, flockctl, processes_with, ready_ids
from conftest import FAKE_WORKER, free_port, free_socket, until_sync

from flockctl.exitcodes import ExitCode

pytestmark = pytest.mark.e2e


def worker_command(marker: Path, *extra: str) -> str:
    # The marker (a file that never exists) makes this test's workers findable by command line.
    parts = [sys.executable, str(FAKE_WORKER), "--port", "{port}", "--unhealthy-file", str(marker)]
    return " ".join([*parts, *extra])


@pytest.fixture
def deployment(tmp_path: Path, flockctl_home: Path):
    """Bring a two-worker deployment up; always bring it down and check nothing is left."""
    marker = tmp_path / "marker-never-exists"
    port = free_port()
    started: list[str] = []

    def up(*extra: str, name: str = "default", worker_args: tuple[str, ...] = ()) -> Result:
        result = flockctl(
            "up",
            "--name",
            name,
            "--port",
            str(port),
            "--worker-command",
            worker_command(marker, *worker_args),
            "--min-workers",
            "2",
            "--max-workers",
            "2",
            "--probe-interval",
            "0.2",
            "--initial-delay",
            "30",
            *extra,
        )
        started.append(name)
        return result

    up.port = port  # type: ignore[attr-defined]
    up.marker = marker  # type: ignore[attr-defined]
    yield up
    for name in started:
        flockctl("down", "--name", name, "--timeout", "20")
    assert processes_with(marker) == []


async def chat(session: aiohttp.ClientSession, url: str, stream: bool) -> str:
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "max_tokens": 8,
        "fake_token_delay": 0.005,
    }
    async with session.post(f"{url}/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.read()
    if stream:
        assert body.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(body)["choices"][0]["message"]["content"]
    return resp.headers["x-worker-id"]


def test_up_balances_survives_a_killed_worker_and_down_cleans_up(deployment):
    result = deployment()
    assert result.code == 0, result.err
    endpoint = result.out.strip()
    assert endpoint == f"http://127.0.0.1:{deployment.port}"
    assert "is up at" in result.err
    until_sync(lambda: len(ready_ids()) == 2, "two READY workers")

    async def burst(n: int) -> list[str]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(chat(s, endpoint, i % 2 == 0) for i in range(n)))

    served = asyncio.run(burst(40))
    assert sorted(set(served)) == ["w1", "w2"]

    snap = flockctl("status", "--json").json()
    assert snap["requests"]["total"] == 40 and snap["requests"]["failed"] == 0
    assert snap["autoscaler"]["qlrm"] is not None
    victim = next(w for w in snap["workers"] if w["id"] == "w1")
    assert victim["pid"] and victim["url"].startswith("http://127.0.0.1:")
    os.kill(victim["pid"], signal.SIGKILL)

    killed_at = time.monotonic()
    served = asyncio.run(burst(20))  # all succeed: w2 takes them, w1 is out at once
    assert set(served) <= {"w2", "w3"}
    ids = until_sync(lambda: (r := ready_ids()) and "w3" in r and r, "a replacement worker")
    assert time.monotonic() - killed_at < 30
    assert sorted(ids) == ["w2", "w3"]
    snap = flockctl("status", "--json").json()
    w1 = next(w for w in snap["workers"] if w["id"] == "w1")
    assert w1["state"] == "FAILED" and "killed by signal 9" in w1["reason"]

    table = flockctl("status")
    assert table.code == 0 and "READY" in table.out and "FAILED" in table.out
    # Piped, a row is one whole line: its URL and its reason are never cut.
    (failed_row,) = [line for line in table.out.splitlines() if line.startswith("w1 ")]
    assert w1["url"] in failed_row and failed_row.rstrip().endswith(w1["reason"])

    logs = flockctl("logs", "--tail", "50")
    assert "worker w1 FAILED" in logs.out
    assert "starting:" in flockctl("logs", "w3").out

    daemon_pid = snap_pid = flockctl("up", "--port", str(deployment.port)).code
    assert daemon_pid == 0  # already running: says so, exits 0
    del snap_pid
    pids = [w["pid"] for w in flockctl("status", "--json").json()["workers"] if w["pid"]]
    down = flockctl("down")
    assert down.code == 0 and "stopped" in down.err
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert processes_with(deployment.marker) == []
    assert flockctl("status").code == 3
    again = flockctl("down")
    assert again.code == 0 and "no daemon" in again.err


def test_restarted_daemon_readopts_live_workers(deployment, flockctl_home):
    assert deployment().code == 0
    until_sync(lambda: len(ready_ids()) == 2, "two READY workers")
    before = {w["id"]: w["pid"] for w in flockctl("status", "--json").json()["workers"]}
    record = json.loads((flockctl_home / "default" / "daemon.json").read_text())
    os.kill(record["pid"], signal.SIGKILL)  # the daemon dies; its workers live on
    until_sync(lambda: not psutil.pid_exists(record["pid"]), "the daemon to die", 10)
    assert flockctl("status").code == 3
    assert deployment().code == 0
    until_sync(lambda: len(ready_ids()) == 2, "re-adopted workers READY")
    after = {w["id"]: w["pid"] for w in flockctl("status", "--json").json()["workers"]}
    assert after == before


def test_down_stops_workers_left_by_a_dead_daemon(deployment, flockctl_home):
    assert deployment().code == 0
    until_sync(lambda: len(ready_ids()) == 2, "two READY workers")
    record = json.loads((flockctl_home / "default" / "daemon.json").read_text())
    os.kill(record["pid"], signal.SIGKILL)
    until_sync(lambda: not psutil.pid_exists(record["pid"]), "the daemon to die", 10)
    assert len(processes_with(deployment.marker)) == 2
    down = flockctl("down")
    assert down.code == 0 and "stopped 2 worker(s) it had left" in down.err
    assert processes_with(deployment.marker) == []


def test_down_of_idle_workers_logs_no_warning_and_leaves_no_process(
    deployment, flockctl_home, tmp_path
):
    # Engine stats pulled every 50 ms, dropped with a warning after one failed pull: a pull
    # that met a worker being stopped used to log it as a fault.
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"engine": "flockctl", "queue_lengths": [0], "jobs": []}))
    up = deployment(
        "--probe-interval",
        "0.05",
        "--failure-threshold",
        "1",
        worker_args=("--engine-stats", str(stats)),
    )
    assert up.code == 0, up.err

    def engines_ready() -> list[dict] | None:
        workers = flockctl("status", "--json").json()["workers"]
        found = [w for w in workers if w["state"] == "READY" and w["engine"]]
        return found if len(found) == 2 else None

    pids = [w["pid"] for w in until_sync(engines_ready, "two READY engine workers")]
    down = flockctl("down")
    assert down.code == 0 and down.err == 'flockctl: deployment "default" stopped'
    assert processes_with(deployment.marker) == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    log = (flockctl_home / "default" / "daemon.log").read_text()
    assert "worker w1 terminated" in log and "worker w2 terminated" in log
    assert [line for line in log.splitlines() if "WARNING" in line] == []


def test_port_in_use_is_a_clear_error(tmp_path):
    with free_socket() as sock:
        sock.listen()
        port = sock.getsockname()[1]
        result = flockctl("up", "--port", str(port), "--worker-command", "x --port {port}")
    assert result.code == 7
    assert result.err == (
        f"flockctl: port {port} on 127.0.0.1 is already in use; choose another with --port"
    )


def test_invalid_spec_is_refused_naming_the_field(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("service:\n  replica_policy:\n    min_replicas: 1\n    max_replica: 3\n")
    result = flockctl("up", str(spec), "--worker-command", "x {port}")
    assert result.code == 2
    assert "service.replica_policy.max_replica: unknown or unsupported field" in result.err
    result = flockctl("up", "--worker-command", "x {port}", "--min-workers", "-1")
    assert result.code == 2
    assert "--min-workers: Input should be greater than or equal to 0" in result.err


def test_daemon_that_dies_at_start_shows_its_log(tmp_path, flockctl_home):
    # daemon.json cannot be written (a directory is in the way): the daemon refuses to run.
    (flockctl_home / "default" / "daemon.json").mkdir(parents=True)
    result = flockctl(
        "up",
        "--port",
        str(free_port()),
        "--worker-command",
        f"{sys.executable} {FAKE_WORKER} --port {{port}}",
        "--timeout",
        "30",
    )
    assert result.code == 4
    assert "the daemon exited with code 1 while starting" in result.err
    assert "cannot write" in result.err


def test_commands_when_nothing_runs():
    status = flockctl("status")
    assert status.code == 3
    assert status.err == (
        'flockctl: no daemon named "default" is running; start one with flockctl up --name default'
    )
    assert flockctl("status", "--json").code == 3
    assert flockctl("logs").code == 3
    assert flockctl("down").code == 0
    assert flockctl("status", "--name", "../etc").code == 2


def test_json_output_watch_and_unknown_logs(deployment, flockctl_home):
    started = deployment("--no-wait", "--json")
    assert started.code == 0
    assert started.json()["state_dir"] == str(flockctl_home / "default")
    until_sync(lambda: flockctl("status").code == 0, "the daemon")
    result = flockctl("logs", "w99")
    assert result.code == 8
    assert "no log for 'w99'; known: daemon" in result.err

    watch = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "status", "--watch", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    snapshots = [json.loads(watch.stdout.readline()) for _ in range(3)]
    watch.send_signal(signal.SIGINT)
    assert watch.wait(10) == 0
    assert [s["schema"] for s in snapshots] == [4, 4, 4]
    assert snapshots[0]["generated_at"] < snapshots[2]["generated_at"]


def test_status_shows_the_jobs_of_engine_workers(deployment, tmp_path):
    # The fake worker serves this file at /stats, as flockctl's engine would.
    stats = {
        "engine": "flockctl",
        "model": "demo",
        "scheduler": "mlfq",
        "device": {"type": "cpu", "memory_used": 2 << 30, "memory_total": 16 << 30},
        "queue_lengths": [1, 0, 2],
        "running": 1,
        "waiting": 1,
        "swapped": 1,
        "speculation": {"active": True, "mean_accepted_length": 2.4},
        "jobs": [
            {
                "id": "job-11",
                "state": "running",
                "level": 0,
                "generated_tokens": 9,
                "age": 2.5,
                "speculation": {"enabled": True, "mean_accepted_length": 3.125},
            },
            {"id": "job-3", "state": "preempted", "level": 2, "preemptions": 4, "age": 30},
            {"id": "job-7", "state": "waiting", "level": 0, "generated_tokens": 0, "age": 0.1},
        ],
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    assert deployment(worker_args=("--engine-stats", str(path))).code == 0

    def engines() -> list[dict] | None:
        workers = flockctl("status", "--json").json()["workers"]
        found = [w for w in workers if w["state"] == "READY" and w["engine"]]
        return found if len(found) == 2 else None

    for worker in until_sync(engines, "engine stats of two workers"):
        assert worker["engine"]["jobs"] == stats["jobs"]
        assert worker["engine"]["queue_lengths"] == [1, 0, 2]
        assert worker["gpu_memory"]["used"] == 2 << 30 and worker["gpu_memory"]["device"] == "cpu"
        assert worker["engine_stale"] is False

    out = flockctl("status").out
    jobs = [line.split()[:4] for line in out.splitlines() if "job-" in line]
    assert jobs == [
        ["w1", "job-3", "◐", "preempted"],
        ["w1", "job-7", "○", "waiting"],
        ["w1", "job-11", "▶", "running"],
        ["w2", "job-3", "◐", "preempted"],
        ["w2", "job-7", "○", "waiting"],
        ["w2", "job-11", "▶", "running"],
    ]
    engines = [line.split() for line in out.splitlines() if "mlfq" in line]
    assert [e[0] for e in engines] == ["w1", "w2"]
    # model, scheduler, device, queues per level, run, wait, swap, preemptions, memory
    row = "demo mlfq cpu 1 0 2 1 1 1 - 2.40 2.0/16.0 GiB"
    assert engines[0][1:] == row.split()
    running = next(line for line in out.splitlines() if "job-11" in line).split()
    assert running[-2] == "3.12"  # the job's tokens per speculative step


def test_up_builds_the_demo_in_front_and_stops_when_it_cannot(tmp_path, monkeypatch):
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("")
    monkeypatch.setenv("FLOCKCTL_CACHE", str(not_a_directory))
    r = flockctl("up", "--model", "demo", "--port", str(free_port()), timeout=120)
    assert r.code == 1, r.err
    assert "building the demo model once before starting" in r.err
    assert f"cannot build the demo under {not_a_directory}" in r.err
    assert "the demo model could not be built (see above)" in r.err
    assert "Traceback" not in r.err
    assert flockctl("status").code == 3  # no daemon was started


def test_engine_demo_and_python_m_engine_demo_are_one_command(tmp_path):
    # flockctl up runs the second in a child process; a failure reads the same under either name.
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("")
    args = ["--root", str(not_a_directory)]
    r = flockctl("engine", "demo", *args)
    child = subprocess.run(
        [sys.executable, "-m", "flockctl.engine.demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
        env=dict(os.environ),
    )
    assert (r.code, child.returncode) == (1, 1), child.stderr
    assert r.err.startswith(f"flockctl: cannot build the demo under {not_a_directory}: ")
    assert child.stderr == r.err + "\n"
    assert r.out == child.stdout == ""


def test_model_is_not_combined_with_a_worker_command():
    result = flockctl("up", "--model", "demo", "--worker-command", "x --port {port}")
    assert result.code == 2
    assert result.err.startswith("flockctl: --model and --worker-command cannot be used together:")


def test_help_and_version():
    help_text = flockctl("up", "--help").out
    assert "--worker-command" in help_text and "--model" in help_text
    assert "--engine-args" in help_text and "[default: 3000]" in help_text
    assert flockctl("--version").out.startswith("flockctl ")
    listed = " ".join(flockctl("--help").out.split())
    for code in ExitCode:  # written from the enum, so none can be left out
        assert f"{code.value} {code.summary}" in listed


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_dashboard_under_tmux_shows_the_workers_of_a_real_daemon(deployment, flockctl_home):
    assert deployment().code == 0
    until_sync(lambda: len(ready_ids()) == 2, "two READY workers")
    socket_name = f"flockctl-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket_name]
    command = (
        f"env FLOCKCTL_HOME={flockctl_home} TERM=xterm-256color"
        f" {sys.executable} -m flockctl dashboard --interval 0.2"
    )
    subprocess.run([*tmux, "new-session", "-d", "-x", "140", "-y", "40", command], check=True)
    try:

        def screen() -> str | None:
            out = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True)
            shown = out.stdout
            return shown if all(word in shown for word in ("w1", "w2", "READY")) else None

        try:
            text = until_sync(screen, "the workers on the dashboard")
        except AssertionError as exc:
            shown = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True)
            raise AssertionError(f"{exc}; the screen:\n{shown.stdout}") from None
        rows = [line for line in text.splitlines() if "● READY" in line]
        assert len(rows) == 2, text
        subprocess.run([*tmux, "send-keys", "q"], check=True)
        until_sync(
            lambda: subprocess.run([*tmux, "has-session"], capture_output=True).returncode != 0,
            "the dashboard to quit on q",
            10,
        )
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
