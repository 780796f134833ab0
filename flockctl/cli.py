"""The ``flockctl`` command line.

stdout carries data (an endpoint, a table, JSON); diagnostics go to stderr as one line starting
with ``flockctl:``; exit codes are those of ``flockctl.exitcodes.ExitCode``. The scripting
commands (``up``, ``status``, ``logs``, ``down``) never import textual or torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from flockctl import __version__
from flockctl.client import ClientError
from flockctl.commands.down import down
from flockctl.commands.logs import logs
from flockctl.commands.status import status
from flockctl.console import fail, say
from flockctl.engine.cli import engine_app
from flockctl.exitcodes import ExitCode, exit_codes_help
from flockctl.state import running_daemon, state_dir, valid_name
from flockctl.tui.launch import dashboard, run_dashboard

app = typer.Typer(
    name="flockctl",
    help="Turn LLM inference servers into one production endpoint: balancing, retries,"
    " autoscaling and status, from the terminal.\n\n" + exit_codes_help(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(engine_app, name="engine")

NameOpt = Annotated[
    str, typer.Option("--name", "-n", help="Deployment name.", envvar="FLOCKCTL_NAME")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def check_name(name: str) -> None:
    if not valid_name(name):
        fail(
            f"invalid deployment name {name!r}: use letters, digits, '_', '.', '-' (max 63)",
            ExitCode.USAGE,
        )


def version_callback(value: bool) -> None:
    if value:
        print(f"flockctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """flockctl: a control plane for serving large language models."""


W, A, B, P, D = "Workers", "Autoscaling", "Balancing", "Readiness probe", "Daemon"


@app.command()
def up(
    spec: Annotated[
        Path | None,
        typer.Argument(
            help="Deployment YAML: a SkyPilot task (each worker is a cluster launched from"
            " it), SkyServe's `service:` section (readiness_probe, replicas, replica_policy,"
            " load_balancing_policy, ports) and/or a `flockctl:` section. Flags override it.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "-n",
            help="Deployment name [default: default].",
            envvar="FLOCKCTL_NAME",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Bind address [default: 127.0.0.1].", rich_help_panel=D, show_default=False
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Balancer port [default: 3000].", rich_help_panel=D, show_default=False),
    ] = None,
    provisioner: Annotated[
        str | None,
        typer.Option(
            help="local (worker processes here), skypilot (a cluster per worker, from the SPEC's"
            " SkyPilot task) or static (the --endpoint servers) [default: skypilot when the SPEC"
            " has resources or run, static with --endpoint, else local].",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model each local worker serves with flockctl's engine: a Hugging Face hub id,"
            " a local path, or 'demo' (built locally, no download) [default: demo when neither"
            " --worker-command nor --endpoint is given].",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    engine_args: Annotated[
        str | None,
        typer.Option(
            help="Extra flags for `flockctl engine serve`, as one string split like a shell"
            " would, e.g. --engine-args '--scheduler fcfs --device cpu'.",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    draft_model: Annotated[
        list[str] | None,
        typer.Option(
            help="A draft model each engine worker speculates with (SpecInfer token trees);"
            " repeat for several. It must share --model's tokenizer; with --model demo,"
            " 'demo' is the demo's draft.",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    worker_command: Annotated[
        str | None,
        typer.Option(
            help="Command that starts one worker instead of flockctl's engine (any OpenAI"
            " server); {port} is its port, {worker_id} its id, also in its environment as"
            " $PORT and $FLOCKCTL_WORKER_ID. E.g. 'vllm serve MODEL --port {port}'. Not with"
            " --model.",
            rich_help_panel=W,
        ),
    ] = None,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(
            help="URL of a server that already runs (repeatable): static workers.",
            rich_help_panel=W,
        ),
    ] = None,
    min_workers: Annotated[
        int | None, typer.Option(help="[default: 1]", rich_help_panel=A, show_default=False)
    ] = None,
    max_workers: Annotated[
        int | None, typer.Option(help="[default: 2]", rich_help_panel=A, show_default=False)
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(help="Fixed number of workers (sets --autoscaler fixed).", rich_help_panel=A),
    ] = None,
    autoscaler: Annotated[
        str | None,
        typer.Option(
            help="qlrm (queue-length running mean), request-rate (SkyServe's"
            " target_qps_per_replica) or fixed [default: qlrm].",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    target_qps_per_replica: Annotated[
        float | None,
        typer.Option(
            help="Requests per second one worker should take (sets --autoscaler request-rate).",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    autoscale_up: Annotated[
        float | None,
        typer.Option(
            help="Scale up when the queue-length running mean per worker passes this [default: 7].",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    autoscale_down: Annotated[
        float | None,
        typer.Option(
            help="Scale down when it falls below this [default: 4].",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    queue_tracking_window: Annotated[
        float | None,
        typer.Option(
            help="Seconds the running mean covers [default: 600].",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    upscale_delay: Annotated[
        float | None,
        typer.Option(
            help="Seconds above autoscale-up before scaling up [default: 30].",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    downscale_delay: Annotated[
        float | None,
        typer.Option(
            help="Seconds below autoscale-down before scaling down [default: 120].",
            rich_help_panel=A,
            show_default=False,
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="least-connection, round-robin or power-of-two [default: least-connection].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    worker_capacity: Annotated[
        int | None,
        typer.Option(
            help="Concurrent requests per worker; more wait in the queue [default: 30].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    queue_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request may wait for a worker before 503 [default: 60].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(
            help="Requests that may wait; more get 429 [default: 1000].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            help="Attempts per request on connect errors, timeouts and 502/503/504 before the"
            " first byte (a 500 is retried once at most) [default: 3].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    upstream_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to wait for a worker's next byte, the first included; before the first"
            " byte reaches the client the request is retried on another worker, after it the"
            " answer ends, and the worker leaves the rotation until a probe passes [default: 60].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    max_body_size: Annotated[
        str | None,
        typer.Option(
            help="Largest request body: a byte count or a number with K, M or G (binary);"
            " a larger one is refused with 413 before it is read [default: 32M].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    header_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a client has to send a whole request head, then 408 and the connection"
            " closes; its body gets 60 more [default: 10].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            help="Client connections held at once; more are answered 503 and closed (fewer when"
            " the open-file limit needs a reserve for probes and workers) [default: 10000].",
            rich_help_panel=B,
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on proxied routes.",
            rich_help_panel=B,
            envvar="FLOCKCTL_API_KEY",
        ),
    ] = None,
    node_control_key: Annotated[
        str | None,
        typer.Option(
            help="Admin token for /-/ routes [default: generated into daemon.json].",
            rich_help_panel=B,
            envvar="FLOCKCTL_NODE_CONTROL_KEY",
            show_default=False,
        ),
    ] = None,
    readiness_path: Annotated[
        str | None,
        typer.Option(
            help="Path probed on each worker [default: /health].",
            rich_help_panel=P,
            show_default=False,
        ),
    ] = None,
    initial_delay: Annotated[
        float | None,
        typer.Option(
            help="Seconds a new worker may take to become READY [default: 1200].",
            rich_help_panel=P,
            show_default=False,
        ),
    ] = None,
    probe_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between probes [default: 2].", rich_help_panel=P, show_default=False
        ),
    ] = None,
    probe_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a probe may take [default: 15].", rich_help_panel=P, show_default=False
        ),
    ] = None,
    failure_threshold: Annotated[
        int | None,
        typer.Option(
            help="Failed probes in a row before NOT_READY [default: 3].",
            rich_help_panel=P,
            show_default=False,
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds in-flight requests get to finish when a worker is removed [default: 30].",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    max_start_failures: Annotated[
        int | None,
        typer.Option(
            help="Workers in a row that fail before READY before launching stops [default: 3].",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    replace_after: Annotated[
        float | None,
        typer.Option(
            help="Seconds a worker may stay NOT_READY before it is drained, stopped and replaced"
            " (a static endpoint stays out of rotation instead) [default: 180].",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    workers_ceiling: Annotated[
        int | None,
        typer.Option(
            help="The most workers any bound may ask for, here and through the admin API"
            " [default: 64].",
            rich_help_panel=W,
            show_default=False,
        ),
    ] = None,
    foreground: Annotated[
        bool,
        typer.Option(
            help="Run the daemon attached to this terminal, logging to stderr.", rich_help_panel=D
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="Wait until the daemon answers.", rich_help_panel=D)
    ] = True,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the daemon.", rich_help_panel=D)
    ] = 60.0,
    watch: Annotated[
        bool,
        typer.Option(
            "--dashboard",
            help="Once it is up, watch it full-screen (flockctl dashboard).",
            rich_help_panel=D,
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the resolved plan (provisioner, workers, autoscaler, probe, balancer,"
            " resources per worker) and start nothing; needs no cloud credentials.",
        ),
    ] = False,
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
        "autoscale_up": autoscale_up,
        "autoscale_down": autoscale_down,
        "queue_tracking_window": queue_tracking_window,
        "upscale_delay": upscale_delay,
        "downscale_delay": downscale_delay,
        "policy": policy,
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
        "drain_timeout": drain_timeout,
        "max_start_failures": max_start_failures,
        "replace_after": replace_after,
        "workers_ceiling": workers_ceiling,
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
    cfg = _resolve_or_exit(spec, flags, names)
    if cfg.provisioner == "skypilot":
        _check_task(cfg, spec)
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
        _print_up(cfg.name, f"http://{cfg.host}:{cfg.port}", proc.pid, directory, as_json, False)
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


def _resolve_or_exit(spec: Path | None, flags: dict[str, Any], names: dict[str, str]) -> Any:
    from flockctl.server.config import ConfigError, resolve

    try:
        return resolve(spec, flags, names)
    except ConfigError as exc:
        for problem in exc.problems:
            say(problem)
        raise typer.Exit(int(ExitCode.USAGE)) from None


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

    cfg = _resolve_or_exit(spec, flags, names)
    try:
        resolved = plan(cfg)
    except SkyError as exc:
        _sky_failed(spec, exc)
    if as_json:
        print(json.dumps(resolved, indent=2))
    else:
        print(render_plan(resolved))


def _spec_name(spec: Path | None) -> str | None:
    """The deployment name a SPEC sets, if it can be read at all (errors come later)."""
    if spec is None:
        return None
    from flockctl.server.config import ConfigError, load_spec

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
        print(
            json.dumps(
                {
                    "name": name,
                    "endpoint": endpoint,
                    "pid": pid,
                    "state_dir": str(directory),
                    "already_running": already,
                }
            )
        )
    else:
        print(endpoint)


app.command()(dashboard)
app.command()(status)
app.command()(logs)
app.command()(down)


def main() -> None:
    app()
