"""One deployment: config, workers, provisioner, autoscaler, prober, engine stats, metrics, wired.

``Deployment.start()`` and ``stop()`` run inside the app's lifespan; ``snapshot()`` is the status
document that the CLI, the dashboard and scripts all read from ``GET /-/status``.

A deployment has a version: 1 at start, the next one for each update (``start_update``). The
config of each version is kept in the state dir beside the first (``config.v1.json``,
``config.v2.json``, ...); ``config.json`` follows the version that serves. A daemon started after
the last one was killed takes its versions up (``flockctl.server.versions``): the version that
serves and its config, each re-adopted worker's version, and an update it cut short.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from flockctl import __version__
from flockctl.net import client_url
from flockctl.schema import SNAPSHOT_SCHEMA_VERSION, ProbeView, StatusSnapshot
from flockctl.server import update_plan, versions
from flockctl.server.autoscaler import (
    AutoscalerPolicy,
    FixedPolicy,
    QueueLengthRunningMean,
    RequestRate,
    SpotPlan,
)
from flockctl.server.config import DeploymentConfig, ProbeConfig
from flockctl.server.controller import Controller, WorkerGroup
from flockctl.server.engine_stats import StatsPuller
from flockctl.server.gpus import placement_for
from flockctl.server.group_update import what_runs
from flockctl.server.groups import Groups
from flockctl.server.limits import describe as describe_limits
from flockctl.server.metrics import GaugeState, Metrics
from flockctl.server.policies import PolicySettings, make_policy
from flockctl.server.pool import WorkerPool
from flockctl.server.prober import Prober, probe_client
from flockctl.server.provisioners import LocalProvisioner, Provisioner, StaticProvisioner
from flockctl.server.update import (
    UPDATABLE,
    GroupStep,
    Mode,
    RecordedUpdate,
    Rollout,
    Update,
    UpdateRefused,
)
from flockctl.server.workers import LIVE, Worker, WorkerState

log = logging.getLogger("flockctl.deployment")


def make_autoscaler(cfg: DeploymentConfig) -> AutoscalerPolicy:
    if cfg.provisioner == "static":
        return FixedPolicy(len(cfg.endpoints), min_workers=0)
    if cfg.autoscaler == "fixed":
        return FixedPolicy(cfg.replicas or 0, cfg.min_workers, cfg.max_workers)
    if cfg.autoscaler == "request-rate":
        assert cfg.target_qps_per_replica is not None  # the config refuses it otherwise
        return RequestRate(
            cfg.min_workers,
            cfg.max_workers,
            cfg.target_qps_per_replica,
            upscale_delay=cfg.upscale_delay,
            downscale_delay=cfg.downscale_delay,
        )
    return QueueLengthRunningMean(
        cfg.min_workers,
        cfg.max_workers,
        autoscale_up=cfg.autoscale_up,
        autoscale_down=cfg.autoscale_down,
        window=cfg.queue_tracking_window,
        upscale_delay=cfg.upscale_delay,
        downscale_delay=cfg.downscale_delay,
    )


def make_provisioner(cfg: DeploymentConfig, state_dir: Path) -> Provisioner:
    if cfg.provisioner == "static":
        return StaticProvisioner.from_config(cfg)
    if cfg.provisioner == "skypilot":
        return make_skypilot(cfg, state_dir)
    # With groups every worker runs its group's command; the first group's is the default.
    own = cfg.group_config(cfg.groups[0]) if cfg.groups else cfg
    command = own.local_command()
    assert command is not None
    cwd = Path(cfg.workdir) if cfg.workdir else None
    gpus = placement_for(cfg)
    return LocalProvisioner(
        command, state_dir, cwd=cwd, model=own.model, gpus=gpus, cuda_mps=cfg.cuda_mps
    )


def make_spot_plan(cfg: DeploymentConfig) -> SpotPlan | None:
    """How SkyPilot workers split between spot and on-demand machines; None when they do not
    (no spot, or spot without on-demand fallback: every worker is what the task asks for)."""
    fallback = cfg.base_ondemand_fallback_replicas or cfg.dynamic_ondemand_fallback
    if not (cfg.uses_spot() and fallback):
        return None
    return SpotPlan(cfg.base_ondemand_fallback_replicas, cfg.dynamic_ondemand_fallback)


def make_skypilot(cfg: DeploymentConfig, state_dir: Path) -> Provisioner:
    from flockctl.server.provisioners.sky_sdk import make_sdk
    from flockctl.server.provisioners.skypilot import SkyPilotProvisioner, group_launches

    # With groups each worker runs its group's task; the first group's is the default.
    own = cfg.group_config(cfg.groups[0]) if cfg.groups else cfg
    assert own.task is not None and own.worker_port is not None  # the config refuses it otherwise
    return SkyPilotProvisioner(
        own.task,
        cfg.name,
        own.worker_port,
        state_dir,
        make_sdk(),
        groups=group_launches(cfg),
        base_dir=cfg.workdir,
        spot=own.uses_spot(),
        spot_plan=make_spot_plan(cfg),
        launch_attempts=cfg.launch_attempts,
        launch_backoff=cfg.launch_backoff,
        status_interval=cfg.status_interval,
    )


def resumed(given: DeploymentConfig, recorded: DeploymentConfig) -> DeploymentConfig:
    """The config a restarted daemon runs: what runs on the workers (and their groups) as the
    recorded version has it, the daemon's own settings as given now."""
    return given.model_copy(update={k: getattr(recorded, k) for k in UPDATABLE | {"groups"}})


