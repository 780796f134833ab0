"""SkyServe service YAML: what SkyPilot parses and what `flockctl up --dry-run` plans agree.

The examples and hand-written service files are parsed by the real SkyPilot (offline) and by
flockctl; every field must land in the plan, and every field flockctl cannot honour is refused
with one line that names it. Nothing here launches anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from flockctl.cli import app
from flockctl.server.controller import Controller
from flockctl.server.deployment import make_autoscaler, make_spot_plan
from flockctl.server.policies import make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.provisioners import Provisioner
from flockctl.server.provisioners.skypilot import cluster_name
from flockctl.server.spec_file import resolve
from flockctl.server.workers import Worker
from flockctl.state import state_dir

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
#: A SkyPilot task that serves on port 8000; each test adds its own service: section.
TASK = """
run: serve --port 8000
resources:
  cpus: 2
  ports: 8000
"""


@pytest.fixture(autouse=True)
def sky_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `import sky` writes ~/.sky at once: never the user's own.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")


def spec(tmp_path: Path, text: str, name: str = "service.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def up(*args: Any) -> Result:
    return CliRunner().invoke(app, ["up", *map(str, args), "--dry-run"])


def plan(*args: Any) -> dict[str, Any]:
    result = up(*args, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def refused(path: Path) -> str:
    """The one diagnostic line of a refused SPEC (exit 2, nothing on stdout)."""
    result = up(path, "--json")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def sky_task(path: Path) -> Any:
    import sky

    return sky.Task.from_yaml(str(path))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_plans_what_skypilot_parses(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sky.serve import constants

    monkeypatch.chdir(EXAMPLES.parent)  # as the examples say: run from the repository root
    task = sky_task(path)
    service = task.service
    got = plan(path)
    assert got["provisioner"] == "skypilot"
    lowest = service.min_replicas
    assert got["workers"]["initial"] == lowest
    scaler = got["autoscaler"]
    if service.target_qps_per_replica is not None:
        assert (got["workers"]["min"], got["workers"]["max"]) == (lowest, service.max_replicas)
        assert scaler["policy"] == "request-rate"
        assert scaler["thresholds"] == {
            "target_qps_per_replica": service.target_qps_per_replica,
            "upscale_delay": service.upscale_delay_seconds
            or constants.AUTOSCALER_DEFAULT_UPSCALE_DELAY_SECONDS,
            "downscale_delay": service.downscale_delay_seconds
            or constants.AUTOSCALER_DEFAULT_DOWNSCALE_DELAY_SECONDS,
            "qps_window": constants.AUTOSCALER_QPS_WINDOW_SIZE_SECONDS,
        }
    else:  # replicas: N; its min/max are in test_replicas_is_a_fixed_number
        assert service.max_replicas is None
        assert scaler == {"policy": "fixed", "thresholds": {"replicas": lowest}}
    probe = got["probe"]
    assert probe["path"] == service.readiness_path
    assert probe["post_data"] == service.post_data
    assert probe["headers"] == (service.readiness_headers or {})
    assert probe["initial_delay_seconds"] == service.initial_delay_seconds
    assert probe["timeout_seconds"] == service.readiness_timeout_seconds
    lb = {"least_load": "least-connection", "round_robin": "round-robin"}
    assert got["balancer"]["policy"] == lb[service.load_balancing_policy]
    worker = got["worker"]
    assert worker["port"] == int(service.ports)
    assert worker["resources"]
    assert worker["use_spot"] == any(r.use_spot for r in task.resources)
    assert not state_dir("default").exists()


def test_there_are_four_examples() -> None:
    assert len(list(EXAMPLES.glob("*.yaml"))) == 4


FULL = """
envs:
  MODEL_ID: my-org/my-model
resources:
  accelerators: L4:1
  use_spot: true
run: serve --port 8081
service:
  ports: 8081
  readiness_probe:
    path: /v1/completions
    post_data:
      model: $MODEL_ID
      prompt: hi
      max_tokens: 1
    initial_delay_seconds: 600
    timeout_seconds: 20
    headers:
      Authorization: Bearer probe-token
  replica_policy:
    min_replicas: 2
    max_replicas: 5
    target_qps_per_replica: 3.5
    upscale_delay_seconds: 45
    downscale_delay_seconds: 90
    base_ondemand_fallback_replicas: 1
    dynamic_ondemand_fallback: true
  load_balancing_policy: round_robin
