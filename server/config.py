"""The deployment config: defaults, a SPEC YAML file, and flags, resolved into one validated model.

Precedence, lowest first: built-in defaults, the SPEC's SkyServe ``service:`` section, the SPEC's
``flockctl:`` section, command-line flags. Every error names where the bad value came from
(``spec.yaml: service.replica_policy.min_replicas``, ``--max-workers``), so the user can fix it
without guessing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flockctl.server.limits import parse_size

BALANCING_POLICIES = ("least-connection", "round-robin", "power-of-two")
AUTOSCALERS = ("qlrm", "request-rate", "fixed")
PROVISIONERS = ("local", "skypilot", "static")
#: SkyServe's load-balancing policy names and the balancer policy each one is here.
SKYSERVE_LB_POLICIES = {"least_load": "least-connection", "round_robin": "round-robin"}
#: SkyServe's defaults for the request-rate autoscaler's delays, used when a ``service:`` section
#: asks for ``target_qps_per_replica`` without them (flockctl's own defaults suit qlrm).
SKYSERVE_UPSCALE_DELAY = 300.0
SKYSERVE_DOWNSCALE_DELAY = 1200.0
#: The model a local deployment serves when it is given neither a worker command nor endpoints:
#: flockctl's engine builds it locally, so a deployment works offline out of the box.
DEFAULT_MODEL = "demo"
#: The two ways to say what a local worker runs; a deployment takes one of them.
_WHAT_RUNS = frozenset({"model", "worker_command"})
#: Environment variables that carry the deployment's keys (``--node-control-key``, ``--api-key``):
#: a local worker, which may be any third-party server, never gets them.
KEY_ENV_VARS = ("FLOCKCTL_NODE_CONTROL_KEY", "FLOCKCTL_API_KEY")
_ONE_OF_THEM = (
    "--model runs flockctl's engine on each worker, --worker-command runs any other server;"
    " give one of them"
)

# Top-level keys of a SkyPilot task YAML. They make the task each SkyPilot worker runs; the local
# and static provisioners do not use them.
SKYPILOT_TASK_KEYS = frozenset(
    {
        "name",
        "workdir",
        "num_nodes",
        "resources",
        "envs",
        "secrets",
        "file_mounts",
        "setup",
        "run",
        "config",
        "volumes",
        "event_callback",
        "inputs",
        "outputs",
    }
)


class ConfigError(ValueError):
    """A deployment config that cannot run; ``problems`` are one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProbeConfig(_Strict):
    """The readiness probe: SkyServe's ``readiness_probe`` fields, plus interval and threshold."""

    path: str = Field("/health", description="HTTP path probed on each worker")
    post_data: dict[str, Any] | None = Field(None, description="JSON body; makes the probe a POST")
    headers: dict[str, str] = Field(default_factory=dict)
    initial_delay_seconds: float = Field(
        1200.0, ge=0, description="how long a new worker may take to become READY"
    )
    timeout_seconds: float = Field(15.0, gt=0)
    interval_seconds: float = Field(2.0, gt=0)
    failure_threshold: int = Field(3, ge=1, description="consecutive failures before NOT_READY")

    @model_validator(mode="after")
    def _path_is_absolute(self) -> ProbeConfig:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        return self


def engine_command(model: str, engine_args: list[str] | tuple[str, ...] = ()) -> str:
    """The worker command that runs flockctl's engine serving ``model`` on ``{port}``.

    It runs with this interpreter (``sys.executable``), so the engine comes from the same
    installation as the daemon, and every part is quoted so a model path with spaces survives.
    """
    parts = [sys.executable, "-m", "flockctl", "engine", "serve", "--model", model]
    quoted = [shlex.quote(part) for part in parts]
    quoted += ["--host", "127.0.0.1", "--port", "{port}"]
    quoted += [shlex.quote(arg) for arg in engine_args]
    return " ".join(quoted)


