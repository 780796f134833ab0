"""Workers as SkyPilot clusters: one cluster per worker, launched from the SPEC's task.

A worker's cluster is named ``flockctl-<deployment>-<worker id>``. ``launch`` submits
``sky.launch`` (spot or on-demand as the worker asks), waits for it with the progress going to
``workers/<id>.log``, and takes the worker's URL from ``sky.endpoints``; the readiness probe then
decides when it is READY. A failed launch is torn down and tried again after a backoff that
doubles, up to ``launch_attempts`` times; the last failure carries SkyPilot's own text. A launch
that is no longer wanted (the worker was drained meanwhile) is cancelled through SkyPilot.

A status refresh every ``status_interval`` seconds finds clusters the cloud took away: a spot
cluster that is gone or no longer UP is PREEMPTED, an on-demand one FAILED, and the controller
replaces either. Clusters are recorded in ``clusters.json`` so a restarted daemon re-adopts them
and ``flockctl down`` tears down what a dead daemon left.

With worker groups each group launches its own task; an update of a group (``use_group``)
changes what its next clusters run, and a cluster launched from what the group still runs
(only its bounds or model name changed) is kept rather than relaunched (``carries_over``).

Every SDK call goes through ``sky_sdk`` and runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flockctl.server.autoscaler import SpotPlan
from flockctl.server.provisioners.base import ALIVE, Capabilities, Provisioner, ResourceHealth
from flockctl.server.provisioners.sky_sdk import SkyError, SkySdk, error_text
from flockctl.server.workers import Worker, WorkerState
from flockctl.state import read_json, write_json_atomic

if TYPE_CHECKING:
    from flockctl.server.config import DeploymentConfig

log = logging.getLogger("flockctl.skypilot")
T = TypeVar("T")
#: The file that records a deployment's clusters, in its state directory.
CLUSTERS_FILE = "clusters.json"


def cluster_name(deployment: str, worker_id: str) -> str:
    """The SkyPilot cluster of one worker: lower-case letters, digits and dashes."""
    raw = f"flockctl-{deployment}-{worker_id}".lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")


def recorded_clusters(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The clusters a deployment recorded, by worker id (empty when there are none)."""
    data = read_json(state_dir / CLUSTERS_FILE)
    rows = data.get("clusters", []) if isinstance(data, dict) else []
    return {str(r["id"]): r for r in rows if isinstance(r, dict) and "id" in r and "cluster" in r}


@dataclass(frozen=True)
class GroupLaunch:
    """What one worker group's clusters run: its task (its fields over the SPEC's), the port
    its server listens on, and whether its machines are spot unless a worker says otherwise."""

    task: dict[str, Any]
    port: int
    spot: bool = False


def group_launches(cfg: DeploymentConfig) -> dict[str, GroupLaunch]:
    """Each worker group's launch, by group name (empty without groups)."""
    out: dict[str, GroupLaunch] = {}
    for group in cfg.groups:
        own = cfg.group_config(group)
        assert own.task is not None and own.worker_port is not None  # the config checked both
        out[group.name] = GroupLaunch(own.task, own.worker_port, own.uses_spot())
    return out