"""


def test_every_service_field_lands_in_the_plan(tmp_path: Path) -> None:
    path = spec(tmp_path, FULL)
    service = sky_task(path).service
    # SkyPilot takes every field (and fills $MODEL_ID in too): this is a valid SkyServe file.
    assert service.post_data["model"] == "my-org/my-model"
    assert service.readiness_headers == {"Authorization": "Bearer probe-token"}
    assert (service.min_replicas, service.max_replicas, service.target_qps_per_replica) == (
        2,
        5,
        3.5,
    )
    assert (service.upscale_delay_seconds, service.downscale_delay_seconds) == (45, 90)
    assert (service.base_ondemand_fallback_replicas, service.dynamic_ondemand_fallback) == (1, True)
    assert (service.load_balancing_policy, service.ports) == ("round_robin", "8081")
    got = plan(path)
    assert got["probe"] == {
        "path": "/v1/completions",
        "post_data": {"model": "my-org/my-model", "prompt": "hi", "max_tokens": 1},
        "headers": {"Authorization": "Bearer probe-token"},
        "initial_delay_seconds": 600,
        "timeout_seconds": 20,
        "interval_seconds": 2,
        "failure_threshold": 3,
    }
    assert got["workers"] == {"initial": 2, "min": 2, "max": 5}
    assert got["autoscaler"] == {
        "policy": "request-rate",
        "thresholds": {
            "target_qps_per_replica": 3.5,
            "upscale_delay": 45,
            "downscale_delay": 90,
            "qps_window": 60,
        },
    }
    assert got["balancer"]["policy"] == "round-robin"
    worker = got["worker"]
    assert worker["port"] == 8081
    assert worker["use_spot"] is True
    assert worker["base_ondemand_fallback_replicas"] == 1
    assert worker["dynamic_ondemand_fallback"] is True


@pytest.mark.parametrize(
    ("written", "policy"),
    [
        ("least_load", "least-connection"),
        ("round_robin", "round-robin"),
        ("ROUND_ROBIN", "round-robin"),  # flockctl ignores case; SkyPilot 0.14.1 refuses this
    ],
)
def test_load_balancing_policy_names(tmp_path: Path, written: str, policy: str) -> None:
    path = spec(tmp_path, TASK + f"service:\n  load_balancing_policy: {written}\n")
    assert plan(path)["balancer"]["policy"] == policy


def test_readiness_probe_as_a_string_or_absent(tmp_path: Path) -> None:
    as_string = spec(tmp_path, TASK + "service:\n  readiness_probe: /ready\n")
    assert sky_task(as_string).service.readiness_path == "/ready"
    assert plan(as_string)["probe"]["path"] == "/ready"
    absent = spec(tmp_path, TASK + "service:\n  replicas: 1\n")
    assert sky_task(absent).service.readiness_path == "/"
    assert plan(absent)["probe"]["path"] == "/"


def test_target_qps_alone_gets_skyserves_delays(tmp_path: Path) -> None:
    path = spec(
        tmp_path,
        TASK + "service:\n  replica_policy: {min_replicas: 1, max_replicas: 3,"
        " target_qps_per_replica: 2}\n",
    )
    thresholds = plan(path)["autoscaler"]["thresholds"]
    assert (thresholds["upscale_delay"], thresholds["downscale_delay"]) == (300, 1200)


@pytest.mark.parametrize("source", ["replicas: 1", "replicas: 3", "tgi.yaml"])
def test_replicas_is_a_fixed_number(tmp_path: Path, source: str) -> None:
    if source.endswith(".yaml"):
        path = EXAMPLES / source
        n = sky_task(path).service.min_replicas
    else:
        path = spec(tmp_path, TASK + f"service:\n  {source}\n")
        n = int(source.split()[1])
    got = plan(path)
    assert got["autoscaler"] == {"policy": "fixed", "thresholds": {"replicas": n}}
    assert got["workers"] == {"initial": n, "min": n, "max": n}


@pytest.mark.parametrize(
    ("service", "field"),
    [
        ("tls: {keyfile: k.pem}", "service.tls"),
        ("bogus: 1", "service.bogus"),
        ("readiness_probe: {path: /health, bogus: 1}", "service.readiness_probe.bogus"),
        (
            "replica_policy: {min_replicas: 1, num_overprovision: 1}",
            "service.replica_policy.num_overprovision",
        ),
        (
            "replica_policy: {min_replicas: 1, target_qps_per_replica: {L4: 2}}",
            "service.replica_policy.target_qps_per_replica",
        ),
        ("load_balancing_policy: instance_aware_least_load", "service.load_balancing_policy"),
        ("replicas: 2, replica_policy: {min_replicas: 1}", "service.replicas"),
        (
            "replica_policy: {min_replicas: 1, base_ondemand_fallback_replicas: 1}",
            "base_ondemand_fallback_replicas",
        ),
        (
            "replica_policy: {min_replicas: 1, dynamic_ondemand_fallback: true}",
            "dynamic_ondemand_fallback",
        ),
    ],
)
def test_unsupported_service_fields_are_refused_by_name(
    tmp_path: Path, service: str, field: str
) -> None:
    line = refused(spec(tmp_path, TASK + f"service: {{{service}}}\n"))
    assert field in line


def test_fallback_needs_spot(tmp_path: Path) -> None:
    text = TASK + "service:\n  replica_policy: {min_replicas: 1, dynamic_ondemand_fallback: true}\n"
    assert "resources.use_spot: true" in refused(spec(tmp_path, text))
    spot = text.replace("ports: 8000", "ports: 8000\n  use_spot: true")
    assert plan(spec(tmp_path, spot, "spot.yaml"))["worker"]["dynamic_ondemand_fallback"] is True


def test_a_task_without_run_or_port_is_refused(tmp_path: Path) -> None:
    no_run = spec(tmp_path, "resources: {ports: 8000}\nservice: {replicas: 1}\n")
    assert refused(no_run).startswith("flockctl: run: ")
    no_port = spec(tmp_path, "run: serve\nresources: {cpus: 2}\nservice: {replicas: 1}\n")
    assert "service.ports" in refused(no_port)


@pytest.mark.parametrize(
    "bad", ["resources: {accelerators: 12, ports: 8000}", "num_nodes: -1\nresources: {ports: 8000}"]
)
def test_a_task_skypilot_refuses_is_refused(tmp_path: Path, bad: str) -> None:
    path = spec(tmp_path, f"run: serve\n{bad}\n")
    with pytest.raises(Exception):  # noqa: B017 - SkyPilot's own error types vary
        sky_task(path)
    assert f"{path}: SkyPilot refused the task: " in refused(path)


def test_provisioner_defaults_to_skypilot_for_a_task(tmp_path: Path) -> None:
    path = spec(tmp_path, TASK)
    got = plan(path)
    assert got["provisioner"] == "skypilot" and got["worker"]["port"] == 8000
    assert got["autoscaler"]["policy"] == "qlrm"
    local = plan(path, "--provisioner", "local", "--model", "demo")
    assert local["provisioner"] == "local"
    assert "engine serve --model demo" in local["worker"]["command"]


@pytest.mark.parametrize(
    ("flag", "policy", "thresholds"),
    [
        ("--target-qps-per-replica", "request-rate", {"target_qps_per_replica": 2}),
        ("--replicas", "fixed", {"replicas": 2}),
    ],
)
def test_autoscaler_flags_select_their_policy(
    tmp_path: Path, flag: str, policy: str, thresholds: dict[str, float]
) -> None:
    scaler = plan(spec(tmp_path, TASK), flag, "2")["autoscaler"]
    assert scaler["policy"] == policy
    assert thresholds.items() <= scaler["thresholds"].items()


def test_human_dry_run_says_nothing_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(EXAMPLES.parent)
    result = up(EXAMPLES / "engine-gpu.yaml")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "dry run: nothing was started" in out
    assert "provisioner  skypilot" in out
    assert "autoscaler   request-rate: target_qps_per_replica 4" in out
    assert "resources    <Cloud>([Spot], {'L4': 1}, ports=['8000'])" in out
    # base_ondemand_fallback_replicas: 1 and one worker to start: that one is on-demand.
    assert "  w1           flockctl-default-w1, on-demand\n" in out
    assert not state_dir("default").exists()


class HeldLaunches(Provisioner):
    """A SkyPilot provisioner whose launches never finish: the workers stay as the controller
    asked for them. As the real one, a worker not told spot or on-demand gets the task's kind."""

    name = "skypilot"

    def __init__(self, spot: bool, spot_plan: Any) -> None:
        self.spot = spot
        self.spot_plan = spot_plan

    async def launch(self, worker: Worker) -> None:
        if worker.spot is None:
            worker.spot = self.spot
        await asyncio.Event().wait()

    async def terminate(self, worker: Worker) -> None:
        return None


