"""``flockctl up``: resolve the deployment from a SPEC and flags, check it, then start its daemon
(in the background, or attached with ``--foreground``), or only print the plan (``--dry-run``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer

from flockctl.client import ClientError
from flockctl.commands.common import JsonOpt, check_name
from flockctl.commands.up_options import (
    ApiKeyOpt,
    AutoscaleDownOpt,
    AutoscalerOpt,
    AutoscaleUpOpt,
    CudaMpsOpt,
    DeploymentNameOpt,
    DownscaleDelayOpt,
    DraftModelOpt,
    DrainTimeoutOpt,
    DryRunOpt,
    EndpointOpt,
    EngineArgsOpt,
    FailureThresholdOpt,
    ForegroundOpt,
    GpusOpt,
    GpusPerWorkerOpt,
    HeaderTimeoutOpt,
    HostOpt,
    InitialDelayOpt,
    MaxAttemptsOpt,
    MaxBodySizeOpt,
    MaxConnectionsOpt,
    MaxQueueOpt,
    MaxStartFailuresOpt,
    MaxWorkersOpt,
    MinWorkersOpt,
    ModelOpt,
    NodeControlKeyOpt,
    OtelCollectorEndpointOpt,
    PolicyOpt,
    PortOpt,
    PrefixBalanceOpt,
    PrefixMinMatchOpt,
    PrefixTreeCharsOpt,
    ProbeIntervalOpt,
    ProbeTimeoutOpt,
    ProvisionerOpt,
    QueueTimeoutOpt,
    QueueTrackingWindowOpt,
    ReadinessPathOpt,
    ReplaceAfterOpt,
    ReplicasOpt,
    SpecOpt,
    TargetQpsPerReplicaOpt,
    TimeoutOpt,
    UpscaleDelayOpt,
    UpstreamTimeoutOpt,
    WaitOpt,
    WatchOpt,
    WorkerCapacityOpt,
    WorkerCommandOpt,
    WorkersCeilingOpt,
)
from flockctl.console import emit_json, fail, say
from flockctl.exitcodes import ExitCode
from flockctl.net import client_url
from flockctl.state import running_daemon, state_dir
from flockctl.tui.launch import run_dashboard


def up(
    spec: SpecOpt = None,
    name: DeploymentNameOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    provisioner: ProvisionerOpt = None,
    model: ModelOpt = None,
    engine_args: EngineArgsOpt = None,
    draft_model: DraftModelOpt = None,
    worker_command: WorkerCommandOpt = None,
    endpoint: EndpointOpt = None,
    min_workers: MinWorkersOpt = None,
    max_workers: MaxWorkersOpt = None,
    replicas: ReplicasOpt = None,
    autoscaler: AutoscalerOpt = None,
    target_qps_per_replica: TargetQpsPerReplicaOpt = None,
    autoscale_up: AutoscaleUpOpt = None,
    autoscale_down: AutoscaleDownOpt = None,
    queue_tracking_window: QueueTrackingWindowOpt = None,
    upscale_delay: UpscaleDelayOpt = None,
    downscale_delay: DownscaleDelayOpt = None,
    policy: PolicyOpt = None,
    prefix_min_match: PrefixMinMatchOpt = None,
    prefix_balance: PrefixBalanceOpt = None,
    prefix_tree_chars: PrefixTreeCharsOpt = None,
    worker_capacity: WorkerCapacityOpt = None,
    queue_timeout: QueueTimeoutOpt = None,
    max_queue: MaxQueueOpt = None,
    max_attempts: MaxAttemptsOpt = None,
    upstream_timeout: UpstreamTimeoutOpt = None,
    max_body_size: MaxBodySizeOpt = None,
    header_timeout: HeaderTimeoutOpt = None,
    max_connections: MaxConnectionsOpt = None,
    api_key: ApiKeyOpt = None,
    node_control_key: NodeControlKeyOpt = None,
    otel_collector_endpoint: OtelCollectorEndpointOpt = None,
    readiness_path: ReadinessPathOpt = None,
    initial_delay: InitialDelayOpt = None,
    probe_interval: ProbeIntervalOpt = None,
    probe_timeout: ProbeTimeoutOpt = None,
    failure_threshold: FailureThresholdOpt = None,
    drain_timeout: DrainTimeoutOpt = None,
    max_start_failures: MaxStartFailuresOpt = None,
    replace_after: ReplaceAfterOpt = None,
    workers_ceiling: WorkersCeilingOpt = None,
    gpus: GpusOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    cuda_mps: CudaMpsOpt = None,
    foreground: ForegroundOpt = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 60.0,
    watch: WatchOpt = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a deployment's daemon (balancer + autoscaler) in the background.

    Workers run flockctl's engine serving --model (demo unless told otherwise), or
    --worker-command, or are the --endpoint servers that already run.

    Examples:

      flockctl up --model Qwen/Qwen2.5-0.5B-Instruct --min-workers 2

      flockctl up --model demo --engine-args '--scheduler fcfs'

      flockctl up --worker-command 'vllm serve Qwen/Qwen2.5-0.5B --port {port}' --max-workers 4

      flockctl up --endpoint http://10.0.0.5:8000 --endpoint http://10.0.0.6:8000

      flockctl up service.yaml --port 8080

      flockctl up examples/vllm.yaml --dry-run
    """
    probe = {
        k: v
        for k, v in {
            "path": readiness_path,
            "initial_delay_seconds": initial_delay,
            "interval_seconds": probe_interval,
            "timeout_seconds": probe_timeout,
            "failure_threshold": failure_threshold,
        }.items()
        if v is not None
    }
    flags: dict[str, Any] = {
        "name": name,
        "host": host,
        "port": port,
        "provisioner": provisioner,
        **worker_flags(
            model,
            engine_args,
            draft_model,
            worker_command,
            endpoint,
            min_workers,
            max_workers,
            replicas,
            autoscaler,
            target_qps_per_replica,
        ),
        "autoscale_up": autoscale_up,
        "autoscale_down": autoscale_down,
        "queue_tracking_window": queue_tracking_window,
        "upscale_delay": upscale_delay,
        "downscale_delay": downscale_delay,
        "policy": policy,
        "prefix_min_match": prefix_min_match,
        "prefix_balance": prefix_balance,
        "prefix_tree_chars": prefix_tree_chars,
        "worker_capacity": worker_capacity,
        "queue_timeout": queue_timeout,
        "max_queue": max_queue,
        "max_attempts": max_attempts,
        "upstream_timeout": upstream_timeout,
        "max_body_size": max_body_size,
        "header_timeout": header_timeout,
        "max_connections": max_connections,
        "api_key": api_key,
        "node_control_key": node_control_key,
        "otel_collector_endpoint": otel_collector_endpoint,
        "drain_timeout": drain_timeout,
        "max_start_failures": max_start_failures,
        "replace_after": replace_after,
        "workers_ceiling": workers_ceiling,
        "gpus": gpus,
        "gpus_per_worker": gpus_per_worker,
        "cuda_mps": cuda_mps,
        "probe": probe or None,
        "workdir": os.getcwd(),
    }
    names = {"endpoints": "--endpoint", "probe": "probe flags"}
    target = name or _spec_name(spec) or "default"
    check_name(target)
    if dry_run:
        if watch or foreground:
            fail(
                f"--dry-run cannot be used with {'--dashboard' if watch else '--foreground'}",
                ExitCode.USAGE,
            )
        _dry_run(spec, flags, names, as_json)
        return
    if watch and (as_json or foreground or not wait):
        clash = "--json" if as_json else "--foreground" if foreground else "--no-wait"
        fail(f"--dashboard cannot be used with {clash}", ExitCode.USAGE)
    existing = running_daemon(target)
    if existing is not None:
        say(
            f'deployment "{target}" is already running at {existing.endpoint}'
            f" (pid {existing.pid}); stop it with flockctl down --name {target}"
        )
        _print_up(target, existing.endpoint, existing.pid, state_dir(target), as_json, True)
        if watch:
            run_dashboard(target, None, False, 1.0, offer_start=False)
        return
    cfg = resolve_or_exit(spec, flags, names)
    if cfg.provisioner == "skypilot":
        _check_task(cfg, spec)
    _check_gpus(cfg)
    directory = state_dir(cfg.name)

    from flockctl import daemon

    try:
        daemon.check_port(cfg.host, cfg.port)
    except ClientError as exc:
        fail(str(exc), exc.code)
    daemon.write_config(directory, cfg.model_dump(mode="json"))
    _build_demo_first(cfg, wait and not foreground)

    if foreground:
        from flockctl.server.__main__ import run, setup_logging

        setup_logging()
        raise typer.Exit(run(cfg, directory))

    proc = daemon.spawn(cfg.name, directory)
    if not wait:
        say(
            f'deployment "{cfg.name}" is starting (pid {proc.pid}); check it with'
            f" flockctl status --name {cfg.name}"
        )
        _print_up(cfg.name, client_url(cfg.host, cfg.port), proc.pid, directory, as_json, False)
        return
    try:
        record = daemon.wait_until_up(proc, directory, timeout)
    except ClientError as exc:
        fail(str(exc), exc.code)
    workers = cfg.initial_target()
    serving = f" (engine, model {cfg.model})" if cfg.model is not None else ""
    say(
        f'deployment "{cfg.name}" is up at {record.endpoint} (pid {record.pid});'
        f" {workers} worker{'s' if workers != 1 else ''} starting{serving}; watch them with"
        f" flockctl status{'' if cfg.name == 'default' else ' --name ' + cfg.name}"
    )
    _print_up(cfg.name, record.endpoint, record.pid, directory, as_json, False)
    if watch:
        run_dashboard(cfg.name, None, False, 1.0, offer_start=False)


