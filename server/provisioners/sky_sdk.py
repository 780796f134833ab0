"""The one module that calls SkyPilot.

Every SkyPilot 0.14 SDK call returns a request id that ``sky.get`` (or ``sky.stream_and_get``)
waits on; the calls here block, so the provisioner runs each of them in a thread and the daemon's
event loop never waits on a cloud. ``import sky`` writes ``~/.sky`` and the first call starts a
local SkyPilot API server, so nothing is imported until a call needs it.

Task parsing (``build_task``, ``describe``) is SkyPilot's own and works offline without cloud
credentials; ``flockctl up --dry-run`` uses it. ``FLOCKCTL_SKY_SDK=module:attr`` replaces the SDK
class (the test suite puts a small recording fake there, since no cloud is reachable from a test).
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from pathlib import Path
from typing import Any, TextIO

#: Sources of ``file_mounts`` that name a bucket or URL, not a local path.
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://")


#: The command that installs SkyPilot, as README gives it; every hint names this one.
INSTALL_SKY = 'pip install -e ".[sky]"'


class SkyError(RuntimeError):
    """A SkyPilot call failed; the message is SkyPilot's own text, on one line."""


class SkyMissing(SkyError):
    """SkyPilot cannot be imported: the ``sky`` extra is not installed."""


def error_text(exc: BaseException, limit: int = 600) -> str:
    """SkyPilot's message for ``exc`` on one line (its errors are often several lines long)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if name not in ("SkyError", "RuntimeError", "ValueError") and not text.startswith(name):
        text = f"{name}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


_import_lock = threading.Lock()


def _sky() -> Any:
    """The ``sky`` module, imported once: launches run in threads, and two threads importing
    SkyPilot at once can see a half-initialised module."""
    with _import_lock:
        os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        try:
            import sky
        except ImportError as exc:
            raise SkyMissing(
                f"SkyPilot is not installed ({exc}); install the sky extra with {INSTALL_SKY}"
            ) from None
    return sky


def absolute_paths(config: dict[str, Any], base_dir: str | None) -> dict[str, Any]:
    """The task with its local ``workdir`` and ``file_mounts`` sources made absolute.

    SkyPilot reads relative paths against the directory it is called from; the daemon runs
    elsewhere, so they are resolved against the directory ``flockctl up`` ran in, as
    ``sky launch`` run there would.
    """
    if not base_dir:
        return dict(config)
    out = dict(config)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not _REMOTE.match(value) and not value.startswith("~"):
            return str(Path(base_dir, value))
        return value

    if "workdir" in out:
        out["workdir"] = fix(out["workdir"])
    mounts = out.get("file_mounts")
    if isinstance(mounts, dict):
        out["file_mounts"] = {dst: fix(src) for dst, src in mounts.items()}
    return out


def build_task(
    config: dict[str, Any],
    base_dir: str | None = None,
    *,
    spot: bool | None = None,
    port: int | None = None,
    envs: dict[str, str] | None = None,
) -> Any:
    """A ``sky.Task`` from the SPEC's task fields: spot or on-demand as asked, with ``port``
    opened on every resource option and ``envs`` added. Raises SkyError with SkyPilot's text."""
    sky = _sky()
    try:
        task = sky.Task.from_yaml_config(absolute_paths(config, base_dir))
        override: dict[str, Any] = {}
        if spot is not None:
            override["use_spot"] = spot
        if port is not None:
            opened = {str(p) for r in task.resources for p in (r.ports or [])}
            if str(port) not in opened:
                override["ports"] = sorted(opened | {str(port)})
        if override:
            task.set_resources_override(override)
        if envs:
            task.update_envs(envs)
    except Exception as exc:  # SkyPilot raises ValueError, jsonschema and its own errors
        raise SkyError(error_text(exc)) from None
    return task


