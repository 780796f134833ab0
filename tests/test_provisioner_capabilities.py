"""Each provisioner declares what its workers allow (a model named at run time, a URL, a log, new
bounds, a relaunch), and the admin API follows the declaration, never the provisioner's class: a
provisioner it has never heard of gets the answers it declared, over real HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import fake_worker_command, until

from flockctl.server import deployment as deployment_module
from flockctl.server.config import DeploymentConfig
from flockctl.server.provisioners import (
    Capabilities,
    LocalProvisioner,
    Provisioner,
    StaticProvisioner,
)
from flockctl.server.provisioners.sky_sdk import SkySdk
from flockctl.server.provisioners.skypilot import SkyPilotProvisioner
from flockctl.server.workers import Worker, WorkerState

TASK: dict[str, Any] = {"run": "serve --port 8000", "resources": {"ports": 8000}}


def provisioners(tmp_path: Path) -> dict[str, Provisioner]:
    return {
        "local": LocalProvisioner(fake_worker_command(), tmp_path),
        "static": StaticProvisioner(["http://127.0.0.1:9"]),
        "skypilot": SkyPilotProvisioner(TASK, "d", 8000, tmp_path, SkySdk()),
    }


@pytest.mark.parametrize(
    ("name", "runs_models", "takes_urls", "has_logs", "bounds_change", "relaunches"),
    [
        ("local", True, False, True, True, True),
        ("static", False, True, False, False, False),
        ("skypilot", False, False, True, True, True),
    ],
)
def test_each_provisioner_declares_what_its_workers_allow(
    tmp_path: Path,
    name: str,
    runs_models: bool,
    takes_urls: bool,
    has_logs: bool,
    bounds_change: bool,
    relaunches: bool,
) -> None:
    provisioner = provisioners(tmp_path)[name]
    can = provisioner.capabilities
    assert (can.runs_models, can.takes_urls, can.has_logs, can.bounds_change) == (
        runs_models,
        takes_urls,
        has_logs,
        bounds_change,
    )
    assert provisioner.relaunches is relaunches  # what the controller reads
    if takes_urls:
        before = provisioner.capacity(0)
        provisioner.add_endpoint("http://127.0.0.1:10")
        assert provisioner.capacity(0) == (before or 0) + 1
    else:
        with pytest.raises(NotImplementedError, match=f"the {name} provisioner takes no worker"):
            provisioner.add_endpoint("http://127.0.0.1:10")


@pytest.mark.e2e
async def test_only_a_local_worker_knows_its_command_line(tmp_path: Path) -> None:
    found = provisioners(tmp_path)
    local, static = found["local"], found["static"]
    worker, endpoint = Worker(id="w1", provisioner="local"), Worker(id="w1", provisioner="static")
    await local.launch(worker)
    await static.launch(endpoint)
    try:
        command = local.command_line(worker)
        assert command is not None and command.endswith(f"--port {worker.url.rsplit(':', 1)[1]}")
        assert (tmp_path / "workers" / "w1.log").is_file()  # has_logs: where the API reads it
        assert static.command_line(endpoint) is None
    finally:
        await local.terminate(worker)


class URLPool(Provisioner):
    """A provisioner the admin API has never heard of: workers are URLs handed out in turn, and
    what it allows is only what it declares."""

    name = "pool"
    capabilities = Capabilities(
        takes_urls=True,
        has_logs=False,
        why_no_logs="a pool URL keeps no log",
        bounds_change=False,
        why_fixed_bounds="a pool's bounds are its URLs",
        why_no_models="a pool serves whatever its URLs run",
        relaunches=False,
    )

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self.added: list[str] = []

    def add_endpoint(self, url: str) -> None:
        self.added.append(url)
        self.urls.append(url)

    def capacity(self, live: int) -> int | None:
        return len(self.urls) - live

    def command_line(self, worker: Worker) -> str | None:
        return f"pool member {worker.url}"

    async def launch(self, worker: Worker) -> None:
        worker.url = self.urls[int(worker.id.removeprefix("w")) - 1]

    async def terminate(self, worker: Worker) -> None:
        return None


async def test_the_admin_api_follows_the_declaration_not_the_class(
    daemon: Any, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await upstream(worker_id="u1"), await upstream(worker_id="u2")
    pool = URLPool([first.url])

    def make(cfg: DeploymentConfig, state_dir: Path) -> Provisioner:
        return pool

    monkeypatch.setattr(deployment_module, "make_provisioner", make)
    d = await daemon(endpoints=[first.url])
    await d.wait_ready(1)
    async with httpx.AsyncClient(base_url=d.url, headers=d.admin) as http:
        detail = (await http.get("/-/workers/w1")).json()
        assert detail["command"] == f"pool member {first.url}"

        refused = await http.post("/-/workers", json={"model": "demo"})
        assert refused.status_code == 422
        assert refused.json()["error"]["message"] == "model: a pool serves whatever its URLs run"

        no_log = await http.get("/-/logs/w1")
        assert no_log.status_code == 404
        assert no_log.json()["error"]["message"] == "worker w1 has no log: a pool URL keeps no log"

        bounds = await http.patch("/-/autoscaler", json={"max_workers": 3})
        assert bounds.status_code == 409
        assert bounds.json()["error"]["message"] == "a pool's bounds are its URLs"

        added = await http.post("/-/workers", json={"url": second.url})
        assert added.status_code == 201, added.text
    assert pool.added == [second.url]
    await until(
        lambda: [w.state for w in d.deployment.pool] == [WorkerState.READY] * 2,
        "the added URL to become a READY worker",
    )
