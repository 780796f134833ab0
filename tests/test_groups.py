"""Worker groups: the SPEC's ``flockctl: groups``, one autoscaler per group scaling on its own
queue, scale-down only within a group, and the status a user reads (in-process, on a clock the
test moves; routing to the groups with a real daemon is in test_model_routing.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from fleet import Clock, MemoryProvisioner, Probes

from flockctl.render import render_plan, status_console, status_view
from flockctl.server.config import ConfigError, DeploymentConfig
from flockctl.server.controller import Controller, WorkerGroup
from flockctl.server.deployment import make_autoscaler
from flockctl.server.dry_run import plan
from flockctl.server.groups import Groups
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.request_meta import RequestMeta
from flockctl.server.spec_file import resolve
from flockctl.server.workers import Worker, WorkerState

S = WorkerState

SPEC = """\
flockctl:
  upscale_delay: 0
  downscale_delay: 30
  autoscale_up: 1
  autoscale_down: 0.5
  queue_tracking_window: 10
  groups:
    - name: small
      model: alpha
      min_workers: 0
      max_workers: 3
    - name: tools
      worker_command: "server --port {port}"
      min_workers: 1
      max_workers: 2
"""


def spec_config(tmp_path: Path, text: str = SPEC) -> DeploymentConfig:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return resolve(path)


@pytest.fixture
async def grouped(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Controller] = []

    def build(cfg: DeploymentConfig | None = None) -> tuple[Groups, WorkerPool, Clock]:
        cfg = cfg or spec_config(tmp_path)
        pool = WorkerPool(make_policy("least-connection"), None, max_queue=16)
        provisioner, clock = MemoryProvisioner(), Clock()

        def controller(group: WorkerGroup | None, own: DeploymentConfig, policy, **kw):
            made.append(
                Controller(pool, provisioner, policy, Probes(), clock=clock, group=group, **kw)  # type: ignore[arg-type]
            )
            return made[-1]

        return Groups(cfg, pool, make_autoscaler, controller), pool, clock

    yield build
    for controller in made:
        await controller.stop(drain=False)


def step(groups: Groups, clock: Clock, seconds: float = 1.0) -> None:
    clock.now += seconds
    for controller in groups:
        controller.step(clock())


async def ready(pool: WorkerPool, worker_id: str, *models: str) -> Worker:
    worker = await until(lambda: pool.get(worker_id), f"{worker_id} launched")
    await until(lambda: worker.state == S.STARTING, f"{worker_id} STARTING")
    worker.learn_models(list(models))
    pool.models_changed()
    pool.set_state(worker, S.READY)
    return worker


def by_group(pool: WorkerPool) -> dict[str, str | None]:
    return {w.id: w.group for w in pool if w.live}


async def test_each_group_scales_on_its_own_queue(grouped):
    groups, pool, clock = grouped()
    small, tools = groups.controllers
    assert (small.target, tools.target) == (0, 1)
    assert pool.models() == ("alpha",)  # declared by its group before any worker runs it
    step(groups, clock)
    await ready(pool, "w1", "toolbox")
    assert by_group(pool) == {"w1": "tools"}
    assert pool.routes_by_model and pool.models() == ("alpha", "toolbox")
    # Three requests for alpha wait: only the small group sees them.
    waiting = [asyncio.create_task(pool.acquire(30, meta=RequestMeta(model="alpha")))]
    waiting += [asyncio.create_task(pool.acquire(30, meta=RequestMeta(model="alpha")))]
    waiting += [asyncio.create_task(pool.acquire(30, meta=RequestMeta(model="alpha")))]
    await until(lambda: pool.queued == 3, "three alpha requests waiting")
    assert (small.queued, tools.queued) == (3, 0)
    step(groups, clock)
    assert small.target == 1 and "scaling from zero" in small.last_decision.reason
    assert tools.target == 1
    await ready(pool, "w2", "alpha")
    assert by_group(pool) == {"w1": "tools", "w2": "small"}
    assert [w.id for w in await asyncio.gather(*waiting)] == ["w2"] * 3
    # A request naming no model, or a model no group serves, is the first group's to scale on.
    w1, w2 = pool.get("w1"), pool.get("w2")
    assert w1 is not None and w2 is not None
    for worker in (w1, w2):
        worker.capacity_flag = worker.in_flight  # both full
    anything = asyncio.create_task(pool.acquire(30))
    await until(lambda: pool.queued == 1, "a request without a model waiting")
    assert (small.queued, tools.queued) == (1, 0)
    w1.capacity_flag = None
    pool.capacity_changed(w1)
    assert await asyncio.wait_for(anything, 5) is w1


async def test_scale_down_takes_only_workers_of_the_group_it_scales(grouped):
    groups, pool, clock = grouped()
    small, tools = groups.controllers
    tools.set_bounds(2, 2)
    step(groups, clock)
    small.add_worker()  # the operator adds one alpha worker
    for worker_id, models in (("w1", ["toolbox"]), ("w2", ["toolbox"]), ("w3", ["alpha"])):
        await ready(pool, worker_id, *models)
    assert by_group(pool) == {"w1": "tools", "w2": "tools", "w3": "small"}
    # The alpha worker is out of rotation and idle: the first a pool-wide scale-down would take.
    pool.set_state(pool.get("w3"), S.NOT_READY, "probe failed")  # type: ignore[arg-type]
    tools.set_bounds(1, 1)
    assert tools.target == 1
    draining = {w.id for w in pool if w.state == S.DRAINING}
    assert len(draining) == 1 and draining <= {"w1", "w2"}
    assert pool.get("w3").state == S.NOT_READY  # type: ignore[union-attr]
    assert small.target == 1


async def test_the_first_group_adopts_and_every_group_draws_ids_from_one_sequence(grouped):
    groups, pool, clock = grouped()
    small, tools = groups.controllers
    assert small.adopts and not tools.adopts
    small.add_worker()
    step(groups, clock)
    ids = {w.id: w.group for w in pool}
    assert ids == {"w1": "small", "w2": "tools"}
    assert pool.get("w2").command == "server --port {port}"  # type: ignore[union-attr]
    assert "--model alpha" in (pool.get("w1").command or "")  # type: ignore[union-attr]
    # A worker re-adopted after a restart rejoins the group running its command.
    stray = Worker(id="w9", provisioner="memory", command="server --port {port}")
    assert groups.group_of(stray) == "tools"
    assert groups.group_of(Worker(id="w8", provisioner="memory")) == "small"
    # One whose provisioner recorded its group (a SkyPilot cluster) rejoins that group.
    assert groups.group_of(Worker(id="w7", provisioner="memory", group="tools")) == "tools"


async def test_a_worker_for_another_model_gets_a_group_of_its_model(grouped):
    cfg = DeploymentConfig(worker_command="server --port {port}", min_workers=1, max_workers=2)
    groups, pool, clock = grouped(cfg)
    assert not groups.named and groups.views() == []
    step(groups, clock)
    assert by_group(pool) == {"w1": None}
    other = groups.for_model("org/other model", "engine --model other --port {port}")
    assert groups.for_model("org/other model", "ignored") is other  # one group per model
    other.add_worker("engine --model other --port {port}", "org/other model")
    step(groups, clock)
    assert by_group(pool) == {"w1": None, "w2": "other-model"}
    assert (groups.primary.target, other.target) == (1, 1)
    views = {v["name"]: v for v in groups.views()}
    assert set(views) == {"default", "other-model"}
    assert views["other-model"]["model"] == "org/other model"
    assert views["other-model"]["min_workers"] == 1  # the operator's worker is kept


def test_groups_are_checked_naming_the_file_and_field(tmp_path):
    bad = {
        "    - {name: a, model: m, worker_command: 'x {port}'}": (
            "spec.yaml: flockctl.groups.0.model: give one of model or worker_command"
        ),
        "    - {name: a}": "spec.yaml: flockctl.groups.0.model: give one of",
        "    - {name: a, model: m, colour: red}": "spec.yaml: flockctl.groups.0.colour: unknown",
        "    - {name: a, model: m}\n    - {name: a, model: n}": (
            "spec.yaml: flockctl.groups: two groups named 'a'"
        ),
        "    - {name: a, model: m}\n    - {name: b, model: m}": "two groups serve model 'm'",
        "    - {name: a, model: m, min_workers: 3, max_workers: 2}": (
            "spec.yaml: flockctl.groups.0.min_workers: 3 is larger than max_workers (2)"
        ),
        "    - {name: a, worker_command: 'server'}": (
            "spec.yaml: flockctl.groups.0.worker_command: group 'a' must contain {port}"
        ),
        "    - {name: a, model: m, max_workers: 40}\n    - {name: b, model: n, max_workers: 40}": (
            "above the workers ceiling (64"
        ),
    }
    for groups, said in bad.items():
        path = tmp_path / "spec.yaml"
        path.write_text(f"flockctl:\n  groups:\n{groups}\n")
        with pytest.raises(ConfigError) as info:
            resolve(path)
        assert said in str(info.value), (groups, str(info.value))
    path.write_text("flockctl:\n  model: demo\n  groups:\n    - {name: a, model: m}\n")
    with pytest.raises(ConfigError, match="model: with groups, each group says what"):
        resolve(path)


def test_a_group_takes_the_deployments_settings_it_does_not_set(tmp_path):
    cfg = spec_config(tmp_path)
    small, tools = (cfg.group_config(g) for g in cfg.groups)
    assert (small.min_workers, small.max_workers, small.autoscale_up) == (0, 3, 1)
    assert (tools.min_workers, tools.max_workers, tools.downscale_delay) == (1, 2, 30)
    assert cfg.initial_target() == 1
    # Every engine on this machine shares its cores: up to 5 workers in all.
    assert small.threads_per_engine() == cfg.threads_per_engine()
    # The dry run shows one line per group.
    text = render_plan(plan(cfg))
    assert "group small" in text and "alpha: qlrm, start 0, min 0, max 3" in text
    assert "group tools" in text and "server --port {port}: qlrm, start 1, min 1, max 2" in text
    # The deployment's workers are its groups' together: 0 + 1 to start, at most 3 + 2.
    assert plan(cfg)["workers"] == {"initial": 1, "min": 1, "max": 5}


def test_the_dry_run_of_static_groups_counts_their_endpoints(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "flockctl:\n  groups:\n"
        "    - {name: a, model: m, endpoints: ['http://127.0.0.1:1', 'http://127.0.0.1:2']}\n"
        "    - {name: b, endpoints: ['http://127.0.0.1:3']}\n"
    )
    resolved = plan(resolve(path))
    # As for a static deployment without groups: a fixed fleet of one worker per endpoint.
    assert resolved["workers"] == {"initial": 3, "min": 0, "max": 3}
    assert [(g["name"], g["initial"]) for g in resolved["groups"]] == [("a", 2), ("b", 1)]


async def test_status_shows_each_workers_group_and_a_line_per_group(grouped):
    groups, pool, clock = grouped()
    step(groups, clock)
    await ready(pool, "w1", "toolbox")
    snap: Any = {
        "schema": 2,
        "generated_at": time.time(),
        "deployment": {
            "name": "default",
            "endpoint": "http://127.0.0.1:3000",
            "provisioner": "local",
            "policy": "least-connection",
            "started_at": time.time(),
        },
        "autoscaler": None,
        "groups": groups.views(),
        "workers": [w.to_dict() for w in pool],
        "requests": {
            "total": 0,
            "in_flight": 0,
            "queued": 0,
            "failed": 0,
            "retried": 0,
            "rate": 0.0,
        },
        "ready_workers": 1,
    }
    console = status_console(wide=True)
    with console.capture() as captured:
        console.print(status_view(snap))
    text = captured.get()
    assert "group small  alpha  qlrm target 0 (min 0, max 3)  0/0 ready" in text
    assert "group tools  toolbox  qlrm target 1 (min 1, max 2)  1/1 ready" in text
    header = next(line for line in text.splitlines() if line.startswith("ID"))
    assert header.split()[:4] == ["ID", "GROUP", "VER", "STATE"]
    row = next(line for line in text.splitlines() if line.startswith("w1 "))
    assert row.split()[1] == "tools"


async def test_each_group_counts_the_requests_that_arrived_for_it(grouped):
    groups, pool, clock = grouped()
    step(groups, clock)
    await ready(pool, "w1", "toolbox")
    small_worker = groups.controllers[0].add_worker()
    await ready(pool, small_worker.id, "alpha")
    for model in ("alpha", "alpha", "toolbox", None):
        worker = await pool.acquire(1.0, meta=RequestMeta(model=model))
        pool.release(worker)
    # The first group also takes what names no model.
    assert (groups.arrived("small"), groups.arrived("tools")) == (3, 1)
    small, tools = groups.controllers
    assert (small.observe().arrived, tools.observe().arrived) == (3, 1)


async def test_the_dashboard_shows_each_workers_group_and_a_line_per_group():
    from dashboard_data import SIZE, snapshot
    from textual.app import App, ComposeResult

    from flockctl.tui.widgets import AutoscalerPanel, WorkersTable

    class Overview(App[None]):
        def compose(self) -> ComposeResult:
            yield WorkersTable(id="workers")
            yield AutoscalerPanel("")

    snap = snapshot()
    snap["workers"][0]["group"] = "chat"
    decision = {"at": 2.0, "target": 1, "reason": "qlrm 0.00 within [4, 7]: holding 1"}
    snap["groups"] = [
        {
            "name": "chat",
            "model": "alpha",
            "models": ["alpha"],
            "policy": "qlrm",
            "target": 1,
            "min_workers": 1,
            "max_workers": 3,
            "queued": 2,
            "in_flight": 1,
            "live": 1,
            "ready": 1,
            "last_decision": decision,
            "launch_blocked": None,
        }
    ]
    app = Overview()
    async with app.run_test(size=SIZE) as pilot:
        workers, panel = app.query_one(WorkersTable), app.query_one(AutoscalerPanel)
        workers.show(snap)
        panel.show(snap)
        await pilot.pause()
        assert workers.cell("w10", "WORKER") == "w10 · chat"
        assert workers.cell("w2", "WORKER") == "w2"  # a worker of no group shows as before
        text = str(panel.render())
        assert "group chat (alpha): qlrm target 1 / ready 1  (bounds 1-3)  queued 2" in text
        assert "holding 1" in text.splitlines()[-1]


# -- static and SkyPilot groups ----------------------------------------------------------------

CHAT = "/v1/chat/completions"


async def test_static_groups_each_get_their_own_endpoints_and_requests_for_their_model(
    daemon, upstream, http
):
    from fake_worker import build_app

    alphas = [await upstream(build_app(f"a{i}", 4, 0.0, None, model="alpha")) for i in (1, 2)]
    beta = await upstream(build_app("b1", 4, 0.0, None, model="beta"))
    groups = [
        {"name": "chat", "model": "alpha", "endpoints": [u.url for u in alphas]},
        {"name": "code", "endpoints": [beta.url]},
    ]
    d = await daemon(groups=groups)
    assert d.deployment.cfg.provisioner == "static"  # told by the groups' endpoints
    await d.wait_ready(3)
    pool = d.deployment.pool
    assert {w.url: w.group for w in pool} == {
        alphas[0].url: "chat",
        alphas[1].url: "chat",
        beta.url: "code",
    }
    await until(lambda: pool.routes_by_model, "the workers' models known")
    for model, served_by in (("alpha", {"a1", "a2"}), ("beta", {"b1"})):
        seen = set()
        for _ in range(4):
            async with http.post(f"{d.url}{CHAT}", json={"model": model}) as resp:
                assert resp.status == 200
                seen.add(resp.headers["x-worker-id"])
        assert seen == served_by, model
    # Each group is as large as its endpoint list, and stays so.
    views = {v["name"]: v for v in d.deployment.snapshot()["groups"]}
    assert (views["chat"]["target"], views["chat"]["ready"]) == (2, 2)
    assert (views["code"]["target"], views["code"]["ready"]) == (1, 1)
    assert views["code"]["models"] == ["beta"]
    # A URL added at run time is a worker of the first group.
    extra = await upstream(build_app("a3", 4, 0.0, None, model="alpha"))
    async with http.post(f"{d.url}/-/workers", json={"url": extra.url}, headers=d.admin) as resp:
        assert resp.status == 201, await resp.text()
        added = (await resp.json())["id"]
    await d.wait_ready(4)
    worker = pool.get(added)
    assert worker is not None and (worker.url, worker.group) == (extra.url, "chat")


def test_static_and_skypilot_groups_are_checked_naming_the_field(tmp_path):
    run = "run: serve --port 8000\nresources: {ports: 8000}\n"
    bad = {
        "  groups:\n    - {name: a, endpoints: ['http://127.0.0.1:1']}\n"
        "    - {name: b, model: m}\n": (
            "flockctl.groups.1.model: group 'b' gives local workers, but this deployment's"
            " provisioner is static"
        ),
        "  groups:\n    - {name: a, endpoints: ['http://127.0.0.1:1'], max_workers: 3}\n": (
            "flockctl.groups.0.max_workers: group 'a' has one worker per endpoint"
        ),
        "  groups:\n    - {name: a, endpoints: ['http://127.0.0.1:1']}\n"
        "    - {name: b, endpoints: ['http://127.0.0.1:1/']}\n": (
            "flockctl.groups.1.endpoints: http://127.0.0.1:1/ is in groups 'a' and 'b'"
        ),
        "  groups:\n    - {name: a, endpoints: ['127.0.0.1:1']}\n": (
            "flockctl.groups.0.endpoints: '127.0.0.1:1' is not an http:// or https:// URL"
        ),
        "  groups:\n    - {name: a, endpoints: ['http://127.0.0.1:1'], task: {run: x}}\n": (
            "flockctl.groups.0.task: group 'a' gives endpoints and task"
        ),
        "  endpoints: ['http://127.0.0.1:1']\n  groups:\n"
        "    - {name: a, endpoints: ['http://127.0.0.1:2']}\n": (
            "flockctl.endpoints: with groups, each static group lists its own endpoints"
        ),
        "  groups:\n    - {name: a, task: {colour: red, run: x}}\n": (
            "flockctl.groups.0.task: 'colour' is not a SkyPilot task field"
        ),
        "  groups:\n    - {name: a, task: {resources: {ports: 8000}}}\n": (
            "flockctl.groups.0.task.run: group 'a' has no run: section"
        ),
        "  groups:\n    - {name: a, task: {run: x, resources: {ports: [8000, 8001]}}}\n": (
            "flockctl.groups.0.task.resources.ports: give the one port group 'a'"
        ),
    }
    for text, said in bad.items():
        path = tmp_path / "spec.yaml"
        path.write_text(f"flockctl:\n{text}")
        with pytest.raises(ConfigError) as info:
            resolve(path)
        assert f"spec.yaml: {said}" in str(info.value), (text, str(info.value))
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"{run}resources: {{ports: 8000, use_spot: true}}\nflockctl:\n"
        "  base_ondemand_fallback_replicas: 1\n  groups:\n    - {name: a, task: {envs: {A: b}}}\n"
    )
    with pytest.raises(ConfigError, match="on-demand fallback is not available with worker groups"):
        resolve(path)


def test_a_skypilot_group_runs_its_own_task_over_the_specs(tmp_path):
    cfg = spec_config(
        tmp_path,
        "run: serve --port 8000\nresources: {ports: 8000, cloud: aws}\nenvs: {A: '1'}\n"
        "flockctl:\n  min_workers: 0\n  groups:\n"
        "    - {name: small, model: alpha, task: {resources: {ports: 8000, accelerators: L4}}}\n"
        "    - name: big\n      model: beta\n      min_workers: 1\n"
        "      task: {resources: {ports: 9000, accelerators: A100}, run: big --port 9000}\n",
    )
    assert cfg.provisioner == "skypilot"
    small, big = (cfg.group_config(g) for g in cfg.groups)
    # resources and envs add to the SPEC's; run replaces it.
    assert small.task == {
        "run": "serve --port 8000",
        "resources": {"ports": 8000, "cloud": "aws", "accelerators": "L4"},
        "envs": {"A": "1"},
    }
    assert (small.worker_port, big.worker_port) == (8000, 9000)
    assert big.task is not None and big.task["run"] == "big --port 9000"
    assert big.task["resources"] == {"ports": 9000, "cloud": "aws", "accelerators": "A100"}
    assert (small.model, small.local_command() is not None) == ("alpha", True)
    assert cfg.initial_target() == 1
