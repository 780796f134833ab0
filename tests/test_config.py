"""Resolving SPEC files and flags into one config; every error names its field and source."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import FAKE_WORKER

from flockctl.server.config import ConfigError, DeploymentConfig
from flockctl.server.deployment import make_provisioner
from flockctl.server.provisioners.local import argv_for
from flockctl.server.spec_file import resolve

CMD = "serve --port {port}"


def spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def problems(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve(*args, **kwargs)
    return info.value.problems


def test_defaults_follow_flockserve():
    cfg = resolve(flags={"worker_command": CMD})
    assert (cfg.port, cfg.host, cfg.policy, cfg.autoscaler) == (
        3000,
        "127.0.0.1",
        "least-connection",
        "qlrm",
    )
    assert (cfg.min_workers, cfg.max_workers, cfg.worker_capacity) == (1, 2, None)
    assert (cfg.autoscale_up, cfg.autoscale_down, cfg.queue_tracking_window) == (7, 4, 600)
    assert cfg.provisioner == "local" and cfg.initial_target() == 1


def test_skyserve_service_section_maps_onto_the_config(tmp_path):
    path = spec(
        tmp_path,
        f"""
service:
  readiness_probe:
    path: /v1/models
    initial_delay_seconds: 30
    timeout_seconds: 5
  replica_policy:
    min_replicas: 2
    max_replicas: 6
flockctl:
  worker_command: "{CMD}"
  worker_capacity: 8
resources:
  accelerators: A10G:1