class SkyPilotProvisioner(Provisioner):
    name = "skypilot"
    capabilities = Capabilities(
        why_no_models="a SkyPilot deployment's workers run its task's run: section; add a"
        " worker without a model"
    )

    def __init__(
        self,
        task: dict[str, Any],
        deployment: str,
        port: int,
        state_dir: Path,
        sdk: SkySdk,
        *,
        base_dir: str | None = None,
        spot: bool = False,
        spot_plan: SpotPlan | None = None,
        launch_attempts: int = 3,
        launch_backoff: float = 10.0,
        status_interval: float = 30.0,
        groups: dict[str, GroupLaunch] | None = None,
    ) -> None:
        self.task = task
        #: Each worker group's own task, port and spot default (a worker of no group, or of a
        #: group not listed, runs ``task``).
        self.groups = dict(groups or {})
        self.deployment = deployment
        self.port = port
        self.state_dir = state_dir
        self.sdk = sdk
        self.base_dir = base_dir
        #: Whether workers are spot unless told otherwise (the task's ``use_spot``).
        self.spot = spot
        self.spot_plan = spot_plan
        self.launch_attempts = launch_attempts
        self.launch_backoff = launch_backoff
        self.status_interval = status_interval
        self.log_dir = state_dir / "workers"
        self._table = state_dir / CLUSTERS_FILE
        self._records: dict[str, dict[str, Any]] = {}
        #: Each launched cluster: when it came up (monotonic, so a refresh that started earlier is
        #: not trusted for it) and its last known SkyPilot status (None: it no longer exists).
        self._seen: dict[str, tuple[float, str | None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        #: Recorded workers whose launch a daemon restart interrupted; start() tears them down.
        self._interrupted: list[Worker] = []
        #: What each worker's cluster was launched from (by this daemon), by worker id, with
        #: the directory its relative paths were read against.
        self._launched: dict[str, tuple[GroupLaunch, str | None]] = {}

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- launch --------------------------------------------------------------------------------

    def _launch_of(self, worker: Worker) -> GroupLaunch:
        """What ``worker``'s cluster runs: its group's task, else the deployment's."""
        own = self.groups.get(worker.group) if worker.group is not None else None
        return own or GroupLaunch(self.task, self.port, self.spot)

    async def launch(self, worker: Worker) -> None:
        cluster = cluster_name(self.deployment, worker.id)
        what = self._launch_of(worker)
        self._launched[worker.id] = (what, self.base_dir)
        if worker.spot is None:
            worker.spot = what.spot
        worker.resource = cluster
        record = {"id": worker.id, "cluster": cluster, "spot": worker.spot}
        if worker.group is not None:
            record["group"] = worker.group
        self._records[worker.id] = record
        self._save()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        envs = {"FLOCKCTL_WORKER_ID": worker.id, "PORT": str(what.port)}
        kind = "spot" if worker.spot else "on-demand"
        last = ""
        for attempt in range(1, self.launch_attempts + 1):
            if attempt > 1:
                delay = self.launch_backoff * 2 ** (attempt - 2)
                log.info("worker %s: launch try %d in %.0fs", worker.id, attempt, delay)
                await asyncio.sleep(delay)
            self._note(worker, f"launching {kind} cluster {cluster} (try {attempt})")
            try:
                await self._launch_once(worker, cluster, envs, what)
            except SkyError as exc:
                last = str(exc)
                log.warning("worker %s: launch of %s failed: %s", worker.id, cluster, last)
                self._note(worker, f"launch failed: {last}")
                await self._down_quietly(cluster)
                continue
            break
        else:
            raise SkyError(
                f"cluster {cluster} did not launch in {self.launch_attempts}"
                f" tr{'ies' if self.launch_attempts > 1 else 'y'}; SkyPilot said: {last}"
            )
        url = await self._call(self.sdk.endpoint, cluster, what.port)
        worker.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self._records[worker.id]["url"] = worker.url
        self._save()
        self._seen[cluster] = (time.monotonic(), "UP")
        self._note(worker, f"cluster {cluster} is UP; serving at {worker.url}")

    async def _launch_once(
        self, worker: Worker, cluster: str, envs: dict[str, str], what: GroupLaunch
    ) -> None:
        request = await self._call(
            self.sdk.launch,
            what.task,
            cluster,
            base_dir=self.base_dir,
            spot=worker.spot,
            port=what.port,
            envs=envs,
        )
        worker.handle = request
        try:
            with (self.log_dir / f"{worker.id}.log").open("a") as out:
                await self._call(self.sdk.wait, request, out)
        except asyncio.CancelledError:
            # The worker is no longer wanted: stop the launch on SkyPilot's side too (the
            # thread waiting on it then returns), and let terminate() tear down what exists.
            log.info("worker %s: cancelling the launch of %s", worker.id, cluster)
            with contextlib.suppress(SkyError):
                await asyncio.shield(self._call(self.sdk.cancel, request))
            raise
        finally:
            worker.handle = None

    def _note(self, worker: Worker, line: str) -> None:
        """One line in the worker's log, as the local provisioner writes them."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError), (self.log_dir / f"{worker.id}.log").open("a") as out:
            out.write(f"--- {stamp} {line}\n")

    def use_config(self, cfg: DeploymentConfig) -> None:
        """Clusters launched from now on run ``cfg``'s task (``flockctl update``, as ``sky serve
        update`` launches new replicas); those up keep theirs until they are drained."""
        if cfg.task is None or cfg.worker_port is None:
            raise NotImplementedError("the new config has no SkyPilot task")
        self.task, self.port, self.base_dir = cfg.task, cfg.worker_port, cfg.workdir
        self.spot = cfg.uses_spot()
        self.launch_attempts, self.launch_backoff = cfg.launch_attempts, cfg.launch_backoff

    def use_group(self, name: str, cfg: DeploymentConfig | None) -> None:
        """Group ``name``'s clusters launched from now on run ``cfg``'s task (its own fields over
        the SPEC's); None: the group is gone. Clusters up keep theirs until they are drained."""
        if cfg is None:
            self.groups.pop(name, None)
            return
        if cfg.task is None or cfg.worker_port is None:
            raise NotImplementedError(f"the new config of group {name!r} has no SkyPilot task")
        self.groups[name] = GroupLaunch(cfg.task, cfg.worker_port, cfg.uses_spot())
        self.base_dir = cfg.workdir
        self.launch_attempts, self.launch_backoff = cfg.launch_attempts, cfg.launch_backoff

    def carries_over(self, worker: Worker) -> bool:
        """A cluster this daemon launched from exactly what its group runs now (an update that
        changed only the group's bounds or model name keeps it); any other is replaced."""
        return self._launched.get(worker.id) == (self._launch_of(worker), self.base_dir)

    # -- health --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="skypilot-status")

    async def _refresh_loop(self) -> None:
        for worker in self._interrupted:
            log.info("tearing down %s, whose launch a restart interrupted", worker.resource)
            await self.terminate(worker)
        self._interrupted.clear()
        while True:
            await asyncio.sleep(self.status_interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Ask SkyPilot for the status of every cluster that finished launching."""
        clusters = sorted(self._seen)
        if not clusters:
            return
        asked = time.monotonic()
        try:
            found = await self._call(self.sdk.status, clusters)
        except SkyError as exc:
            log.warning("SkyPilot status refresh failed (kept the last one): %s", exc)
            return
        for cluster in clusters:
            seen = self._seen.get(cluster)
            if seen is not None and seen[0] <= asked:
                self._seen[cluster] = (seen[0], found.get(cluster))

    def health(self, worker: Worker) -> ResourceHealth:
        cluster = worker.resource
        if cluster is None or cluster not in self._seen:
            return ALIVE
        status = self._seen[cluster][1]
        if status == "UP":
            return ALIVE
        what = "no longer exists" if status is None else f"is {status}, no longer UP"
        if worker.spot:
            return ResourceHealth(False, f"spot cluster {cluster} {what} (preempted)", True)
        return ResourceHealth(False, f"cluster {cluster} {what}")

    # -- teardown and records ------------------------------------------------------------------

    async def terminate(self, worker: Worker) -> None:
        record = self._records.get(worker.id)
        if record is None:
            return
        cluster = record["cluster"]
        self._note(worker, f"tearing down cluster {cluster}")
        try:
            await self._call(self.sdk.down, cluster)
        except SkyError as exc:
            # Kept in clusters.json, so `flockctl down` tries again; the user is told how.
            log.error(
                "worker %s: could not tear down cluster %s: %s; run `sky down %s`",
                worker.id,
                cluster,
                exc,
                cluster,
            )
            return
        self.forget(worker)

    async def _down_quietly(self, cluster: str) -> None:
        try:
            await self._call(self.sdk.down, cluster)
        except SkyError as exc:
            log.warning("could not tear down the failed cluster %s: %s", cluster, exc)

    def forget(self, worker: Worker) -> None:
        self._launched.pop(worker.id, None)
        record = self._records.pop(worker.id, None)
        if record is not None:
            self._seen.pop(record["cluster"], None)
            self._save()

    def adopt(self) -> list[Worker]:
        adopted = []
        for worker_id, record in recorded_clusters(self.state_dir).items():
            worker = Worker(id=worker_id, provisioner=self.name, url=record.get("url"))
            worker.spot = bool(record.get("spot"))
            worker.resource = record["cluster"]
            worker.group = record.get("group")
            self._records[worker_id] = record
            if worker.url is None:
                # The daemon stopped mid-launch: the cluster may be half made. start() tears
                # it down, and the controller launches a fresh worker in its place.
                self._interrupted.append(worker)
                continue
            worker.transition(WorkerState.PROVISIONING)
            worker.transition(WorkerState.STARTING, "re-adopted after a daemon restart")
            self._seen[worker.resource] = (time.monotonic(), "UP")
            adopted.append(worker)
        return adopted

    def _save(self) -> None:
        write_json_atomic(self._table, {"clusters": list(self._records.values())})

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None


def down_recorded(state_dir: Path, sdk: SkySdk) -> tuple[list[str], list[str]]:
    """Tear down every cluster a deployment recorded (``flockctl down`` after the daemon died).

    Returns the clusters torn down and one line for each that could not be.
    """
    done: list[str] = []
    problems: list[str] = []
    records = recorded_clusters(state_dir)
    for worker_id, record in list(records.items()):
        try:
            sdk.down(record["cluster"])
        except SkyError as exc:
            problems.append(f"{record['cluster']}: {error_text(exc)}")
            continue
        done.append(record["cluster"])
        del records[worker_id]
    write_json_atomic(state_dir / CLUSTERS_FILE, {"clusters": list(records.values())})
    return done, problems