def _build_demo_first(cfg: Any, in_front: bool) -> None:
    """Pay for the demo's one-time build here, with a progress bar, rather than behind STARTING
    workers (see flockctl/demo_first.py); ``--no-wait`` and ``--foreground`` leave it to them."""
    from flockctl import demo_first

    if not (in_front and demo_first.serves_demo(cfg) and demo_first.demo_missing()):
        return
    say(
        "building the demo model once before starting (about 2-3 minutes on two CPU cores;"
        " later starts load it in seconds)"
    )
    if demo_first.build_demo() != 0:
        fail(
            "the demo model could not be built (see above); `flockctl engine demo` retries it",
            ExitCode.ERROR,
        )


def worker_flags(
    model: str | None,
    engine_args: str | None,
    draft_model: list[str] | None,
    worker_command: str | None,
    endpoint: list[str] | None,
    min_workers: int | None,
    max_workers: int | None,
    replicas: int | None,
    autoscaler: str | None,
    target_qps_per_replica: float | None,
) -> dict[str, Any]:
    """The flags that say what runs on the workers and how many: ``up`` and ``update`` take
    the same ones, as config fields (None: not given)."""
    return {
        "worker_command": worker_command,
        "model": model,
        "engine_args": engine_args,
        "draft_models": draft_model or None,
        "endpoints": endpoint or None,
        "min_workers": min_workers,
        "max_workers": max_workers,
        "replicas": replicas,
        "autoscaler": autoscaler,
        "target_qps_per_replica": target_qps_per_replica,
    }