async def controller_launches(path: Path) -> list[dict[str, Any]]:
    """The workers the real controller launches first for the SPEC at ``path``."""
    cfg = resolve(path, {"workdir": str(ROOT)})
    pool = WorkerPool(make_policy(cfg.policy), cfg.worker_capacity, cfg.max_queue)
    provisioner = HeldLaunches(cfg.uses_spot(), make_spot_plan(cfg))
    policy = make_autoscaler(cfg)
    # No prober: no launch finishes, so no worker is ever probed.
    controller = Controller(pool, provisioner, policy, None, cfg.initial_target())
    controller.step(1000.0)
    await asyncio.sleep(0)  # each launch starts
    launched = [{"id": w.id, "cluster": cluster_name(cfg.name, w.id), "spot": w.spot} for w in pool]
    await controller.stop(drain=False)
    return launched


SPOT_TASK = TASK.replace("ports: 8000", "ports: 8000\n  use_spot: true")


@pytest.mark.parametrize(
    ("source", "kinds"),
    [
        ("engine-gpu.yaml", [False]),
        (
            SPOT_TASK + "service:\n  replica_policy: {min_replicas: 3, max_replicas: 4,"
            " base_ondemand_fallback_replicas: 1}\n",
            [True, True, False],
        ),
        (
            SPOT_TASK + "service:\n  replica_policy: {min_replicas: 2, max_replicas: 4,"
            " dynamic_ondemand_fallback: true}\n",
            [True, True, False, False],
        ),
        (SPOT_TASK + "service:\n  replicas: 2\n", [True, True]),
        (TASK + "service:\n  replicas: 2\n", [False, False]),
    ],
    ids=["engine-gpu", "base-fallback", "dynamic-fallback", "spot-only", "on-demand-only"],
)
async def test_dry_run_labels_each_worker_as_the_controller_launches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, kinds: list[bool]
) -> None:
    monkeypatch.chdir(ROOT)
    path = EXAMPLES / source if source.endswith(".yaml") else spec(tmp_path, source)
    planned = plan(path)["worker"]["launches"]
    assert [launch["spot"] for launch in planned] == kinds
    assert planned == await controller_launches(path)


