"""The deployment config: one validated model of everything the daemon needs to run a deployment.

Where its values come from (defaults, a SPEC file, flags) is ``spec_file``'s job; this model
checks that they make sense together and says what runs on each worker. The config is written to
``config.json`` and read back by the daemon, so validating it again gives the same config.
"""

from __future__ import annotations

import shlex
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from flockctl.cores import fused_threads
from flockctl.server.flags import (
    AUTOSCALING,
    BALANCING,
    DAEMON,
    PROBE,
    SPEC_ONLY,
    WORKERS,
    Flag,
    NoFlag,
)
from flockctl.server.gpus import check_share, parse_indices
from flockctl.server.limits import parse_size
from flockctl.server.provisioners import sky_task
from flockctl.server.provisioners.engine_command import engine_command, engine_threads, takes_port
from flockctl.telemetry import parse_endpoint

#: The model a local deployment serves when it is given neither a worker command nor endpoints:
#: flockctl's engine builds it locally, so a deployment works offline out of the box.
DEFAULT_MODEL = "demo"
#: The two ways to say what a local worker runs; a deployment takes one of them.
WHAT_RUNS = frozenset({"model", "worker_command"})
#: What to do when both were given.
MODEL_OR_COMMAND = (
    "--model runs flockctl's engine on each worker, --worker-command runs any other server;"
    " give one of them"
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

    path: Annotated[str, Flag(PROBE, name="readiness-path")] = Field(
        "/health", description="Path probed on each worker"
    )
    post_data: Annotated[dict[str, Any] | None, SPEC_ONLY] = Field(
        None, description="JSON body; makes the probe a POST"
    )
    headers: Annotated[dict[str, str], SPEC_ONLY] = Field(default_factory=dict)
    initial_delay_seconds: Annotated[float, Flag(PROBE, name="initial-delay")] = Field(
        1200.0, ge=0, description="Seconds a new worker may take to become READY"
    )
    interval_seconds: Annotated[float, Flag(PROBE, name="probe-interval")] = Field(
        2.0, gt=0, description="Seconds between probes"
    )
    timeout_seconds: Annotated[float, Flag(PROBE, name="probe-timeout")] = Field(
        15.0, gt=0, description="Seconds a probe may take"
    )
    failure_threshold: Annotated[int, Flag(PROBE)] = Field(
        3, ge=1, description="Failed probes in a row before NOT_READY"
    )

    @model_validator(mode="after")
    def _path_is_absolute(self) -> ProbeConfig:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        return self


#: The autoscaler fields a worker group may set for itself; those it leaves out are the
#: deployment's.
GROUP_SCALING = (
    "min_workers",
    "max_workers",
    "autoscaler",
    "replicas",
    "target_qps_per_replica",
    "autoscale_up",
    "autoscale_down",
    "queue_tracking_window",
    "upscale_delay",
    "downscale_delay",
)


class GroupConfig(_Strict):
    """One worker group (``flockctl: groups``): what its workers run, and its own autoscaler.

    A group scales on the requests for its model alone, within its own bounds.
    """

    name: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str | None = Field(
        None,
        min_length=1,
        description="model flockctl's engine serves; with endpoints or task, the model those"
        " servers serve (so requests for it wait for this group while it has no worker)",
    )
    worker_command: str | None = Field(None, description="any other server's command line")
    min_workers: int | None = Field(None, ge=0)
    max_workers: int | None = Field(None, ge=1)
    autoscaler: Literal["qlrm", "request-rate", "fixed"] | None = None
    replicas: int | None = Field(None, ge=0)
    target_qps_per_replica: float | None = Field(None, gt=0)
    autoscale_up: float | None = Field(None, ge=0)
    autoscale_down: float | None = Field(None, ge=0)
    queue_tracking_window: float | None = Field(None, gt=0)
    upscale_delay: float | None = Field(None, ge=0)
    downscale_delay: float | None = Field(None, ge=0)
    endpoints: list[str] | None = Field(
        None, min_length=1, description="a static group's servers: one worker per URL"
    )
    task: dict[str, Any] | None = Field(
        None,
        description="a SkyPilot group's own task fields over the SPEC's: resources and envs add"
        " to the SPEC's, any other field (run, setup, ...) replaces it",
    )

    @model_validator(mode="after")
    def _runs_one_thing(self) -> GroupConfig:
        if self.model is not None and self.worker_command:
            raise ValueError(f"model: give one of model or worker_command for group {self.name!r}")
        remote = [k for k in ("endpoints", "task") if getattr(self, k) is not None]
        if len(remote) > 1 or (remote and self.worker_command):
            first = "worker_command" if self.worker_command else remote[0]
            raise ValueError(
                f"{remote[-1]}: group {self.name!r} gives {first} and {remote[-1]}; a group's"
                " workers are local (model or worker_command), static (endpoints) or SkyPilot"
                " clusters (task)"
            )
        if not remote and self.model is None and not self.worker_command:
            raise ValueError(
                f"model: give one of model or worker_command (local workers), endpoints"
                f" (static) or task (SkyPilot) for group {self.name!r}"
            )
        for key in self.task or {}:
            if key not in sky_task.SKYPILOT_TASK_KEYS:
                raise ValueError(
                    f"task: {key!r} is not a SkyPilot task field (known: "
                    f"{', '.join(sorted(sky_task.SKYPILOT_TASK_KEYS))})"
                )
        if self.worker_command and not takes_port(self.worker_command):
            raise ValueError(
                f"worker_command: group {self.name!r} must contain {{port}}, or read $PORT from"
                " its environment"
            )
        return self


class DeploymentConfig(_Strict):
    """Everything the daemon needs to run one deployment.

    Each field carries its ``Flag`` (its description is the flag's help) or says who gives it
    instead (``NoFlag``); see ``flockctl.server.flags``.
    """

    #: For one group's config: the engines all groups may run at once (they share the cores).
    _engines: int | None = PrivateAttr(None)

    name: Annotated[str, Flag(short="-n", envvar="FLOCKCTL_NAME")] = Field(
        "default", description="Deployment name"
    )
    host: Annotated[str, Flag(DAEMON)] = Field("127.0.0.1", description="Bind address")
    port: Annotated[int, Flag(DAEMON)] = Field(3000, ge=1, le=65535, description="Balancer port")
    provisioner: Annotated[
        Literal["local", "skypilot", "static"] | None,
        Flag(
            WORKERS,
            default_text="skypilot when the SPEC has resources or run, static with --endpoint,"
            " else local",
        ),
    ] = Field(
        None,
        description="local (worker processes here), skypilot (a cluster per worker, from the"
        " SPEC's SkyPilot task) or static (the --endpoint servers)",
    )
    worker_command: Annotated[str | None, Flag(WORKERS)] = Field(
        None,
        description="Command that starts one worker instead of flockctl's engine (any OpenAI"
        " server); {port} is its port, {worker_id} its id, also in its environment as $PORT and"
        " $FLOCKCTL_WORKER_ID. E.g. 'vllm serve MODEL --port {port}'. Not with --model",
    )
    model: Annotated[
        str | None,
        Flag(WORKERS, default_text="demo when neither --worker-command nor --endpoint is given"),
    ] = Field(
        None,
        min_length=1,
        description="Model each local worker serves with flockctl's engine: a Hugging Face hub"
        " id, a local path, or 'demo' (built locally, no download)",
    )
    engine_args: Annotated[list[str], Flag(WORKERS, text=True)] = Field(
        default_factory=list,
        description="Extra flags for `flockctl engine serve`, as one string split like a shell"
        " would, e.g. --engine-args '--scheduler fcfs --device cpu'",
    )
    draft_models: Annotated[list[str], Flag(WORKERS, name="draft-model")] = Field(
        default_factory=list,
        description="A draft model each engine worker speculates with (SpecInfer token trees);"
        " repeat for several. It must share --model's tokenizer; with --model demo, 'demo' is"
        " the demo's draft",
    )
    workdir: Annotated[str | None, NoFlag("flockctl up: the directory it runs in")] = Field(
        None, description="directory the worker command runs in"
    )
    endpoints: Annotated[list[str], Flag(WORKERS, name="endpoint")] = Field(
        default_factory=list,
        description="URL of a server that already runs (repeatable): static workers",
    )
    min_workers: Annotated[int, Flag(AUTOSCALING)] = Field(
        1, ge=0, description="Fewest workers the autoscaler keeps"
    )
    max_workers: Annotated[int, Flag(AUTOSCALING)] = Field(
        2, ge=1, description="Most workers the autoscaler runs at once"
    )
    autoscaler: Annotated[Literal["qlrm", "request-rate", "fixed"], Flag(AUTOSCALING)] = Field(
        "qlrm",
        description="qlrm (queue-length running mean), request-rate (SkyServe's"
        " target_qps_per_replica) or fixed",
    )
    replicas: Annotated[int | None, Flag(AUTOSCALING)] = Field(
        None, ge=0, description="Fixed number of workers (sets --autoscaler fixed)"
    )
    target_qps_per_replica: Annotated[float | None, Flag(AUTOSCALING)] = Field(
        None,
        gt=0,
        description="Requests per second one worker should take (sets --autoscaler request-rate)",
    )
    autoscale_up: Annotated[float, Flag(AUTOSCALING)] = Field(
        7.0,
        ge=0,
        description="Scale up when the queue-length running mean per worker passes this",
    )
    autoscale_down: Annotated[float, Flag(AUTOSCALING)] = Field(
        4.0, ge=0, description="Scale down when it falls below this"
    )
    queue_tracking_window: Annotated[float, Flag(AUTOSCALING)] = Field(
        600.0, gt=0, description="Seconds the running mean covers"
    )
    upscale_delay: Annotated[float, Flag(AUTOSCALING)] = Field(
        30.0, ge=0, description="Seconds above autoscale-up before scaling up"
    )
    downscale_delay: Annotated[float, Flag(AUTOSCALING)] = Field(
        120.0, ge=0, description="Seconds below autoscale-down before scaling down"
    )
    policy: Annotated[
        Literal["least-connection", "round-robin", "power-of-two", "latency", "prefix"],
        Flag(BALANCING),
    ] = Field(
        "least-connection",
        description="least-connection, round-robin, power-of-two, latency (fastest expected"
        " answer) or prefix (the worker that saw the prompt's prefix; sessions stick)",
    )
    prefix_min_match: Annotated[float, Flag(BALANCING)] = Field(
        0.5,
        ge=0,
        le=1,
        description="--policy prefix: shortest prefix match, as a share of the prompt, that"
        " routes by prefix",
    )
    prefix_balance: Annotated[float, Flag(BALANCING, default_text="2.0")] = Field(
        2.0,
        ge=1,
        description="--policy prefix: route by prefix only while that worker's load (in flight"
        " + 1) is within this factor of the least loaded one's",
    )
    prefix_tree_chars: Annotated[int, Flag(BALANCING)] = Field(
        1_000_000,
        ge=1,
        description="--policy prefix: characters of prompt text remembered per worker, least"
        " recently used forgotten first",
    )
    latency_decay: Annotated[float, Flag(BALANCING)] = Field(
        10.0,
        gt=0,
        description="--policy latency: seconds over which faster answers pull a worker's"
        " latency estimate down by a factor e (slower ones count at once)",
    )
    latency_probe_interval: Annotated[float, Flag(BALANCING)] = Field(
        1.0,
        gt=0,
        description="--policy latency: a READY worker that goes this many seconds without an"
        " answer to measure (idle, or avoided as slow) gets a one-token completion as a probe,"
        " one at a time; probes are neither served requests nor logged",
    )
    worker_capacity: Annotated[
        int | None,
        Flag(
            BALANCING,
            default_text="what the worker reports (flockctl's engine: its batch plus waiting"
            " room), else no limit",
        ),
    ] = Field(None, ge=1, description="Concurrent requests per worker; more wait in the queue")
    queue_timeout: Annotated[float, Flag(BALANCING)] = Field(
        60.0, gt=0, description="Seconds a request may wait for a worker before 503"
    )
    max_queue: Annotated[int, Flag(BALANCING)] = Field(
        1000, ge=0, description="Requests that may wait; more get 429"
    )
    max_attempts: Annotated[int, Flag(BALANCING)] = Field(
        3,
        ge=1,
        le=10,
        description="Attempts per request on connect errors, timeouts and 502/503/504 before"
        " the first byte (a 500 is retried once at most)",
    )
    upstream_timeout: Annotated[float, Flag(BALANCING)] = Field(
        60.0,
        gt=0,
        description="Seconds to wait for a worker's next byte, the first included (nginx's"
        " proxy_read_timeout); before the first byte reaches the client the request is retried"
        " on another worker, after it the answer ends, and the worker leaves the rotation until"
        " a probe passes",
    )
    max_body_size: Annotated[int, Flag(BALANCING, default_text="32M", text=True)] = Field(
        32 << 20,
        ge=1,
        description="Largest request body: a byte count or a number with K, M or G (binary);"
        " a larger one is refused with 413 before it is read",
    )
    header_timeout: Annotated[float, Flag(BALANCING)] = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a whole request head, then 408 and the"
        " connection closes; its body gets 60 more",
    )
    max_connections: Annotated[int, Flag(BALANCING)] = Field(
        10_000,
        ge=1,
        description="Client connections held at once; more are answered 503 and closed (fewer"
        " when the open-file limit needs a reserve for probes and workers)",
    )
    drain_timeout: Annotated[float, Flag(WORKERS)] = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish when a worker is removed"
    )
    max_start_failures: Annotated[int, Flag(WORKERS)] = Field(
        3, ge=1, description="Workers in a row that fail before READY before launching stops"
    )
    replace_after: Annotated[float, Flag(WORKERS)] = Field(
        180.0,
        gt=0,
        description="Seconds a worker may stay NOT_READY before it is drained, stopped and"
        " replaced (a static endpoint stays out of rotation instead)",
    )
    workers_ceiling: Annotated[int, Flag(WORKERS)] = Field(
        64,
        ge=1,
        description="The most workers any bound may ask for, here and through the admin API",
    )
    node_control_key: Annotated[
        str | None,
        Flag(
            BALANCING,
            envvar="FLOCKCTL_NODE_CONTROL_KEY",
            default_text="generated into daemon.json",
        ),
    ] = Field(None, description="Admin token for /-/ routes")
    api_key: Annotated[str | None, Flag(BALANCING, envvar="FLOCKCTL_API_KEY")] = Field(
        None, description="Require 'Authorization: Bearer KEY' on proxied routes"
    )
    otel_collector_endpoint: Annotated[str | None, Flag(DAEMON)] = Field(
        None,
        description="Send traces and metrics over OpenTelemetry to this collector:"
        " http://host:4318 (OTLP/HTTP) or grpc://host:4317 (OTLP/gRPC); engine workers get it"
        " too. Without it, OTEL_EXPORTER_OTLP_ENDPOINT where set",
    )
    gpus: Annotated[
        list[int] | None, Flag(WORKERS, default_text="every GPU NVML sees", text=True)
    ] = Field(
        None,
        description="GPUs local workers are placed on, as nvidia-smi (and NVML) numbers them,"
        " e.g. --gpus 0,1,2,3; refused on a machine without NVIDIA GPUs",
    )
    gpus_per_worker: Annotated[
        float | None,
        Flag(WORKERS, default_text="1 for flockctl's engine, 0 for other worker commands"),
    ] = Field(
        None,
        ge=0,
        description="GPUs each local worker gets, in its own CUDA_VISIBLE_DEVICES; 0.5 puts two"
        " workers on one GPU; {gpus} in --worker-command is the count",
    )
    cuda_mps: Annotated[bool, Flag(WORKERS)] = Field(
        False,
        description="Run local workers under CUDA MPS: the daemon starts"
        " nvidia-cuda-mps-control and gives each worker its share of a GPU's threads; stopped"
        " at down",
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    groups: Annotated[list[GroupConfig], SPEC_ONLY] = Field(
        default_factory=list,
        description="worker groups, each with its model or command and its own autoscaler;"
        " none: the deployment is one group",
    )
    task: Annotated[dict[str, Any] | None, SPEC_ONLY] = Field(
        None, description="the SkyPilot task each skypilot worker launches (the SPEC's task fields)"
    )
    worker_port: Annotated[int | None, SPEC_ONLY] = Field(
        None, ge=1, le=65535, description="the port the server listens on in each cluster"
    )
    base_ondemand_fallback_replicas: Annotated[int, SPEC_ONLY] = Field(
        0, ge=0, description="on-demand workers kept besides the spot ones"
    )
    dynamic_ondemand_fallback: Annotated[bool, SPEC_ONLY] = Field(
        False, description="launch on-demand workers while spot ones are not READY"
    )
    launch_attempts: Annotated[int, SPEC_ONLY] = Field(
        3, ge=1, le=20, description="tries per cluster launch"
    )
    launch_backoff: Annotated[float, SPEC_ONLY] = Field(
        10.0, ge=0, description="seconds before the second launch try; doubles after each"
    )
    status_interval: Annotated[float, SPEC_ONLY] = Field(
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

    @field_validator("gpus", mode="before")
    @classmethod
    def _parse_gpus(cls, value: Any) -> Any:
        """``--gpus 0,1,3`` as a list of indices (a SPEC may give a list)."""
        return None if value is None else parse_indices(value)

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpu_share(cls, value: float | None) -> float | None:
        if value is not None:
            check_share(value)
        return value

    @field_validator("otel_collector_endpoint")
    @classmethod
    def _otel_endpoint(cls, value: str | None) -> str | None:
        """An endpoint the exporters can use, checked before any process starts."""
        if value is not None:
            parse_endpoint(value)  # TelemetryError is a ValueError naming the problem
        return value

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        """A size as a person writes it (``32M``), in a flag, a SPEC or the resolved JSON."""
        return parse_size(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentConfig:
        if self.model is not None and self.worker_command:
            raise ValueError(
                f"model and worker_command cannot be used together: {MODEL_OR_COMMAND}"
            )
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
            if self.groups:
                self.provisioner = self._groups_provisioner()
            elif self.endpoints and not runs_something:
                self.provisioner = "static"
            elif (
                self.task is not None and not runs_something and sky_task.asks_for_cloud(self.task)
            ):
                self.provisioner = "skypilot"
            else:
                self.provisioner = "local"
        if self.provisioner == "skypilot":
            if not self.groups:  # with groups, _check_groups checks each group's task
                self._check_skypilot()
        else:
            # A local worker gets its own port; a SkyServe file's service.ports means nothing here.
            self.worker_port = None
            if self.base_ondemand_fallback_replicas or self.dynamic_ondemand_fallback:
                raise ValueError(
                    "base_ondemand_fallback_replicas: on-demand fallback is for the skypilot"
                    " provisioner's spot workers"
                )
        if self.groups:
            self._check_groups()
        if self.provisioner == "local" and not self.groups:
            if not self.worker_command and self.model is None:
                self.model = DEFAULT_MODEL
            if self.worker_command and not takes_port(self.worker_command):
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
            if not self.endpoints and not self.groups:
                raise ValueError("endpoints: the static provisioner needs at least one --endpoint")
            for url in self.endpoints:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"endpoints: {url!r} is not an http:// or https:// URL")
        self._check_gpus()
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

    def _check_gpus(self) -> None:
        """GPU placement is for local workers; MPS needs workers that share GPUs."""
        if self.provisioner != "local":
            for key in ("gpus", "gpus_per_worker", "cuda_mps"):
                if getattr(self, key):
                    raise ValueError(
                        f"{key}: GPU placement is for local workers; the {self.provisioner}"
                        " provisioner's workers run on their own machines"
                    )
        if self.cuda_mps and self.gpus_per_worker == 0:
            raise ValueError("cuda_mps: workers given no GPU (gpus_per_worker 0) cannot use MPS")

    def _groups_provisioner(self) -> Literal["local", "skypilot", "static"]:
        """The provisioner groups ask for when none was named: static where a group lists
        endpoints, SkyPilot where one gives a task, else local."""
        if any(g.endpoints for g in self.groups):
            return "static"
        if any(g.task is not None for g in self.groups):
            return "skypilot"
        return "local"

    def _check_groups(self) -> None:
        """Each group runs its own thing through the deployment's one provisioner (local: a
        model or command; static: its endpoints, a fixed size; SkyPilot: its own task); the
        deployment runs none itself."""
        if self.worker_command or self.model is not None:
            key = "model" if self.model is not None else "worker_command"
            raise ValueError(f"{key}: with groups, each group says what its workers run")
        if self.endpoints:
            raise ValueError("endpoints: with groups, each static group lists its own endpoints")
        for index, group in enumerate(self.groups):
            if group.endpoints is not None:
                kind, key = "static", "endpoints"
            elif group.task is not None:
                kind, key = "skypilot", "task"
            else:
                kind, key = "local", "model" if group.model is not None else "worker_command"
            if kind != self.provisioner:
                raise ValueError(
                    f"groups.{index}.{key}: group {group.name!r} gives {kind} workers, but"
                    f" this deployment's provisioner is {self.provisioner}; all groups of a"
                    " deployment use its one provisioner"
                )
        if self.provisioner == "static":
            self._check_static_groups()
        elif self.provisioner == "skypilot":
            self._check_skypilot_groups()
        names = [g.name for g in self.groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"groups: two groups named {twice[0]!r}")
        models = [g.model for g in self.groups if g.model is not None]
        shared = sorted({m for m in models if models.count(m) > 1})
        if shared:
            raise ValueError(f"groups: two groups serve model {shared[0]!r}; give it one group")
        for index, group in enumerate(self.groups):
            own = self.group_config(group)
            if own.min_workers > own.max_workers:
                raise ValueError(
                    f"groups.{index}.min_workers: {own.min_workers} is larger than max_workers"
                    f" ({own.max_workers}) in group {group.name!r}"
                )
            if own.autoscale_down > own.autoscale_up:
                raise ValueError(
                    f"groups.{index}.autoscale_down: larger than autoscale_up in group"
                    f" {group.name!r}"
                )
            if own.autoscaler == "request-rate" and own.target_qps_per_replica is None:
                raise ValueError(
                    f"groups.{index}.target_qps_per_replica: group {group.name!r} uses the"
                    " request-rate autoscaler, which needs it"
                )
        most = self._group_engines()
        if most > self.workers_ceiling:
            raise ValueError(
                f"groups: up to {most} workers in all, above the workers ceiling"
                f" ({self.workers_ceiling}, workers_ceiling); raise --workers-ceiling"
            )

    def group_config(self, group: GroupConfig) -> DeploymentConfig:
        """The config of one group's workers and autoscaler: the deployment's, with what the
        group sets for itself (not validated again; ``_check_groups`` checks what matters)."""
        update: dict[str, Any] = {
            key: getattr(group, key) for key in GROUP_SCALING if getattr(group, key) is not None
        }
        if group.replicas is not None and group.autoscaler is None:
            update["autoscaler"] = "fixed"
        if update.get("autoscaler", self.autoscaler) == "fixed" and group.replicas is None:
            update["replicas"] = update.get("min_workers", self.min_workers)
        update |= {"model": group.model, "worker_command": group.worker_command, "groups": []}
        if group.worker_command:
            update |= {"engine_args": [], "draft_models": []}
        if group.endpoints:
            update["endpoints"] = [u.rstrip("/") for u in group.endpoints]
        if group.task is not None:
            task = dict(self.task or {})
            for key, value in group.task.items():
                base = task.get(key)
                # resources and envs add to the SPEC's (a group names its GPU, not its cloud)
                if key in ("resources", "envs") and isinstance(base, dict):
                    value = {**base, **value} if isinstance(value, dict) else value
                task[key] = value
            own_ports = sky_task.resource_ports(group.task.get("resources"))
            ports = sky_task.resource_ports(task.get("resources"))
            if len(own_ports) == 1:
                port: int | None = own_ports[0]
            elif self.worker_port is not None:
                port = self.worker_port
            else:
                port = ports[0] if len(ports) == 1 else None
            update |= {"task": task, "worker_port": port}
        own = self.model_copy(update=update)
        own._engines = self._group_engines()
        return own

    def _check_static_groups(self) -> None:
        """A static group has one worker per endpoint: URLs, each in one group, and no bounds."""
        seen: dict[str, str] = {}
        for index, group in enumerate(self.groups):
            for key in GROUP_SCALING:
                if getattr(group, key) is not None:
                    raise ValueError(
                        f"groups.{index}.{key}: group {group.name!r} has one worker per endpoint;"
                        " a static group's size is fixed"
                    )
            for url in group.endpoints or []:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(
                        f"groups.{index}.endpoints: {url!r} is not an http:// or https:// URL"
                    )
                other = seen.setdefault(url.rstrip("/"), group.name)
                if other != group.name:
                    raise ValueError(
                        f"groups.{index}.endpoints: {url} is in groups {other!r} and"
                        f" {group.name!r}; a server is one group's worker"
                    )

    def _check_skypilot_groups(self) -> None:
        """Each SkyPilot group's task (its fields over the SPEC's) starts a server on a port."""
        for key in ("base_ondemand_fallback_replicas", "dynamic_ondemand_fallback"):
            if getattr(self, key):
                raise ValueError(
                    f"{key}: on-demand fallback is not available with worker groups; give the"
                    " on-demand machines a group of their own"
                )
        for index, group in enumerate(self.groups):
            own = self.group_config(group)
            task = own.task or {}
            if not task.get("run"):
                raise ValueError(
                    f"groups.{index}.task.run: group {group.name!r} has no run: section (its"
                    " own or the SPEC's) to start the server on each cluster"
                )
            if own.worker_port is None:
                raise ValueError(
                    f"groups.{index}.task.resources.ports: give the one port group"
                    f" {group.name!r}'s server listens on (or service.ports for every group)"
                )
            try:
                # Its model names what the task's server serves; nothing runs it here.
                own.model_copy(update={"model": None})._check_skypilot()
            except ValueError as exc:
                raise ValueError(f"groups.{index}.{exc}") from None

    def _group_engines(self) -> int:
        """The most workers all groups together may run at once."""
        total = 0
        for group in self.groups:
            if group.endpoints:
                total += len(group.endpoints)
                continue
            fixed = group.autoscaler == "fixed" or (
                group.autoscaler is None
                and (group.replicas is not None or self.autoscaler == "fixed")
            )
            replicas = group.replicas if group.replicas is not None else None
            most = group.max_workers if group.max_workers is not None else self.max_workers
            total += replicas if fixed and replicas else most
        return total

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
        ports = sky_task.resource_ports(task.get("resources"))
        if self.worker_port is None:
            if len(ports) != 1:
                raise ValueError(
                    "service.ports: give the port the server listens on in each cluster"
                    " (service.ports, or a single port in resources.ports)"
                )
            self.worker_port = ports[0]
        spot = sky_task.uses_spot(task.get("resources"))
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
        return self.task is not None and sky_task.uses_spot(self.task.get("resources"))

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
        drafts = self.draft_models if model == self.model else []
        return engine_command(
            model,
            self.engine_args,
            drafts,
            self.threads_per_engine(),
            fused_threads=self.fused_threads_per_engine(),
            otel_collector_endpoint=self.otel_collector_endpoint,
        )

    def threads_per_engine(self) -> int:
        """CPU threads for each local engine: this machine's cores split between as many
        engines as may run at once (``--engine-args '--threads N'`` overrides it)."""
        return engine_threads(self._engines_at_once())

    def fused_threads_per_engine(self) -> int:
        """Threads each local engine's fused forward splits a step over: 2 where its share of
        the cores is two (:func:`flockctl.cores.fused_threads`), else 1."""
        return fused_threads(self._engines_at_once())

    def _engines_at_once(self) -> int:
        """How many local engines may run at once, sharing this machine's cores."""
        if self._engines is not None:  # one group's: every group's engines share the cores
            return self._engines
        if self.groups:
            return self._group_engines()
        fixed = self.replicas if self.autoscaler == "fixed" else None
        return fixed or self.max_workers

    def initial_target(self) -> int:
        """How many workers to start with (with groups: all groups together)."""
        if self.groups:
            return sum(self.group_config(g).initial_target() for g in self.groups)
        if self.provisioner == "static":
            return len(self.endpoints)
        if self.autoscaler == "fixed":
            return self.replicas or 0
        return self.min_workers
