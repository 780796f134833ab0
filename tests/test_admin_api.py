"""The admin API behind the dashboard's worker detail, logs and actions, on real daemons and
real worker processes: worker detail, recycle (drain) vs remove, bounds, logs, model workers."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from conftest import TOKEN, fake_worker_command, until
from yarl import URL

from flockctl.client import AdminClient, ClientError
from flockctl.exitcodes import ExitCode
from flockctl.server.autoscaler import FixedPolicy, QueueLengthRunningMean
from flockctl.server.config import DeploymentConfig
from flockctl.server.provisioners import LocalProvisioner
from flockctl.server.workers import Worker, WorkerState
from flockctl.state import DaemonRecord, read_log


async def call(http, method: str, d, path: str, **kwargs) -> tuple[int, dict]:
    async with http.request(method, f"{d.url}{path}", headers=d.admin, **kwargs) as resp:
        return resp.status, await resp.json()


def message(body: dict) -> str:
    return body["error"]["message"]


# -- worker detail ---------------------------------------------------------------------------


@pytest.mark.e2e
async def test_worker_detail_has_its_probe_history_and_command_line(daemon, http):
    d = await daemon(
        worker_command=fake_worker_command(),
        probe={"interval_seconds": 0.01, "timeout_seconds": 2},
    )
    await d.wait_ready(1)
    w1 = d.deployment.pool.get("w1")
    await until(lambda: len(w1.probe_history) == 30, "30 probes")
    first = w1.probe_history[0]["at"]
    await until(lambda: w1.probe_history[0]["at"] > first, "the history to roll on")
    status, body = await call(http, "GET", d, "/-/workers/w1")
    assert status == 200
    assert body["id"] == "w1" and body["state"] == "READY" and body["model"] is None
    history = body["probe_history"]
    assert len(history) == 30  # only the last 30 are kept
    assert set(history[-1]) == {"at", "ok", "ms", "detail"}
    assert history[-1]["ok"] is True and history[-1]["detail"] == "HTTP 200"
    assert isinstance(history[-1]["ms"], float)
    times = [p["at"] for p in history]
    assert times == sorted(times)  # oldest first
    port = body["url"].rsplit(":", 1)[1]
    assert body["command"] == fake_worker_command().replace("{port}", port)
    # The status snapshot stays small: no history there.
    status, snap = await call(http, "GET", d, "/-/status")
    assert "probe_history" not in snap["workers"][0] and "command" not in snap["workers"][0]
    assert snap["workers"][0]["model"] is None


@pytest.mark.e2e
async def test_worker_detail_of_an_unknown_worker_names_the_known_ones(daemon, http):
    d = await daemon(worker_command=fake_worker_command())
    await d.wait_ready(1)
    status, body = await call(http, "GET", d, "/-/workers/w9")
    assert status == 404
    assert body["error"]["type"] == "not_found"
    assert message(body) == "no worker 'w9'; known: w1"
    async with http.get(f"{d.url}/-/workers/w1") as resp:  # the admin token is needed
        assert resp.status == 401


async def test_a_static_worker_has_no_command_and_a_failed_probe_is_recorded(
    daemon, http, upstream, tmp_path
):
    from fake_worker import build_app

    marker = tmp_path / "unhealthy"
    marker.touch()
    up = await upstream(build_app("u", 4, 0.0, marker))
    d = await daemon(endpoints=[up.url])
    w1 = d.deployment.pool.get("w1")
    await until(lambda: len(w1.probe_history) >= 2, "two probes")
    status, body = await call(http, "GET", d, "/-/workers/w1")
    assert status == 200 and body["command"] is None and body["model"] is None
    assert body["probe_history"][0]["ok"] is False
    assert body["probe_history"][0]["detail"] == "HTTP 503"


# -- recycle (drain) and remove --------------------------------------------------------------


@pytest.mark.e2e
async def test_drain_keeps_the_target_so_a_replacement_comes_while_delete_lowers_it(
    daemon, http, monkeypatch
):
    d = await daemon(worker_command=fake_worker_command(), autoscaler="fixed", replicas=2)
    await d.wait_ready(2)
    controller = d.deployment.controller
    w1 = d.deployment.pool.get("w1")
    w1.in_flight += 1  # a request still running: the drain waits for it
    status, body = await call(http, "POST", d, "/-/workers/w1/drain")
    assert status == 202
    assert body["id"] == "w1" and body["state"] == "DRAINING"
    assert controller.target == 2
    assert controller.last_decision.reason == "worker w1 drained by operator"
    status, body = await call(http, "POST", d, "/-/workers/w1/drain")
    assert status == 409 and message(body) == "worker w1 is already DRAINING"
    await until(lambda: d.states().get("w3") == "READY", "a replacement for w1")
    assert d.states()["w1"] == "DRAINING"
    w1.in_flight -= 1
    await until(lambda: d.states()["w1"] == "TERMINATED", "w1 terminated after its request")
    assert controller.target == 2

    status, body = await call(http, "DELETE", d, "/-/workers/w2")
    assert status == 202 and body["state"] == "DRAINING"
    assert controller.target == 1
    assert controller.last_decision.reason == "worker w2 removed by operator"
    await until(lambda: d.states()["w2"] == "TERMINATED", "w2 terminated")
    # Two more of the autoscaler's decisions, each followed in its step by a reconcile: neither
    # brings a replacement for a removed worker.
    decisions = []
    apply = controller.apply

    def counted(decision):
        decisions.append(decision)
        apply(decision)

    monkeypatch.setattr(controller, "apply", counted)
    await until(lambda: len(decisions) >= 2, "two more autoscaler decisions")
    assert d.states() == {"w1": "TERMINATED", "w2": "TERMINATED", "w3": "READY"}
    status, snap = await call(http, "GET", d, "/-/status")
    assert snap["autoscaler"]["target"] == 1

    status, body = await call(http, "POST", d, "/-/workers/w42/drain")
    assert status == 404 and message(body) == "no worker 'w42'; known: w1, w2, w3"
    status, body = await call(http, "POST", d, "/-/workers/w2/drain")
    assert status == 409 and message(body) == "worker w2 is already TERMINATED"


@pytest.mark.e2e
async def test_recycling_a_worker_with_its_own_command_brings_back_the_same(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=1, max_workers=2)
    await d.wait_ready(1)
    controller = d.deployment.controller
    own = fake_worker_command("--id", "own")
    controller.add_worker(own, "own-model")
    await d.wait_ready(2)
    status, _ = await call(http, "POST", d, "/-/workers/w2/drain")
    assert status == 202
    w3 = d.deployment.pool.get("w3")
    assert w3 is not None and w3.command == own and w3.model == "own-model"
    await d.wait_ready(2)
    status, body = await call(http, "GET", d, "/-/workers/w3")
    assert "--id own" in body["command"] and body["model"] == "own-model"
    assert controller.target == 2 and "w4" not in d.states()


# -- a worker serving another model ----------------------------------------------------------


@pytest.mark.e2e
async def test_adding_a_worker_with_a_model_runs_the_engine_serving_that_model(
    daemon, http, tmp_path
):
    d = await daemon(
        model=str(tmp_path / "main-model"),
        draft_models=[str(tmp_path / "draft")],
        engine_args=["--scheduler", "fcfs"],
        min_workers=0,
        max_workers=1,
    )
    other = str(tmp_path / "other model")  # a space, to check the quoting
    status, body = await call(http, "POST", d, "/-/workers", json={"model": other})
    assert status == 201
    assert body["id"] == "w1" and body["model"] == other
    w1 = d.deployment.pool.get("w1")
    # It joins a group of its model, whose autoscaler alone scales it; the deployment's own
    # target stays.
    assert w1.group == "other-model" and d.deployment.controller_of(w1).target == 1
    assert d.deployment.controller.target == 0
    await until(lambda: w1.pid is not None, "the worker's process")
    status, body = await call(http, "GET", d, "/-/workers/w1")
    command = body["command"]
    assert f"engine serve --model {shlex.quote(other)}" in command
    threads = d.deployment.cfg.threads_per_engine()
    assert "--scheduler fcfs" in command and f"--threads {threads}" in command
    assert "--draft-model" not in command  # the draft belongs to the deployment's own model
    assert body["model"] == other
    record = json.loads((d.deployment.state_dir / "workers.json").read_text())["workers"][0]
    assert record["model"] == other and "engine serve" in record["template"]
    # At max_workers, a model worker is refused like any other.
    status, body = await call(http, "POST", d, "/-/workers", json={"model": other})
    assert status == 409 and "already at max_workers (1)" in message(body)
    status, _ = await call(http, "DELETE", d, "/-/workers/w1")  # no need to load a model
    assert status == 202


async def test_a_model_worker_body_is_checked(daemon, http, upstream):
    d = await daemon(worker_command=fake_worker_command(), min_workers=0)
    status, body = await call(http, "POST", d, "/-/workers", json={"model": ""})
    assert status == 422 and message(body).startswith("model: must name a model")
    status, body = await call(http, "POST", d, "/-/workers", json={"model": " "})
    assert status == 422 and message(body).startswith("model: must name a model")
    both = {"model": "demo", "url": "http://127.0.0.1:1"}
    status, body = await call(http, "POST", d, "/-/workers", json=both)
    assert status == 422 and message(body).startswith("url and model cannot be used together")
    status, body = await call(http, "POST", d, "/-/workers", json={"model": 3})
    assert status == 422 and "model" in message(body)
    assert d.states() == {}

    up = await upstream()
    s = await daemon(endpoints=[up.url])
    status, body = await call(http, "POST", s, "/-/workers", json={"model": "demo"})
    assert status == 422
    assert message(body) == "model: only a local deployment starts workers from a model"


def test_a_model_command_takes_the_deployments_engine_args_and_drafts_only_for_its_model():
    cfg = DeploymentConfig(model="main", draft_models=["d1"], engine_args=["--x", "1"])
    assert cfg.local_command() == cfg.model_command("main")
    assert "--draft-model d1" in cfg.model_command("main")
    other = cfg.model_command("other")
    assert "--model other --host 127.0.0.1 --port {port} --x 1 --threads" in other
    assert "--draft-model" not in other
    custom = DeploymentConfig(worker_command="srv --port {port}")
    assert "--x" not in custom.model_command("m") and "--threads" in custom.model_command("m")


@pytest.mark.e2e
async def test_a_readopted_worker_keeps_its_own_command_and_model(tmp_path: Path):
    sleeper = f"{sys.executable} -c 'import time; time.sleep(60)' {{port}} {{worker_id}}"
    first = LocalProvisioner("srv --port {port}", tmp_path, model="main", stop_timeout=2)
    plain = Worker(id="w1", provisioner="local")
    first.command = sleeper  # the deployment's own command, for this test a sleeper
    own = Worker(id="w2", provisioner="local", command=sleeper + " own", model="other")
    await first.launch(plain)
    await first.launch(own)
    try:
        assert plain.model == "main" and plain.command is None
        assert first.command_line(own).endswith(" w2 own")
        again = LocalProvisioner("srv --port {port}", tmp_path, model="main")
        adopted = {w.id: w for w in again.adopt()}
        assert adopted["w1"].command is None and adopted["w1"].model == "main"
        assert adopted["w2"].command == sleeper + " own" and adopted["w2"].model == "other"
        assert again.command_line(adopted["w2"]) == first.command_line(own)
        assert adopted["w2"].state == WorkerState.STARTING
    finally:
        await first.terminate(plain)
        await first.terminate(own)


# -- bounds ----------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_patching_the_bounds_moves_the_target_at_once(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=1, max_workers=2)
    await d.wait_ready(1)
    status, body = await call(
        http, "PATCH", d, "/-/autoscaler", json={"min_workers": 2, "max_workers": 3}
    )
    assert status == 200
    assert (body["min_workers"], body["max_workers"], body["target"]) == (2, 3, 2)
    assert body["last_decision"]["reason"] == "bounds set by operator: min 2, max 3"
    await d.wait_ready(2)
    status, snap = await call(http, "GET", d, "/-/status")
    auto = snap["autoscaler"]
    assert (auto["min_workers"], auto["max_workers"], auto["target"]) == (2, 3, 2)

    # One bound alone is merged with the other; the merged pair must hold.
    status, body = await call(http, "PATCH", d, "/-/autoscaler", json={"max_workers": 1})
    assert status == 422
    assert "got min_workers 2, max_workers 1" in message(body)
    status, body = await call(http, "PATCH", d, "/-/autoscaler", json={"min_workers": 0})
    assert status == 200 and (body["min_workers"], body["max_workers"]) == (0, 3)
    assert body["target"] == 2  # within the new bounds: unchanged
    status, body = await call(http, "PATCH", d, "/-/autoscaler", json={"max_workers": 1})
    assert status == 200 and body["target"] == 1
    await until(lambda: "TERMINATED" in d.states().values(), "a worker drained")
    assert sorted(d.states().values()) == ["READY", "TERMINATED"]
    # Adding beyond the new max is refused.
    status, body = await call(http, "POST", d, "/-/workers")
    assert status == 409 and "already at max_workers (1)" in message(body)


async def test_bad_bounds_are_refused_with_both_numbers(daemon, http, upstream):
    d = await daemon(worker_command=fake_worker_command(), min_workers=0, max_workers=2)
    cases = [
        ({"max_workers": 0}, "got min_workers 0, max_workers 0"),
        ({"min_workers": -1}, "got min_workers -1, max_workers 2"),
        ({"min_workers": 3}, "got min_workers 3, max_workers 2"),
        ({}, "give min_workers, max_workers or both"),
        ({"min_workers": None}, "give min_workers, max_workers or both"),
        ({"min": 1}, "min"),
        ({"max_workers": "many"}, "max_workers"),
    ]
    for patch, expected in cases:
        status, body = await call(http, "PATCH", d, "/-/autoscaler", json=patch)
        assert status == 422, patch
        assert expected in message(body), (patch, message(body))
    policy = d.deployment.policy
    assert (policy.min_workers, policy.max_workers) == (0, 2)

    up = await upstream()
    s = await daemon(endpoints=[up.url])
    status, body = await call(http, "PATCH", s, "/-/autoscaler", json={"max_workers": 3})
    assert status == 409
    assert message(body) == (
        "a static deployment has one worker per endpoint; its bounds cannot change"
    )


def test_bounds_on_the_policies():
    fixed = FixedPolicy(2, min_workers=1, max_workers=2)
    fixed.set_bounds(3, 5)
    assert (fixed.min_workers, fixed.max_workers, fixed.replicas) == (3, 5, 3)
    fixed.set_bounds(0, 1)
    assert fixed.replicas == 1
    fixed.set_bounds(0, 4)
    assert fixed.replicas == 1  # within the bounds a fixed number stays fixed
    qlrm = QueueLengthRunningMean(1, 2)
    qlrm.set_bounds(2, 4)
    assert (qlrm.min_workers, qlrm.max_workers) == (2, 4)
    for low, high in ((3, 2), (-1, 2), (0, 0)):
        try:
            qlrm.set_bounds(low, high)
        except ValueError as exc:
            assert f"got min_workers {low}, max_workers {high}" in str(exc)
        else:
            raise AssertionError(f"bounds {low}, {high} were accepted")
    assert (qlrm.min_workers, qlrm.max_workers) == (2, 4)


# -- logs ------------------------------------------------------------------------------------


async def test_following_the_daemon_log_by_offset(daemon, http):
    d = await daemon(worker_command=fake_worker_command(), min_workers=0)
    status, body = await call(http, "GET", d, "/-/logs/daemon")
    assert status == 404 and "flockctl up --foreground logs to its stderr" in message(body)
    log = d.deployment.state_dir / "daemon.log"
    log.write_bytes(b"one\ntwo\nthree\npart")
    status, body = await call(http, "GET", d, "/-/logs/daemon", params={"tail": 2})
    assert status == 200
    assert body == {"target": "daemon", "offset": 14, "lines": ["two", "three"], "reset": False}
    with log.open("ab") as f:
        f.write(b"ial \xff\nfour\n")
    status, body = await call(http, "GET", d, "/-/logs/daemon", params={"offset": 14})
    assert body["lines"] == ["partial \ufffd", "four"] and not body["reset"]
    end = log.stat().st_size
    assert body["offset"] == end
    status, body = await call(http, "GET", d, "/-/logs/daemon", params={"offset": end})
    assert body["lines"] == [] and body["offset"] == end
    log.write_bytes(b"fresh\n")  # truncated (or rotated)
    status, body = await call(http, "GET", d, "/-/logs/daemon", params={"offset": end})
    assert body == {"target": "daemon", "offset": 6, "lines": ["fresh"], "reset": True}
    status, body = await call(http, "GET", d, "/-/logs/daemon", params={"tail": 0})
    assert body["lines"] == [] and body["offset"] == 6


@pytest.mark.e2e
async def test_worker_logs_and_what_is_not_a_log(daemon, http, upstream):
    d = await daemon(worker_command=fake_worker_command(), min_workers=1)
    await d.wait_ready(1)
    status, body = await call(http, "GET", d, "/-/logs/w1")
    assert status == 200 and body["target"] == "w1"
    assert "starting: " in body["lines"][0] and "fake_worker.py" in body["lines"][0]
    assert body["offset"] == (d.deployment.state_dir / "workers" / "w1.log").stat().st_size
    status, body = await call(http, "GET", d, "/-/logs/w9")
    assert status == 404 and message(body) == "no log for 'w9'; known: daemon, w1"
    for sneaky in ("..", "..%2Fdaemon.json", "workers%2Fw1", "%2E%2E"):
        url = URL(f"{d.url}/-/logs/{sneaky}", encoded=True)  # as sent, not normalised
        async with http.get(url, headers=d.admin) as resp:
            assert resp.status == 404, sneaky
            assert "known: daemon, w1" in message(await resp.json()), sneaky
    status, body = await call(http, "GET", d, "/-/nothing-here")
    assert status == 404 and body["error"] == {
        "message": "Not Found",
        "type": "not_found",
        "code": 404,
    }
    status, body = await call(http, "PUT", d, "/-/autoscaler")
    assert status == 405 and body["error"]["type"] == "method_not_allowed"
    for params in ({"tail": 5001}, {"tail": -1}, {"offset": -1}):
        status, body = await call(http, "GET", d, "/-/logs/w1", params=params)
        assert status == 422 and next(iter(params)) in message(body)

    up = await upstream()
    s = await daemon(endpoints=[up.url])
    status, body = await call(http, "GET", s, "/-/logs/w1")
    assert status == 404 and message(body) == "worker w1 has no log: it is a static endpoint"


def test_reading_a_log_returns_at_most_5000_lines_at_a_time(tmp_path: Path):
    path = tmp_path / "big.log"
    path.write_text("".join(f"line {i}\n" for i in range(6000)))
    chunk = read_log(path, offset=0)
    assert len(chunk.lines) == 5000 and chunk.lines[-1] == "line 4999"
    rest = read_log(path, offset=chunk.offset)
    assert rest.lines[0] == "line 5000" and rest.lines[-1] == "line 5999"
    assert rest.offset == path.stat().st_size
    tail = read_log(path, tail=3)
    assert tail.lines == ["line 5997", "line 5998", "line 5999"]
    assert read_log(tmp_path / "missing.log", tail=5).lines == []


# -- the client ------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_the_admin_client_speaks_every_route(daemon):
    d = await daemon(worker_command=fake_worker_command(), min_workers=1, max_workers=2)
    await d.wait_ready(1)
    (d.deployment.state_dir / "daemon.log").write_text("started\n")
    port = int(d.url.rsplit(":", 1)[1])
    record = DaemonRecord(os.getpid(), 0.0, "127.0.0.1", port, TOKEN, "test", "default")

    def script() -> dict:
        with AdminClient(record) as client:
            out = {"worker": client.worker("w1"), "logs": client.logs("daemon", tail=5)}
            out["bounds"] = client.set_bounds(max_workers=3)
            out["added"] = client.add_worker()
            out["drained"] = client.drain_worker("w1")
            out["follow"] = client.logs("daemon", offset=out["logs"]["offset"])
            try:
                client.add_worker(url="http://127.0.0.1:1", model="m")
            except ClientError as exc:
                out["error"] = str(exc)
            try:
                client.logs("../daemon.json")
            except ClientError as exc:
                out["missing"] = exc
            return out

    out = await asyncio.to_thread(script)
    assert out["worker"]["id"] == "w1" and out["worker"]["probe_history"]
    assert out["logs"] == {"target": "daemon", "offset": 8, "lines": ["started"], "reset": False}
    assert out["bounds"]["max_workers"] == 3
    assert out["added"]["id"] == "w2" and out["drained"]["state"] == "DRAINING"
    assert out["follow"]["lines"] == [] and out["follow"]["offset"] == 8
    assert "HTTP 422: url and model cannot be used together" in out["error"]
    assert out["missing"].code == ExitCode.NOT_FOUND
    assert "no log for '../daemon.json'" in str(out["missing"])
    await until(lambda: "w3" in d.states(), "a replacement for the drained w1")


async def test_the_client_sends_ids_that_need_quoting_whole(daemon):
    d = await daemon(endpoints=["http://127.0.0.1:1"])
    port = int(d.url.rsplit(":", 1)[1])
    record = DaemonRecord(os.getpid(), 0.0, "127.0.0.1", port, TOKEN, "test", "default")
    odd = "w 1?x#y"  # unquoted, the daemon would see "w 1" and a query

    def script() -> list[ClientError]:
        errors = []
        with AdminClient(record) as client:
            for call in (
                lambda: client.worker(odd),
                lambda: client.drain_worker(odd),
                lambda: client.remove_worker(odd),
                lambda: client.logs(f"{odd}/../daemon"),
            ):
                try:
                    call()
                except ClientError as exc:
                    errors.append(exc)
        return errors

    worker, drain, remove, logs = await asyncio.to_thread(script)
    for error in (worker, drain, remove):
        assert f"no worker {odd!r}; known: w1" in str(error) and error.code == ExitCode.NOT_FOUND
    assert f"no log for '{odd}/../daemon'" in str(logs) and logs.code == ExitCode.NOT_FOUND