class Deployment:
    def __init__(self, cfg: DeploymentConfig, state_dir: Path, token: str) -> None:
        #: The versions a killed daemon left, taken up at start (None: this is version 1).
        self.restored = versions.restore(state_dir)
        if self.restored is not None:
            given = cfg
            cfg = resumed(given, self.restored.configs[self.restored.version])
            if cfg != given:
                log.warning(
                    "version %d of this deployment serves: its workers and their config are"
                    " kept (the config given differs; flockctl update changes it)",
                    self.restored.version,
                )
        self.cfg = cfg
        self.state_dir = state_dir
        self.token = token
        self.started_at = time.time()
        routing = PolicySettings(
            cfg.prefix_min_match,
            cfg.prefix_balance,
            cfg.prefix_tree_chars,
            latency_decay=cfg.latency_decay,
            latency_probe_interval=cfg.latency_probe_interval,
        )
        self.pool = WorkerPool(make_policy(cfg.policy, routing), cfg.worker_capacity, cfg.max_queue)
        self.provisioner = make_provisioner(cfg, state_dir)
        self.prober: Prober | None = None
        self.groups = Groups(cfg, self.pool, make_autoscaler, self._make_controller)
        #: The autoscaler of the deployment (without groups) or of its first group.
        self.policy = self.groups.primary.policy
        self.metrics = Metrics(self._gauges)
        self._probe_session: httpx.AsyncClient | None = None
        self.stats: StatsPuller | None = None
        #: The deployment's own controller (of its first group, with groups), once started.
        self.controller: Controller | None = None
        self._sampler: asyncio.Task[None] | None = None
        #: The version that serves, the config of every version, and the versions that served
        #: in turn (``flockctl update --rollback`` goes back to the one before the last).
        self.version = 1
        self.configs: dict[int, DeploymentConfig] = {1: cfg}
        self.served: list[int] = [1]
        #: The running update, else the last one.
        self.update: Update | Rollout | RecordedUpdate | None = None
        #: Each group's version before the running rollout (what a restart goes back to).
        self._before: dict[str, int] = {}
        self._group_stops: set[asyncio.Task[None]] = set()
        if self.restored is not None:
            self.version = self.restored.version
            self.served = self.restored.served
            self.configs = {v: resumed(cfg, c) for v, c in self.restored.configs.items()}

    @property
    def endpoint(self) -> str:
        return client_url(self.cfg.host, self.cfg.port)

    async def start(self) -> None:
        self._probe_session = probe_client()
        self.prober = Prober(self.pool, self.cfg.probe, self._probe_session)
        self.stats = StatsPuller(self.pool, self.cfg.probe, self._probe_session)
        restored = self.restored
        for controller in self.groups:
            controller.prober = self.prober
            if restored is not None:
                controller.version = restored.groups.get(group_name(controller), self.version)
            controller.start()
        self.controller = self.groups.primary
        if restored is None:
            versions.forget(self.state_dir)  # an earlier deployment's
            self._write_config(1, self.cfg, current=False)
        else:
            self._resume(restored)
        self.pool.on_transition(lambda _worker, _old: self._save_versions())
        self._save_versions()
        self.stats.start()
        self._sampler = asyncio.create_task(self._sample())

    def _resume(self, restored: versions.Versions) -> None:
        """Give each re-adopted worker its recorded version, and end an update the restart cut
        short: the new version's workers drain, the old version serves on."""
        for worker in self.pool:
            version = restored.workers.get(worker.id)
            worker.version = version if version is not None else self.controller_of(worker).version
        self._write_config(self.version, self.cfg, current=True)
        view = restored.update
        if view is None:
            return
        drained = 0
        if view["state"] == "running":
            for controller in self.groups:
                for worker in controller.others():
                    controller.drain(worker)
                    drained += 1
        self.update = RecordedUpdate(view, drained)
        if view["state"] == "running":
            log.warning("update %s: %s", view["id"], self.update.reason)

    def _save_versions(self) -> None:
        """Record the versions (``versions.json``): at start, when an update starts or ends,
        and when a worker changes state (its version joins or leaves the record)."""
        update = self.update
        if isinstance(update, Rollout) and update.running:
            running = self._before
        else:
            running = {group_name(c): c.serving_version for c in self.groups}
        # A worker an update carried over serves the old version too: a restart keeps it.
        kept = update.recorded_versions() if update is not None else {}
        record = versions.Versions(
            version=self.version,
            served=self.served,
            groups=running,
            workers={w.id: kept.get(w.id, w.version) for w in self.pool if w.state in _RECORDED},
            update=update.to_dict() if update is not None else None,
        )
        try:
            versions.save(self.state_dir, record)
        except OSError as exc:  # a full disk must not stop a worker's state change
            log.error("cannot record the versions in %s: %s", self.state_dir, exc)

    def _make_controller(
        self, group: WorkerGroup | None, own: DeploymentConfig, policy: AutoscalerPolicy, **kw: Any
    ) -> Controller:
        """One group's controller (the prober is given at start, when it exists)."""
        controller = Controller(
            self.pool,
            self.provisioner,
            policy,
            self.prober,  # type: ignore[arg-type]
            drain_timeout=self.cfg.drain_timeout,
            max_start_failures=self.cfg.max_start_failures,
            replace_after=self.cfg.replace_after,
            group=group,
            **kw,
        )
        if self.prober is not None:  # a group made at run time starts at once
            controller.start()
        return controller

    # -- updates -------------------------------------------------------------------------------

    def start_update(
        self,
        new_cfg: DeploymentConfig | None,
        mode: Mode = "rolling",
        max_surge: int = 1,
        timeout: float = 600.0,
        rollback: bool = False,
        group: str | None = None,
    ) -> Update | Rollout:
        """Move the deployment to its next version, running ``new_cfg`` (with ``rollback``, the
        config of the version before the one serving; with ``group``, that group's definition
        alone); returns at once, the controllers' loops carry it out. With groups, each group
        that changes moves in turn (``flockctl.server.group_update``). Raises ``UpdateRefused``
        saying why it cannot start."""
        controller = self.controller
        if controller is None:
            raise UpdateRefused("the deployment is still starting; try again in a moment")
        if self.update is not None and self.update.running:
            raise UpdateRefused(
                f"update {self.update.id} to version {self.update.new} is still running;"
                " wait for it (flockctl status) before starting another"
            )
        rollback_to: int | None = None
        if rollback:
            if len(self.served) < 2:
                raise UpdateRefused(
                    f"version {self.version} is the first this deployment ran; there is no"
                    " earlier version to go back to"
                )
            rollback_to = self.served[-2]
            new_cfg = self.configs[rollback_to]
        if new_cfg is None:
            raise UpdateRefused("config: give the new version's config", 422)
        taken = {group_name(c) for c in self.groups}
        new_cfg, steps = update_plan.resolve(self.cfg, new_cfg, group, taken)
        new = max(self.configs) + 1
        self.configs[new] = new_cfg
        self._write_config(new, new_cfg, current=False)
        if steps:
            return self._start_rollout(new, new_cfg, steps, mode, max_surge, timeout, rollback_to)
        self._run_config(controller, new_cfg)
        self.update = Update(
            controller,
            f"u{new}-{secrets.token_hex(3)}",
            self.version,
            new,
            mode,
            max_surge,
            timeout,
            on_end=self._update_ended,
            rollback_to=rollback_to,
        )
        self._save_versions()
        return self.update

    def _start_rollout(
        self,
        new: int,
        new_cfg: DeploymentConfig,
        steps: list[GroupStep],
        mode: Mode,
        max_surge: int,
        timeout: float,
        rollback_to: int | None,
    ) -> Rollout:
        old_cfg = self.cfg
        rollout = Rollout(
            f"u{new}-{secrets.token_hex(3)}",
            self.version,
            new,
            steps,
            begin=lambda step: self._begin_group(rollout, step, old_cfg, new_cfg),
            on_end=lambda ended: self._rollout_ended(ended, old_cfg, new_cfg),
            mode=mode,
            max_surge=max_surge,
            timeout=timeout,
            rollback_to=rollback_to,
        )
        #: What a daemon restarted before the rollout ends goes back to.
        self._before = {group_name(c): c.version for c in self.groups}
        self.update = rollout
        rollout.start()
        self._save_versions()
        return rollout

    def _begin_group(
        self,
        rollout: Rollout,
        step: GroupStep,
        old_cfg: DeploymentConfig,
        new_cfg: DeploymentConfig,
    ) -> Update | None:
        """Start one group's part of ``rollout``; None when it is done at once (a removal)."""
        groups = self.groups
        if step.change == "remove":
            gone = groups.named_group(step.name)
            if gone is not None:
                groups.remove(gone)
                self._stop_group(gone)
            return None
        declared = next(g for g in new_cfg.groups if g.name == step.name)
        own = new_cfg.group_config(declared)
        if step.change == "add":
            controller = groups.add_group(declared, own)
            old = 0  # no version of it served before
        else:
            found = groups.named_group(step.name)
            assert found is not None  # grouped_config checked it runs
            controller, old = found, found.version
            was = next(g for g in old_cfg.groups if g.name == step.name)
            was_own = groups.config_of(controller)
            groups.redefine(controller, declared, own)
            self._scale_by(controller, own)

        def ended(update: Update) -> None:
            if update.state != "succeeded":
                if step.change == "add":
                    groups.remove(controller)
                    self._stop_group(controller)
                else:
                    groups.redefine(controller, was, was_own)
                    self._scale_by(controller, was_own)
            rollout.part_ended(update)

        return Update(
            controller,
            f"{rollout.id}-{step.name}",
            old,
            rollout.new,
            rollout.mode,
            rollout.max_surge,
            rollout.timeout,
            on_end=ended,
        )

    def _stop_group(self, controller: Controller) -> None:
        """Drain and stop a group that is no more (its controller is out of ``groups``)."""
        task = asyncio.create_task(controller.stop(), name=f"stop-group-{group_name(controller)}")
        self._group_stops.add(task)
        task.add_done_callback(self._group_stops.discard)

    def _rollout_ended(
        self, rollout: Rollout, old_cfg: DeploymentConfig, new_cfg: DeploymentConfig
    ) -> None:
        """Record what runs now: the new version, with the groups whose part was rolled back
        or skipped as they were (if any group moved at all)."""
        if rollout.changed:
            cfg = what_runs(old_cfg, new_cfg, rollout)
            self.configs[rollout.new] = cfg
            self.version = rollout.new
            self.served.append(rollout.new)
            self.cfg = self.groups.cfg = cfg
            self._write_config(rollout.new, cfg, current=True)
        self._save_versions()

    def _run_config(self, controller: Controller, cfg: DeploymentConfig) -> None:
        """Launch workers from ``cfg`` from now on, scaled by its autoscaler settings."""
        self.provisioner.use_config(cfg)
        if cfg.provisioner == "skypilot":
            self.provisioner.spot_plan = make_spot_plan(cfg)
        self._scale_by(controller, cfg)

    def _scale_by(self, controller: Controller, cfg: DeploymentConfig) -> None:
        """Scale ``controller``'s workers by ``cfg``'s autoscaler settings from now on."""
        before = controller.policy
        policy = make_autoscaler(cfg)
        if (policy.name, policy.thresholds(), policy.min_workers, policy.max_workers) != (
            before.name,
            before.thresholds(),
            before.min_workers,
            before.max_workers,
        ):
            controller.policy = policy
            if controller is self.groups.primary:
                self.policy = policy
            if policy.name == "fixed":
                controller.target = cfg.initial_target()
            else:
                low, high = policy.min_workers, policy.max_workers
                controller.target = min(max(controller.target, low), high)

    def _update_ended(self, update: Update) -> None:
        controller = update.controller
        if update.state == "succeeded":
            self.version = update.new
            self.served.append(update.new)
            self.cfg = self.configs[update.new]
            self._write_config(update.new, self.cfg, current=True)
        else:  # rolled back: launch the old version's workers again
            self._run_config(controller, self.configs[update.old])
        self._save_versions()

    def _write_config(self, version: int, cfg: DeploymentConfig, current: bool) -> None:
        versions.save_config(self.state_dir, version, cfg, current)

    def controller_of(self, worker: Worker) -> Controller:
        """The controller keeping ``worker`` (of its group)."""
        return self.groups.of_worker(worker)

    async def _sample(self) -> None:
        while True:
            self.metrics.sample(time.time())
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self.controller is not None:
            await asyncio.gather(*(c.stop() for c in self.groups))
        if self.prober is not None:
            await self.prober.close()
        if self.stats is not None:
            await self.stats.close()
        await self.provisioner.close()
        if self._probe_session is not None:
            await self._probe_session.aclose()

    def on_connect_error(self, worker: Any) -> None:
        if self.prober is not None:
            self.prober.poke(worker)

    def _gauges(self) -> GaugeState:
        counts: dict[str, int] = {}
        for w in self.pool:
            counts[w.state.value] = counts.get(w.state.value, 0) + 1
        return {
            "in_flight": self.pool.in_flight,
            "queued": self.pool.queued,
            "workers": counts,
            "qlrm": self.policy.qlrm,
            "target": sum(c.target for c in self.groups) if self.controller else 0,
        }

    def snapshot(self) -> StatusSnapshot:
        cfg = self.cfg
        workers = [w.to_dict() for w in self.pool]
        m = self.metrics
        return {
            "schema": SNAPSHOT_SCHEMA_VERSION,
            "generated_at": time.time(),
            "deployment": {
                "name": cfg.name,
                "version": self.version,
                "flockctl_version": __version__,
                "update": self.update.to_dict() if self.update is not None else None,
                "endpoint": self.endpoint,
                "provisioner": self.provisioner.name,
                "policy": cfg.policy,
                "worker_capacity": cfg.worker_capacity,
                "upstream_timeout": cfg.upstream_timeout,
                "limits": describe_limits(cfg),
                "started_at": self.started_at,
                "state_dir": str(self.state_dir),
                "worker_command": cfg.local_command(),
                "model": cfg.model,
                "probe": probe_view(cfg.probe),
            },
            "autoscaler": self.controller.to_dict() if self.controller else None,
            "groups": self.groups.views() if self.controller else [],
            "workers": workers,
            "requests": {
                "total": m.total,
                "in_flight": self.pool.in_flight,
                "queued": self.pool.queued,
                "failed": m.failed,
                "retried": m.retried,
                "rate": round(m.rate(), 3),
            },
            "ready_workers": sum(1 for w in self.pool if w.state == WorkerState.READY),
        }


#: The workers whose version ``versions.json`` keeps: those a restarted daemon may re-adopt.
_RECORDED = LIVE | {WorkerState.DRAINING}


def group_name(controller: Controller) -> str:
    """A controller's group as ``versions.json`` names it (``default``: no group)."""
    return "default" if controller.group is None else controller.group.name


def probe_view(probe: ProbeConfig) -> ProbeView:
    """The readiness probe as the snapshot shows it."""
    return {
        "path": probe.path,
        "post_data": probe.post_data,
        "headers": dict(probe.headers),
        "initial_delay_seconds": probe.initial_delay_seconds,
        "timeout_seconds": probe.timeout_seconds,
        "interval_seconds": probe.interval_seconds,
        "failure_threshold": probe.failure_threshold,
    }