#: Stands in for a machine without the sky extra: ``import sky`` fails as it would there.
NO_SKY = "raise ImportError(\"No module named 'sky'\")\n"


def dry_run_without_sky(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    hidden = tmp_path / "no-sky"
    (hidden / "sky").mkdir(parents=True, exist_ok=True)
    (hidden / "sky" / "__init__.py").write_text(NO_SKY)
    path = os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "flockctl", "up", *args, "--dry-run"],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "provisioner"),
    [
        (["--worker-command", "serve --port {port}"], "local"),
        (["SPEC"], "local"),
        (["examples/vllm.yaml", "--provisioner", "local", "--model", "demo"], "local"),
        (["--endpoint", "http://10.0.0.5:8000"], "static"),
    ],
    ids=["worker-command", "local-spec", "task-run-locally", "endpoints"],
)
def test_a_local_or_static_dry_run_needs_no_skypilot(
    tmp_path: Path, args: list[str], provisioner: str
) -> None:
    local = spec(tmp_path, "service: {replicas: 2}\nflockctl: {worker_command: 'serve {port}'}\n")
    result = dry_run_without_sky(tmp_path, *(str(local) if a == "SPEC" else a for a in args))
    assert result.returncode == 0, result.stderr
    assert f"provisioner  {provisioner}\n" in result.stdout


@pytest.mark.e2e
def test_a_skypilot_dry_run_without_skypilot_names_readmes_install_command(
    tmp_path: Path,
) -> None:
    result = dry_run_without_sky(tmp_path, "examples/vllm.yaml")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("flockctl: examples/vllm.yaml is a SkyPilot task: SkyPilot is not")
    found = re.search(r"install the sky extra with (.+)$", line)
    assert found is not None, line
    assert found.group(1) == 'pip install -e ".[sky]"'
    assert f"`{found.group(1)}`" in (ROOT / "README.md").read_text()
