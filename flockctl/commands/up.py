"""``flockctl up``: resolve the deployment from a SPEC and flags, check it, then start its daemon
(in the background, or attached with ``--foreground``), or only print the plan (``--dry-run``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer

from flockctl.client import ClientError
from flockctl.commands.common import JsonOpt, check_name
from flockctl.commands.config_flags import config_flags, flag_names, takes_config_flags
from flockctl.commands.up_options import (
    DryRunOpt,
    ForegroundOpt,
    SpecOpt,
    TimeoutOpt,
    WaitOpt,
    WatchOpt,
)
from flockctl.console import emit_json, fail, say
from flockctl.exitcodes import ExitCode
from flockctl.net import client_url
from flockctl.state import running_daemon, state_dir
from flockctl.tui.launch import run_dashboard


@takes_config_flags()
def up(
    spec: SpecOpt = None,
    flags: dict[str, Any] | None = None,
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
    flags = {**(flags or {}), "workdir": os.getcwd()}
    names = flag_names(config_flags())
    target = flags["name"] or _spec_name(spec) or "default"
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
    from flockctl.server.dry_run import plan
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