run: vllm serve x
""",
    )
    cfg = resolve(path)
    assert cfg.probe.path == "/v1/models"
    assert cfg.probe.initial_delay_seconds == 30 and cfg.probe.timeout_seconds == 5
    assert (cfg.min_workers, cfg.max_workers, cfg.worker_capacity) == (2, 6, 8)


def test_readiness_probe_may_be_a_bare_path_and_replicas_means_fixed(tmp_path):
    path = spec(
        tmp_path,
        f"service:\n  readiness_probe: /ping\n  replicas: 3\n"
        f"flockctl:\n  worker_command: '{CMD}'\n",
    )
    cfg = resolve(path)
    assert cfg.probe.path == "/ping"
    assert cfg.autoscaler == "fixed" and cfg.initial_target() == 3


def test_flags_override_the_file(tmp_path):
    path = spec(tmp_path, f"flockctl:\n  worker_command: '{CMD}'\n  max_workers: 3\n  port: 8080\n")
    cfg = resolve(path, {"max_workers": 5, "port": None})
    assert cfg.max_workers == 5 and cfg.port == 8080


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "service:\n  replica_policy:\n    min_replicas: 1\n    target_qpx: 3\n",
            "service.replica_policy.target_qpx: unknown or unsupported field",
        ),
        ("service:\n  bogus: 1\n", "service.bogus: unknown or unsupported field"),
        ("flockctl:\n  worker_comand: x\n", "flockctl.worker_comand: unknown field"),
        (
            "flockctl:\n  worker_command: 'x {port}'\n  max_workers: lots\n",
            "flockctl.max_workers: Input should be a valid integer",
        ),
        (
            "flockctl:\n  worker_command: 'x {port}'\n  probe:\n    path: health\n",
            "path must start with '/'",
        ),
        (
            "service:\n  replicas: 2\n  replica_policy:\n    min_replicas: 1\n",
            "service.replicas: cannot be used together with service.replica_policy",
        ),
        (
            "service:\n  readiness_probe: {path: /h, post_data: '{bad'}\n",
            "service.readiness_probe.post_data: not valid JSON: Expecting property name",
        ),
        (
            "service:\n  readiness_probe: {timeout_seconds: 5}\n",
            "service.readiness_probe.path: required when readiness_probe is a mapping",
        ),
        ("service:\n  readiness_probe: [/h]\n", "service.readiness_probe: must be a path or a"),
        (
            "service:\n  readiness_probe: {path: /h, headers: {X-Id: 5}}\n",
            "service.readiness_probe.headers.X-Id: Input should be a valid string",
        ),
        ("service:\n  replica_policy: [1]\n", "service.replica_policy: must be a mapping"),
        (
            "service:\n  replica_policy: {min_replicas: lots}\n",
            "service.replica_policy.min_replicas: Input should be a valid integer",
        ),
        (
            "service:\n  replica_policy: {min_replicas: -1}\n",
            "service.replica_policy.min_replicas: Input should be greater than or equal to 0",
        ),
        ("service:\n  ports: 99999\n", "service.ports: Input should be less than or equal to"),
        ("service: [1]\n", "service: must be a mapping"),
        ("wat: 1\n", "wat: unknown top-level field"),
        ("flockctl: [1, 2]\n", "flockctl: must be a mapping"),
        ("flockctl:\n  policy: random\n  worker_command: 'x {port}'\n", "flockctl.policy: Input"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_spec_fields_are_named(tmp_path, text, expected):
    found = problems(spec(tmp_path, text))
    assert any(expected in p for p in found), found
    assert all(str(tmp_path) in p or p.startswith("flockctl.") for p in found)


def test_bad_flags_are_named_by_their_flag():
    found = problems(
        flags={"worker_command": CMD, "max_workers": 0}, flag_names={"max_workers": "--max-workers"}
    )
    assert found == ["--max-workers: Input should be greater than or equal to 1"]


def test_cross_field_problems():
    assert (
        "larger than max_workers"
        in problems(flags={"worker_command": CMD, "min_workers": 3, "max_workers": 2})[0]
    )
    assert "not an http" in problems(flags={"endpoints": ["localhost:8000"]})[0]


@pytest.mark.parametrize(
    "command", ["vllm serve x --port $PORT", "vllm serve x --port=${PORT}", "serve --port {port}"]
)
def test_a_worker_command_takes_its_port_as_port_or_from_the_environment(command):
    assert resolve(flags={"worker_command": command}).worker_command == command


@pytest.mark.parametrize("command", ["vllm serve x", "serve --port $PORTS", "serve ${PORT_X}"])
def test_a_worker_command_that_ignores_its_port_is_refused_naming_both_ways(command):
    (problem,) = problems(flags={"worker_command": command}, flag_names={})
    assert problem.startswith("worker_command: must contain {port}, or read $PORT")


@pytest.mark.e2e
async def test_a_worker_reading_dollar_port_listens_where_it_is_probed(daemon):
    d = await daemon(worker_command=f"{sys.executable} {FAKE_WORKER} --port $PORT")
    await d.wait_ready(1)


def test_missing_spec_file(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_endpoints_alone_mean_static():
    cfg = resolve(flags={"endpoints": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]})
    assert cfg.provisioner == "static" and cfg.initial_target() == 2
    assert cfg.model is None and cfg.local_command() is None


def engine_argv(model: str) -> list[str]:
    return [sys.executable, "-m", "flockctl", "engine", "serve", "--model", model]


def worker_argv(cfg: DeploymentConfig) -> list[str]:
    command = cfg.local_command()
    assert command is not None
    return argv_for(command.replace("{port}", "8123"))


ENGINE_TAIL = ["--host", "127.0.0.1", "--port", "8123"]


def threads_flags(cfg) -> list[str]:
    """The ``--threads`` (and ``--fused-threads``, where two) that ``up`` gives its engines."""
    fused = cfg.fused_threads_per_engine()
    return ["--threads", str(cfg.threads_per_engine())] + (
        ["--fused-threads", str(fused)] if fused > 1 else []
    )


def test_without_a_worker_command_or_endpoints_workers_run_the_demo_model():
    cfg = resolve(flags={})
    assert cfg.provisioner == "local" and cfg.model == "demo" and cfg.worker_command is None
    assert worker_argv(cfg) == [*engine_argv("demo"), *ENGINE_TAIL, *threads_flags(cfg)]
    assert cfg.probe.path == "/health"  # the engine answers it once the model is loaded


def test_local_engines_split_the_cores_between_them(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    # each engine's share of the cores, less the one its serving side keeps
    assert resolve(flags={"max_workers": 4}).threads_per_engine() == 3
    assert resolve(flags={"max_workers": 8}).threads_per_engine() == 1
    assert resolve(flags={"max_workers": 32}).threads_per_engine() == 1
    fixed = resolve(flags={"autoscaler": "fixed", "replicas": 2, "max_workers": 8})
    assert fixed.threads_per_engine() == 7
    # the user's own --threads wins
    cfg = resolve(flags={"max_workers": 4, "engine_args": "--threads=3"})
    assert worker_argv(cfg)[-1] == "--threads=3" and worker_argv(cfg).count("--threads") == 0


@pytest.mark.parametrize(
    ("cores", "flags", "fused"),
    [
        (2, {"autoscaler": "fixed", "replicas": 1}, ["--fused-threads", "2"]),  # two cores its own
        (2, {"max_workers": 2}, []),  # a core each
        (4, {"max_workers": 2}, ["--fused-threads", "2"]),
        (16, {"max_workers": 2}, []),  # torch on 7 threads: no fused forward to split
        (2, {"autoscaler": "fixed", "replicas": 1, "engine_args": "--threads 1"}, []),
        (2, {"autoscaler": "fixed", "replicas": 1, "engine_args": "--fused-threads 1"}, []),
    ],
)
def test_an_engine_with_two_cores_to_itself_splits_its_fused_forward(
    monkeypatch, cores, flags, fused
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    argv = worker_argv(resolve(flags=flags))
    given = "--fused-threads" in flags.get("engine_args", "")  # the user's own wins
    assert argv.count("--fused-threads") == int(given) + int(bool(fused))
    if fused:
        assert argv[-2:] == fused


def test_model_and_engine_args_become_the_worker_command(tmp_path):
    cfg = resolve(flags={"model": "/models/my llama", "engine_args": "--scheduler fcfs --x 'a b'"})
    assert worker_argv(cfg) == [
        *engine_argv("/models/my llama"),
        *ENGINE_TAIL,
        "--scheduler",
        "fcfs",
        "--x",
        "a b",
        *threads_flags(cfg),
    ]
    path = spec(tmp_path, "flockctl:\n  model: Qwen/Qwen2.5-0.5B\n  engine_args: [--device, cpu]\n")
    cfg = resolve(path)
    assert worker_argv(cfg) == [
        *engine_argv("Qwen/Qwen2.5-0.5B"),
        *ENGINE_TAIL,
        "--device",
        "cpu",
        *threads_flags(cfg),
    ]
    # The daemon re-reads the resolved config from config.json: the same command comes out.
    again = DeploymentConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.local_command() == cfg.local_command()
    assert make_provisioner(again, tmp_path).command == cfg.local_command()


def test_model_and_worker_command_together_are_refused_naming_both(tmp_path):
    found = problems(
        flags={"model": "demo", "worker_command": CMD},
        flag_names={"model": "--model", "worker_command": "--worker-command"},
    )
    assert len(found) == 1
    assert found[0].startswith("--model and --worker-command cannot be used together")
    path = spec(tmp_path, f"flockctl:\n  model: demo\n  worker_command: '{CMD}'\n")
    (found,) = problems(path)
    assert f"{path}: flockctl.model and {path}: flockctl.worker_command cannot be used" in found
    with pytest.raises(ValueError, match="model and worker_command cannot be used together"):
        DeploymentConfig(model="demo", worker_command=CMD)


def test_a_flag_for_what_runs_overrides_the_files_other_answer(tmp_path):
    path = spec(tmp_path, f"flockctl:\n  worker_command: '{CMD}'\n")
    cfg = resolve(path, {"model": "demo"})
    assert cfg.worker_command is None and cfg.model == "demo"
    path = spec(tmp_path, "flockctl:\n  model: demo\n  engine_args: [--device, cpu]\n")
    cfg = resolve(path, {"worker_command": CMD})
    assert cfg.local_command() == CMD and cfg.model is None and cfg.engine_args == []


def test_engine_args_and_model_need_the_engine():
    assert (
        "engine_args: only flockctl's engine"
        in problems(flags={"worker_command": CMD, "engine_args": "--scheduler fcfs"})[0]
    )
    assert "cannot split" in problems(flags={"engine_args": "'unclosed"})[0]
    static = {"provisioner": "static", "endpoints": ["http://h:1"], "model": "demo"}
    assert "model: the static provisioner" in problems(flags=static)[0]


def test_draft_models_become_engine_flags_and_need_the_engine(tmp_path):
    cfg = resolve(flags={"model": "demo", "draft_models": ["demo", "/drafts/small one"]})
    argv = worker_argv(cfg)
    assert argv[len(engine_argv("demo")) + len(ENGINE_TAIL) :][:4] == [
        "--draft-model",
        "demo",
        "--draft-model",
        "/drafts/small one",
    ]
    path = spec(tmp_path, "flockctl:\n  model: demo\n  draft_models: [demo]\n")
    assert "--draft-model" in worker_argv(resolve(path))
    assert "--draft-model" not in (resolve(path, {"worker_command": CMD}).local_command() or "")
    assert (
        "draft_models: only flockctl's engine"
        in problems(flags={"worker_command": CMD, "draft_models": ["demo"]})[0]
    )


# up's flags that are not config fields, and those named apart from the field they set.
UP_ONLY = {"spec", "foreground", "wait", "timeout", "watch", "dry_run", "as_json"}
UP_FIELD = {
    "draft_model": "draft_models",
    "endpoint": "endpoints",
    "readiness_path": "probe.path",
    "initial_delay": "probe.initial_delay_seconds",
    "probe_interval": "probe.interval_seconds",
    "probe_timeout": "probe.timeout_seconds",
    "failure_threshold": "probe.failure_threshold",
}


def test_up_flags_set_config_fields_and_state_their_defaults():
    """Each of up's flags sets a config field, and a number its help gives as the default is
    that field's default: the flags and the config cannot drift apart unnoticed."""
    import re

    from typer.main import get_command

    from flockctl.cli import app
    from flockctl.server.config import ProbeConfig

    up = get_command(app).commands["up"]  # type: ignore[attr-defined]
    checked = 0
    for param in up.params:
        if param.name in UP_ONLY:
            continue
        path = UP_FIELD.get(param.name, param.name).split(".")
        model = ProbeConfig if path[0] == "probe" else DeploymentConfig
        field = model.model_fields.get(path[-1])
        assert field is not None, f"--{param.name} sets no config field {'.'.join(path)}"
        stated = re.search(r"\[default: ([0-9]+(?:\.[0-9]+)?)\]", param.help or "")
        if stated is not None:
            assert float(stated.group(1)) == field.default, f"--{param.name}: {stated.group(0)}"
            checked += 1
    assert checked >= 20