def describe(config: dict[str, Any], base_dir: str | None = None) -> dict[str, Any]:
    """What one worker's cluster asks for, as SkyPilot parsed it (for ``--dry-run``)."""
    task = build_task(config, base_dir)
    resources = list(task.resources)
    return {
        "resources": [str(r) for r in resources],
        "use_spot": any(r.use_spot for r in resources),
        "num_nodes": task.num_nodes,
        "setup": task.setup,
        "run": task.run if isinstance(task.run, str) else None,
        "workdir": task.workdir if isinstance(task.workdir, str) else None,
        "envs": dict(task.envs),
    }


class SkySdk:
    """SkyPilot's client SDK as the provisioner uses it. Each method blocks; errors are SkyError.

    A launch is two calls so that it can be cancelled: ``launch`` submits it and returns the
    request id at once, ``wait`` blocks until the cluster is up (or the launch failed), and
    ``cancel`` aborts the request from another thread.
    """

    def launch(
        self,
        config: dict[str, Any],
        cluster: str,
        *,
        base_dir: str | None,
        spot: bool | None,
        port: int,
        envs: dict[str, str],
    ) -> str:
        task = build_task(config, base_dir, spot=spot, port=port, envs=envs)
        sky = _sky()
        try:
            return str(sky.launch(task, cluster_name=cluster, retry_until_up=False))
        except Exception as exc:
            raise SkyError(error_text(exc)) from None

    def wait(self, request_id: str, log: TextIO | None = None) -> None:
        """Block until the launch ends; its progress goes to ``log``."""
        sky = _sky()
        try:
            if log is None:
                sky.get(request_id)
            else:
                sky.stream_and_get(request_id, output_stream=log)
        except Exception as exc:
            raise SkyError(error_text(exc)) from None

    def cancel(self, request_id: str) -> None:
        sky = _sky()
        try:
            sky.get(sky.api_cancel(request_id, silent=True))
        except Exception as exc:
            raise SkyError(error_text(exc)) from None

    def endpoint(self, cluster: str, port: int) -> str:
        """Where ``port`` on the cluster is reached: ``host:port`` or a URL."""
        sky = _sky()
        try:
            found = sky.get(sky.endpoints(cluster, port))
        except Exception as exc:
            raise SkyError(error_text(exc)) from None
        url = found.get(port) or found.get(str(port))
        if not url:
            raise SkyError(f"cluster {cluster} exposes no endpoint for port {port}")
        return str(url)

    def status(self, clusters: list[str]) -> dict[str, str]:
        """Each cluster's SkyPilot status (``UP``, ``INIT``, ``STOPPED``), refreshed from the
        cloud where that can find a preemption; a cluster that no longer exists is left out."""
        sky = _sky()
        from sky.utils.common import StatusRefreshMode

        try:
            records = sky.get(sky.status(cluster_names=clusters, refresh=StatusRefreshMode.AUTO))
        except Exception as exc:
            raise SkyError(error_text(exc)) from None
        out: dict[str, str] = {}
        for record in records:
            name = record["name"] if isinstance(record, dict) else record.name
            status = record["status"] if isinstance(record, dict) else record.status
            out[name] = getattr(status, "value", str(status))
        return out

    def down(self, cluster: str) -> None:
        sky = _sky()
        try:
            sky.get(sky.down(cluster))
        except Exception as exc:
            if type(exc).__name__ == "ClusterDoesNotExist":
                return
            raise SkyError(error_text(exc)) from None

    def tail_logs(self, cluster: str, follow: bool, tail: int, out: TextIO) -> int:
        """Write the cluster's job log to ``out``; returns SkyPilot's exit code for the job."""
        sky = _sky()
        try:
            return int(sky.tail_logs(cluster, None, follow, tail=tail, output_stream=out) or 0)
        except Exception as exc:
            raise SkyError(error_text(exc)) from None


def make_sdk() -> SkySdk:
    """The SDK the provisioner and the CLI use: SkyPilot's, or the class that
    ``FLOCKCTL_SKY_SDK=module:attr`` names."""
    spec = os.environ.get("FLOCKCTL_SKY_SDK")
    if not spec:
        return SkySdk()
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "SkySdk")()
