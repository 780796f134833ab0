"""A recording stand-in for SkyPilot's SDK (``sky_sdk.SkySdk``): no cloud is reachable from a test.

Select it with ``FLOCKCTL_SKY_SDK=fake_sky:FakeSky`` (the tests folder on ``PYTHONPATH``). A
"cluster" is the tests' fake OpenAI server run as a local process, so the daemon probes and
proxies real HTTP. State lives in ``$HOME/.fake-sky`` (HOME is a temporary folder in the tests),
so a daemon, the CLI and the test itself share it:

- ``clusters.json``: the clusters that exist (pid, port, spot);
- ``calls.jsonl``: every call made, in order (``FakeSky.calls()`` reads it back);
- ``script.json``: what to do next, written by the test: ``fail_launches`` (how many launches
  fail, with ``error`` as SkyPilot's text), ``launch_delay`` (seconds a launch takes) and
  ``worker_args`` (extra flags for the fake server, e.g. a token delay).

``preempt(cluster)`` is the cloud taking a spot cluster away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from flockctl.server.provisioners.sky_sdk import SkyError, build_task

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
#: Launches submitted and not yet waited on, and the ones cancelled (this process only: a launch
#: is submitted, waited on and cancelled by the same daemon).
_PENDING: dict[str, dict[str, Any]] = {}
_cancelled: set[str] = set()
_lock = threading.Lock()


class FakeSky:
    def __init__(self) -> None:
        self.dir = Path(os.environ["HOME"]) / ".fake-sky"
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- the test's side -----------------------------------------------------------------------

    def script(self, **settings: Any) -> None:
        (self.dir / "script.json").write_text(json.dumps(settings))

    def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        path = self.dir / "calls.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if method is None or r["method"] == method]

    def clusters(self) -> dict[str, dict[str, Any]]:
        path = self.dir / "clusters.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def preempt(self, cluster: str) -> None:
        """The cloud took the cluster back: its server dies and SkyPilot no longer lists it."""
        record = self._drop(cluster)
        assert record is not None, f"no cluster {cluster}"

    # -- the SDK's side ------------------------------------------------------------------------

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
        task = build_task(config, base_dir, spot=spot, port=port, envs=envs)  # SkyPilot's parser
        request = f"req-{uuid.uuid4().hex[:8]}"
        self._record("launch", cluster=cluster, spot=spot, port=port, envs=envs, request=request)
        _PENDING[request] = {
            "cluster": cluster,
            "spot": bool(spot),
            "resources": [str(r) for r in task.resources],
        }
        return request

    def wait(self, request_id: str, log: TextIO | None = None) -> None:
        state = _PENDING.pop(request_id)
        script = self._script()
        deadline = time.monotonic() + float(script.get("launch_delay", 0))
        while time.monotonic() < deadline and request_id not in _cancelled:
            time.sleep(0.02)
        if request_id in _cancelled:
            raise SkyError(f"RequestCancelled: request {request_id} was cancelled")
        if int(script.get("fail_launches", 0)) > 0:
            script["fail_launches"] = int(script["fail_launches"]) - 1
            self.script(**script)
            raise SkyError(script.get("error", "ResourcesUnavailableError: no capacity"))
        port = _free_port()
        out = (self.dir / f"{state['cluster']}.log").open("ab")
        out.write(f"job on {state['cluster']}: serving on port {port}\n".encode())
        out.flush()
        argv = [sys.executable, str(FAKE_WORKER), "--port", str(port), "--id", state["cluster"]]
        proc = subprocess.Popen(
            [*argv, *script.get("worker_args", [])],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if log is not None:
            log.write(f"fake launch of {state['cluster']} on {state['resources']}\n")
        with _lock:
            clusters = self.clusters()
            clusters[state["cluster"]] = {"pid": proc.pid, "port": port, "spot": state["spot"]}
            self._save(clusters)

    def cancel(self, request_id: str) -> None:
        self._record("cancel", request=request_id)
        _cancelled.add(request_id)

    def endpoint(self, cluster: str, port: int) -> str:
        self._record("endpoint", cluster=cluster, port=port)
        record = self.clusters().get(cluster)
        if record is None:
            raise SkyError(f"ClusterDoesNotExist: cluster {cluster!r} does not exist")
        return f"127.0.0.1:{record['port']}"

    def status(self, clusters: list[str]) -> dict[str, str]:
        self._record("status", clusters=clusters)
        known = self.clusters()
        return {name: "UP" for name in clusters if name in known}

    def down(self, cluster: str) -> None:
        self._record("down", cluster=cluster)
        self._drop(cluster)

    def tail_logs(self, cluster: str, follow: bool, tail: int, out: TextIO) -> int:
        self._record("tail_logs", cluster=cluster, follow=follow, tail=tail)
        if cluster not in self.clusters():
            raise SkyError(f"ClusterDoesNotExist: cluster {cluster!r} does not exist")
        lines = (self.dir / f"{cluster}.log").read_text().splitlines()
        out.write("".join(f"{line}\n" for line in lines[-tail:] if tail))
        return 0

    # -- bookkeeping ---------------------------------------------------------------------------

    def _record(self, method: str, **args: Any) -> None:
        with _lock, (self.dir / "calls.jsonl").open("a") as f:
            f.write(json.dumps({"method": method, **args}) + "\n")

    def _save(self, clusters: dict[str, Any]) -> None:
        """Written whole and renamed, so a reader in another process never sees half a file."""
        tmp = self.dir / f"clusters.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(clusters))
        tmp.replace(self.dir / "clusters.json")

    def _script(self) -> dict[str, Any]:
        path = self.dir / "script.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _drop(self, cluster: str) -> dict[str, Any] | None:
        with _lock:
            clusters = self.clusters()
            record = clusters.pop(cluster, None)
            self._save(clusters)
        if record is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record["pid"], signal.SIGKILL)
        return record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