def resolve_or_exit(spec: Path | None, flags: dict[str, Any], names: dict[str, str]) -> Any:
    """The config of ``spec`` and ``flags`` (see ``flockctl.server.spec_file.resolve``); a
    config error is each problem on its own line and exit 2."""
    from flockctl.server.config import ConfigError
    from flockctl.server.spec_file import resolve

    try:
        return resolve(spec, flags, names)
    except ConfigError as exc:
        for problem in exc.problems:
            say(problem)
        raise typer.Exit(int(ExitCode.USAGE)) from None


def _check_gpus(cfg: Any) -> None:
    """GPU flags on a machine without those GPUs are a usage error here, not workers that
    wait for GPUs that never come."""
    if cfg.provisioner != "local":
        return
    from flockctl.server.gpus import PlacementError, placement_for

    try:
        placement_for(cfg)
    except PlacementError as exc:
        fail(str(exc), ExitCode.USAGE)


def _check_task(cfg: Any, spec: Path | None) -> None:
    """Let SkyPilot parse the task now, so a bad one is a usage error here, not a worker that
    fails minutes later."""
    from flockctl.server.provisioners.sky_sdk import SkyError, describe

    try:
        describe(cfg.task, cfg.workdir)
    except SkyError as exc:
        _sky_failed(spec, exc)


def _sky_failed(spec: Path | None, exc: Exception) -> NoReturn:
    """SkyPilot could not parse the SPEC's task: it is not installed, or it refused the task."""
    from flockctl.server.provisioners.sky_sdk import SkyMissing

    if isinstance(exc, SkyMissing):
        fail(f"{spec} is a SkyPilot task: {exc}", ExitCode.ERROR)
    fail(f"{spec}: SkyPilot refused the task: {exc}", ExitCode.USAGE)


def _dry_run(
    spec: Path | None, flags: dict[str, Any], names: dict[str, str], as_json: bool
) -> None:
    from flockctl.render import render_plan
    from flockctl.server.deployment import plan
    from flockctl.server.provisioners.sky_sdk import SkyError

    cfg = resolve_or_exit(spec, flags, names)
    try:
        resolved = plan(cfg)
    except SkyError as exc:
        _sky_failed(spec, exc)
    if as_json:
        emit_json(resolved, indent=2)
    else:
        print(render_plan(resolved))


def _spec_name(spec: Path | None) -> str | None:
    """The deployment name a SPEC sets, if it can be read at all (errors come later)."""
    if spec is None:
        return None
    from flockctl.server.config import ConfigError
    from flockctl.server.spec_file import load_spec

    try:
        values, _ = load_spec(spec)
    except ConfigError:
        return None
    found = values.get("name")
    return found if isinstance(found, str) else None


def _print_up(
    name: str, endpoint: str, pid: int, directory: Path, as_json: bool, already: bool
) -> None:
    if as_json:
        emit_json(
            {
                "name": name,
                "endpoint": endpoint,
                "pid": pid,
                "state_dir": str(directory),
                "already_running": already,
            }
        )
    else:
        print(endpoint)