class DeploymentConfig(_Strict):
    """Everything the daemon needs to run one deployment."""

    name: str = "default"
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    provisioner: Literal["local", "skypilot", "static"] | None = None
    worker_command: str | None = None
    model: str | None = Field(
        None,
        min_length=1,
        description="model flockctl's engine serves on each local worker (hub id, path or demo)",
    )
    engine_args: list[str] = Field(
        default_factory=list, description="extra flags for `flockctl engine serve`"
    )
    draft_models: list[str] = Field(
        default_factory=list,
        description="speculative draft models for the engine (each becomes --draft-model)",
    )
    workdir: str | None = Field(None, description="directory the worker command runs in")
    endpoints: list[str] = Field(default_factory=list)
    min_workers: int = Field(1, ge=0)
    max_workers: int = Field(2, ge=1)
    autoscaler: Literal["qlrm", "request-rate", "fixed"] = "qlrm"
    replicas: int | None = Field(None, ge=0)
    target_qps_per_replica: float | None = Field(
        None, gt=0, description="request-rate: requests per second one worker should take"
    )
    autoscale_up: float = Field(7.0, ge=0)
    autoscale_down: float = Field(4.0, ge=0)
    queue_tracking_window: float = Field(600.0, gt=0)
    upscale_delay: float = Field(30.0, ge=0)
    downscale_delay: float = Field(120.0, ge=0)
    policy: Literal["least-connection", "round-robin", "power-of-two"] = "least-connection"
    worker_capacity: int = Field(30, ge=1)
    queue_timeout: float = Field(60.0, gt=0)
    max_queue: int = Field(1000, ge=0)
    max_attempts: int = Field(3, ge=1, le=10)
    upstream_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds to wait for a worker's next byte, the first included (nginx's"
        " proxy_read_timeout)",
    )
    max_body_size: int = Field(
        32 << 20, ge=1, description="largest request body in bytes (32M, 512K, ...); larger: 413"
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a client has to send a request head; then 408"
    )
    max_connections: int = Field(
        10_000, ge=1, description="client connections held at once; more are answered 503"
    )
    drain_timeout: float = Field(30.0, ge=0)
    max_start_failures: int = Field(3, ge=1)
    replace_after: float = Field(
        180.0, gt=0, description="seconds a worker may stay NOT_READY before it is replaced"
    )
    workers_ceiling: int = Field(
        64, ge=1, description="the most workers any bound may ask for (at up and at run time)"
    )
    node_control_key: str | None = None
    api_key: str | None = None
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    task: dict[str, Any] | None = Field(
        None, description="the SkyPilot task each skypilot worker launches (the SPEC's task fields)"
    )
    worker_port: int | None = Field(
        None, ge=1, le=65535, description="the port the server listens on in each cluster"
    )
    base_ondemand_fallback_replicas: int = Field(
        0, ge=0, description="on-demand workers kept besides the spot ones"
    )
    dynamic_ondemand_fallback: bool = Field(
        False, description="launch on-demand workers while spot ones are not READY"
    )
    launch_attempts: int = Field(3, ge=1, le=20, description="tries per cluster launch")
    launch_backoff: float = Field(
        10.0, ge=0, description="seconds before the second launch try; doubles after each"
    )
    status_interval: float = Field(
        30.0, gt=0, description="seconds between SkyPilot status refreshes (finds preemptions)"
    )

    @field_validator("engine_args", mode="before")
    @classmethod
    def _split_engine_args(cls, value: Any) -> Any:
        """One string (``--engine-args '--scheduler fcfs'``) is split as a shell would."""
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split {value!r} into arguments: {exc}") from None
        return value

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        """A size as a person writes it (``32M``), in a flag, a SPEC or the resolved JSON."""
        return parse_size(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentConfig:
        if self.model is not None and self.worker_command:
            raise ValueError(f"model and worker_command cannot be used together: {_ONE_OF_THEM}")
        if self.draft_models and (self.worker_command or self.provisioner == "static"):
            raise ValueError(
                "draft_models: only flockctl's engine (model) speculates with draft models"
            )
        if self.engine_args and self.worker_command:
            raise ValueError(
                "engine_args: only flockctl's engine (model) takes them; put the flags in"
                " worker_command instead"
            )
        if self.provisioner is None:
            runs_something = self.worker_command or self.model is not None
            if self.endpoints and not runs_something:
                self.provisioner = "static"
            elif self.task is not None and not runs_something and _asks_for_cloud(self.task):
                self.provisioner = "skypilot"
            else:
                self.provisioner = "local"
        if self.provisioner == "skypilot":
            self._check_skypilot()
        else:
            # A local worker gets its own port; a SkyServe file's service.ports means nothing here.
            self.worker_port = None
            if self.base_ondemand_fallback_replicas or self.dynamic_ondemand_fallback:
                raise ValueError(
                    "base_ondemand_fallback_replicas: on-demand fallback is for the skypilot"
                    " provisioner's spot workers"
                )
        if self.provisioner == "local":
            if not self.worker_command and self.model is None:
                self.model = DEFAULT_MODEL
            if self.worker_command and not _takes_port(self.worker_command):
                raise ValueError(
                    "worker_command: must contain {port}, or read $PORT (or ${PORT}) from its"
                    " environment: the port flockctl assigns to each worker"
                )
        if self.provisioner == "static":
            if self.model is not None:
                raise ValueError(
                    "model: the static provisioner uses the --endpoint servers as they are;"
                    " only local workers run flockctl's engine"
                )
            if not self.endpoints:
                raise ValueError("endpoints: the static provisioner needs at least one --endpoint")
            for url in self.endpoints:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"endpoints: {url!r} is not an http:// or https:// URL")
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) is larger than max_workers ({self.max_workers})"
            )
        for key in ("max_workers", "min_workers", "replicas"):
            value = getattr(self, key)
            if value is not None and value > self.workers_ceiling:
                raise ValueError(
                    f"{key}: {value} is above the workers ceiling ({self.workers_ceiling},"
                    " workers_ceiling); raise --workers-ceiling to allow that many workers"
                )
        if self.autoscale_down > self.autoscale_up:
            raise ValueError(
                f"autoscale_down ({self.autoscale_down}) is larger than autoscale_up"
                f" ({self.autoscale_up})"
            )
        if self.autoscaler == "fixed" and self.replicas is None:
            self.replicas = self.min_workers
        if self.autoscaler == "request-rate" and self.target_qps_per_replica is None:
            raise ValueError(
                "target_qps_per_replica: the request-rate autoscaler needs it (requests per"
                " second one worker should take)"
            )
        return self

    def _check_skypilot(self) -> None:
        """What a SkyPilot deployment needs: a task with a ``run:`` and the server's port."""
        task = self.task or {}
        if not task.get("run"):
            raise ValueError(
                "run: the skypilot provisioner launches the SPEC's SkyPilot task on each worker,"
                " and its run: section must start the server"
            )
        for key in ("worker_command", "model", "endpoints", "engine_args", "draft_models"):
            if getattr(self, key):
                raise ValueError(
                    f"{key}: the skypilot provisioner runs the task's run: section on each"
                    " cluster; put the server's command there"
                )
        ports = _resource_ports(task.get("resources"))
        if self.worker_port is None:
            if len(ports) != 1:
                raise ValueError(
                    "service.ports: give the port the server listens on in each cluster"
                    " (service.ports, or a single port in resources.ports)"
                )
            self.worker_port = ports[0]
        spot = _uses_spot(task.get("resources"))
        if (self.base_ondemand_fallback_replicas or self.dynamic_ondemand_fallback) and not spot:
            key = (
                "base_ondemand_fallback_replicas"
                if self.base_ondemand_fallback_replicas
                else "dynamic_ondemand_fallback"
            )
            raise ValueError(
                f"{key}: on-demand fallback is for spot workers; set resources.use_spot: true"
            )

    def uses_spot(self) -> bool:
        """Whether the SkyPilot task asks for spot (preemptible) machines."""
        return self.task is not None and _uses_spot(self.task.get("resources"))

    def local_command(self) -> str | None:
        """The command line that starts one local worker: the given ``worker_command``, or
        flockctl's engine serving ``model``. The only place a model becomes a command."""
        if self.worker_command:
            return self.worker_command
        if self.model is not None:
            return self.model_command(self.model)
        return None

    def model_command(self, model: str) -> str:
        """The command line of a local worker running flockctl's engine serving ``model``.

        It takes this deployment's ``engine_args`` (an engine deployment's flags apply to every
        engine it starts) and the same ``--threads`` share, but its draft models only when
        ``model`` is the deployment's own: a draft is trained for one target's tokenizer.
        """
        args = list(self.engine_args)
        if model == self.model:
            for draft in self.draft_models:
                args += ["--draft-model", draft]
        if not any(a == "--threads" or a.startswith("--threads=") for a in args):
            args += ["--threads", str(self.threads_per_engine())]
        return engine_command(model, args)

    def threads_per_engine(self) -> int:
        """CPU threads for each local engine: this machine's cores split between as many
        engines as may run at once. Oversubscribed torch threads spin against each other and a
        CPU decode step can take 50x longer; ``--engine-args '--threads N'`` overrides it."""
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        engines = (
            self.replicas if self.autoscaler == "fixed" and self.replicas else self.max_workers
        )
        return max(1, cores // max(1, engines))

    def initial_target(self) -> int:
        """How many workers to start with."""
        if self.provisioner == "static":
            return len(self.endpoints)
        if self.autoscaler == "fixed":
            return self.replicas or 0
        return self.min_workers


def _resource_options(resources: Any) -> list[dict[str, Any]]:
    """The resource mappings a task may run on: the top level and each ``any_of``/``ordered``."""
    if not isinstance(resources, dict):
        return []
    options = [resources]
    for key in ("any_of", "ordered"):
        extra = resources.get(key)
        if isinstance(extra, list):
            options += [item for item in extra if isinstance(item, dict)]
    return options


def _resource_ports(resources: Any) -> list[int]:
    """Every port the task's resources open (a range counts each of its ports)."""
    found: set[int] = set()
    for option in _resource_options(resources):
        ports = option.get("ports")
        for item in ports if isinstance(ports, list) else [ports]:
            text = str(item).strip() if item is not None else ""
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
            if match:
                low = int(match.group(1))
                found.update(range(low, int(match.group(2) or low) + 1))
    return sorted(found)


def _uses_spot(resources: Any) -> bool:
    return any(option.get("use_spot") is True for option in _resource_options(resources))


#: ``$PORT`` or ``${PORT}``, not ``$PORTS``: how a shell command line reads the worker's port from
#: its environment (the local provisioner sets ``PORT`` and runs such a command through a shell).
_PORT_VAR = re.compile(r"\$(?:PORT\b|\{PORT\})")


def _takes_port(command: str) -> bool:
    """Whether a worker command listens where it is told: ``{port}`` filled in, or ``$PORT``."""
    return "{port}" in command or _PORT_VAR.search(command) is not None


def _asks_for_cloud(task: dict[str, Any]) -> bool:
    """A SPEC that is a SkyPilot task (it says what to run, or on what machines)."""
    return "run" in task or "resources" in task


#: SkyServe ``readiness_probe`` fields and the probe settings they become.
_PROBE_FIELDS = {
    "path": "path",
    "post_data": "post_data",
    "initial_delay_seconds": "initial_delay_seconds",
    "timeout_seconds": "timeout_seconds",
    "headers": "headers",
    "endpoint_probe_interval_seconds": "interval_seconds",
}
#: SkyServe ``replica_policy`` fields and the config fields they become.
_POLICY_FIELDS = {
    "min_replicas": "min_workers",
    "max_replicas": "max_workers",
    "target_qps_per_replica": "target_qps_per_replica",
    "upscale_delay_seconds": "upscale_delay",
    "downscale_delay_seconds": "downscale_delay",
    "base_ondemand_fallback_replicas": "base_ondemand_fallback_replicas",
    "dynamic_ondemand_fallback": "dynamic_ondemand_fallback",
}
_SERVICE_FIELDS = (
    "readiness_probe",
    "replicas",
    "replica_policy",
    "load_balancing_policy",
    "ports",
)


def _service_overrides(service: Any, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Map SkyServe's ``service:`` section onto config fields, field by field.

    What SkyServe does is kept: a probe given as a plain string is its path, and without any
    ``readiness_probe`` the path is ``/``; ``replicas: N`` is a fixed number;
    ``target_qps_per_replica`` selects the request-rate autoscaler with SkyServe's default delays;
    ``replica_policy`` without ``max_replicas`` stays at ``min_replicas``. Fields flockctl does not
    implement are errors that name the field, never silently ignored.
    """
    if not isinstance(service, dict):
        raise ConfigError([f"{where}service: must be a mapping"])
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    at = f"{where}service."
    for key in service:
        if key not in _SERVICE_FIELDS:
            problems.append(
                f"{at}{key}: unknown or unsupported field (flockctl takes"
                f" {', '.join(_SERVICE_FIELDS)})"
            )
    probe = service.get("readiness_probe", "/")
    origin["probe"] = f"{at}readiness_probe"
    if isinstance(probe, str):
        out["probe"] = {"path": probe}
    elif isinstance(probe, dict):
        out["probe"] = {}
        for key, value in probe.items():
            if key not in _PROBE_FIELDS:
                problems.append(f"{at}readiness_probe.{key}: unknown or unsupported field")
                continue
            if key == "post_data" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    problems.append(f"{at}readiness_probe.post_data: not valid JSON: {exc}")
                    continue
            out["probe"][_PROBE_FIELDS[key]] = value
        if "path" not in probe:
            problems.append(f"{at}readiness_probe.path: required when readiness_probe is a mapping")
    else:
        problems.append(f"{at}readiness_probe: must be a path or a mapping")
    if "replicas" in service and "replica_policy" in service:
        problems.append(f"{at}replicas: cannot be used together with service.replica_policy")
    if "replicas" in service:
        # As in SkyServe, ``replicas: N`` is min_replicas = max_replicas = N.
        replicas = service["replicas"]
        out["autoscaler"] = "fixed"
        out["replicas"] = replicas
        for key in ("replicas", "min_workers", "max_workers"):
            origin[key] = f"{at}replicas"
        if isinstance(replicas, int) and not isinstance(replicas, bool):
            out["min_workers"] = replicas
            out["max_workers"] = max(replicas, 1)
    policy = service.get("replica_policy")
    if policy is not None:
        problems += _replica_policy(policy, f"{at}replica_policy", out, origin)
    lb = service.get("load_balancing_policy")
    if lb is not None:
        mapped = SKYSERVE_LB_POLICIES.get(str(lb).lower())
        if mapped is None:
            problems.append(
                f"{at}load_balancing_policy: {lb!r} is not supported (flockctl takes"
                f" {', '.join(SKYSERVE_LB_POLICIES)})"
            )
        else:
            out["policy"] = mapped
            origin["policy"] = f"{at}load_balancing_policy"
    if "ports" in service:
        out["worker_port"] = service["ports"]
        origin["worker_port"] = f"{at}ports"
    if problems:
        raise ConfigError(problems)
    return out, origin


def _replica_policy(policy: Any, at: str, out: dict[str, Any], origin: dict[str, str]) -> list[str]:
    """Map ``replica_policy`` into ``out``; returns the problems found."""
    if not isinstance(policy, dict):
        return [f"{at}: must be a mapping"]
    problems = []
    for key, value in policy.items():
        field = _POLICY_FIELDS.get(key)
        if field is None:
            problems.append(f"{at}.{key}: unknown or unsupported field")
            continue
        if key == "target_qps_per_replica" and isinstance(value, dict):
            problems.append(
                f"{at}.target_qps_per_replica: a target per accelerator is not supported;"
                " give one number"
            )
            continue
        out[field] = value
        origin[field] = f"{at}.{key}"
    if "target_qps_per_replica" in out:
        out["autoscaler"] = "request-rate"
        origin["autoscaler"] = f"{at}.target_qps_per_replica"
        out.setdefault("upscale_delay", SKYSERVE_UPSCALE_DELAY)
        out.setdefault("downscale_delay", SKYSERVE_DOWNSCALE_DELAY)
    if "max_replicas" not in policy and isinstance(policy.get("min_replicas"), int):
        # As in SkyServe: without max_replicas the deployment stays at min_replicas.
        out["max_workers"] = max(policy["min_replicas"], 1)
    return problems


_ENV_VAR = re.compile(r"\$\{?\b([a-zA-Z_][a-zA-Z0-9_]*)\b\}?")


def _fill_envs(service: Any, data: dict[str, Any]) -> Any:
    """The ``service:`` section with the task's ``envs`` (and inline ``secrets``) filled in, as
    SkyPilot does, so ``post_data: {model: $MODEL_ID}`` probes with the real model name."""
    values: dict[str, str] = {}
    for key in ("envs", "secrets"):
        found = data.get(key)
        if isinstance(found, dict):
            values.update({str(k): str(v) for k, v in found.items() if v is not None})
    if not values:
        return service
    text = json.dumps(service)
    filled = _ENV_VAR.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    try:
        return json.loads(filled)
    except json.JSONDecodeError:  # a value that breaks the JSON: leave the section as written
        return service


def load_spec(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a SPEC YAML into config overrides and, for each field, where it came from."""
    where = f"{path}: "
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    problems = [
        f"{where}{key}: unknown top-level field (expected flockctl, service, or SkyPilot task"
        " fields)"
        for key in data
        if key not in SKYPILOT_TASK_KEYS and key not in ("flockctl", "service")
    ]
    if problems:
        raise ConfigError(problems)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if "service" in data:
        out, origin = _service_overrides(_fill_envs(data["service"], data), where)
    task = {key: value for key, value in data.items() if key in SKYPILOT_TASK_KEYS}
    if task:
        out["task"] = task
        origin["task"] = path.name
    section = data.get("flockctl")
    if section is not None:
        if not isinstance(section, dict):
            raise ConfigError([f"{where}flockctl: must be a mapping"])
        for key, value in section.items():
            if key == "probe" and isinstance(value, dict) and isinstance(out.get("probe"), dict):
                value = {**out["probe"], **value}
            out[key] = value
            origin[key] = f"{where}flockctl.{key}"
    return out, origin


def resolve(
    spec: Path | None = None,
    flags: dict[str, Any] | None = None,
    flag_names: dict[str, str] | None = None,
) -> DeploymentConfig:
    """Merge defaults, SPEC and flags into a validated config, or raise ConfigError.

    ``flags`` holds only the flags the user actually gave (None means "not given");
    ``flag_names`` maps a field to its flag spelling for error messages.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if spec is not None:
        values, origin = load_spec(spec)
    given = {key for key, value in (flags or {}).items() if value is not None}
    if len(given & _WHAT_RUNS) == 1:
        # The model and the worker command are two answers to one question (what runs on a
        # worker): a flag giving one overrides the file's answer, whichever form it took.
        (flag,) = given & _WHAT_RUNS
        dropped = ("model", "engine_args", "draft_models")
        for key in dropped if flag == "worker_command" else ("worker_command",):
            if key not in given:
                values.pop(key, None)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "probe" and isinstance(value, dict):
            base = values.get("probe") if isinstance(values.get("probe"), dict) else {}
            value = {**base, **value}
        values[key] = value
        origin[key] = (flag_names or {}).get(key, f"--{key.replace('_', '-')}")
    if flags and flags.get("autoscaler") is None:
        # A flag that only one autoscaler reads selects it (the file's choice gives way).
        if flags.get("replicas") is not None:
            values["autoscaler"] = "fixed"
            origin["autoscaler"] = _label(origin, "replicas")
        elif flags.get("target_qps_per_replica") is not None:
            values["autoscaler"] = "request-rate"
            origin["autoscaler"] = _label(origin, "target_qps_per_replica")
    if values.get("model") is not None and values.get("worker_command"):
        both = f"{_label(origin, 'model')} and {_label(origin, 'worker_command')}"
        raise ConfigError([f"{both} cannot be used together: {_ONE_OF_THEM}"])
    try:
        return DeploymentConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError([_describe(err, origin) for err in exc.errors()]) from None


def _label(origin: dict[str, str], key: str) -> str:
    """Where a field's value came from, as the user wrote it (a flag, or a SPEC path)."""
    return origin.get(key, key)


def _describe(err: Any, origin: dict[str, str]) -> str:
    loc = [str(part) for part in err.get("loc", ())]
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if not loc:
        # A check across fields names the field it is about first; say where that came from.
        field, sep, rest = msg.partition(": ")
        if sep and field in origin and not origin[field].startswith("--"):
            return f"{origin[field]}: {rest}"
        return msg
    head = loc[0]
    where = origin.get(head, head)
    if head in origin and origin[head].startswith("--"):
        label = where
    elif head in origin:
        label = where + "".join(f".{part}" for part in loc[1:])
    else:
        label = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"{label}: {msg}"
