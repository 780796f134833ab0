"""Shared fixtures: an isolated state home, real fake upstreams and a real daemon on 127.0.0.1,
and the engine's API over a tiny real model (built once per run, loaded once per module that
asks for it); and the one pair of polling helpers every test waits with, ``until`` (async) and
``until_sync``."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import pytest
import uvicorn
from aiohttp import web
from fake_worker import build_app

from flockctl.server.__main__ import uvicorn_config
from flockctl.server.app import create_app
from flockctl.server.config import DeploymentConfig
from flockctl.server.deployment import Deployment

if TYPE_CHECKING:  # imported by the fixtures that need them, not by every test (torch, SkyPilot)
    from fake_sky import FakeSky

    from flockctl.engine.engine import Engine
    from flockctl.engine.job import Job

# The tests' models are tiny: one torch thread runs them faster than one per core, whose threads
# spin waiting for each other whenever another process has a core (2-3x the wall time on a busy
# two-core machine). Set before torch loads; an explicit OMP_NUM_THREADS is kept. Worker and
# engine processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).parent
FAKE_WORKER = TESTS / "fake_worker.py"
TOKEN = "test-admin-token"
_REPO = TESTS.parent
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def fake_worker_command(*extra: str) -> str:
    """A --worker-command that runs the tests' fake OpenAI server."""
    return " ".join([sys.executable, str(FAKE_WORKER), "--port", "{port}", *extra])


def _started_by_flockctl() -> bool:
    """Whether the process being started is one of this repository's code (the CLI, the
    daemon, a provisioner, a test) rather than a library's (``platform`` asking ``uname``): the
    first caller outside the machinery that starts processes decides."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<"):
            path = Path(name).resolve()
            machinery = path.is_relative_to(_STDLIB) and (
                path.name == "subprocess.py" or path.parent.name == "asyncio"
            )
            if not machinery:
                return path.is_relative_to(_REPO)
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def only_e2e_tests_start_processes(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A test that starts a process of flockctl's (the CLI, the daemon, a worker, an engine)
    is an end-to-end test and carries ``@pytest.mark.e2e``, which keeps ``-m "not e2e"`` a
    fast in-process loop. One without the marker that starts one fails, naming the command."""
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    started: list[str] = []
    popen_init = subprocess.Popen.__init__

    def init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> None:
        if _started_by_flockctl():
            started.append(args if isinstance(args, str) else " ".join(map(str, args)))
        popen_init(self, args, *rest, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    if started:
        pytest.fail(
            f"this test starts processes ({'; '.join(started)[:300]}): mark it"
            " @pytest.mark.e2e, or test the same thing in-process",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def flockctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "flockctl-home"
    monkeypatch.setenv("FLOCKCTL_HOME", str(home))
    monkeypatch.delenv("FLOCKCTL_NAME", raising=False)
    # The dashboard reads key bindings from the config dir and remembers its theme in the state
    # dir: never the user's own.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.delenv("FLOCKCTL_THEME", raising=False)
    # The commands tests run are piped, as in a script: their output is the full line unless
    # COLUMNS says otherwise, and a test runner's own width (pytest-xdist's workers set one)
    # must not decide that.
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    return home


def failing_worker(status: int) -> tuple[web.Application, dict[str, int]]:
    """A worker whose probe passes and whose every chat request gets ``status`` (``hits["n"]``
    counts them), with the error message ``boom STATUS``."""
    app = web.Application()
    hits = {"n": 0}

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def answer(_r: web.Request) -> web.Response:
        hits["n"] += 1
        return web.json_response({"error": {"message": f"boom {status}"}}, status=status)

    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", answer)
    return app, hits


@dataclass
class Upstream:
    url: str
    runner: web.AppRunner
    app: web.Application


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Start aiohttp apps on free ports: the fake worker by default, or any app given."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application | None = None, worker_id: str = "u") -> Upstream:
        app = app or build_app(worker_id, 16, 0.0, None)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return Upstream(f"http://127.0.0.1:{port}", runner, app)

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Daemon:
    url: str
    deployment: Deployment
    server: uvicorn.Server
    task: asyncio.Task[Any]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def states(self) -> dict[str, str]:
        """Each worker's state by id, as ``/-/status`` would name it."""
        return {w.id: w.state.value for w in self.deployment.pool}

    async def wait_ready(self, n: int, timeout: float = 15.0) -> None:
        pool = self.deployment.pool
        try:
            await until(lambda: len(pool.ready()) >= n, f"{n} READY workers", timeout)
        except AssertionError as exc:
            workers = [(w.id, w.state.value, w.reason) for w in pool]
            raise AssertionError(f"{exc}: {workers}") from None


async def until(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = 30.0,
    *,
    pause: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Any:
    """Poll ``predicate`` until it returns something true (returned); fail naming ``what``.

    ``predicate`` may be a coroutine function (a check that makes a request). ``pause`` is how
    to wait between tries: a Textual pilot's ``pause``, so the app handles its messages first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pause(0.02)


def until_sync(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """``until`` for tests outside an event loop (those that drive real processes)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return result


BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as the module ``bench_<name>``: by its path (``bench/engine.py``
    shares its name with the repository's ``engine`` package), with its directory importable
    while it loads, for its ``common``."""
    module_name = f"bench_{name}"
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # its dataclasses look their module up
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
    return module


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with free_socket() as s:
        return s.getsockname()[1]


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """Run the real daemon app under uvicorn in the test's event loop, on a free port."""
    running: list[Daemon] = []

    async def start(**fields: Any) -> Daemon:
        sock = free_socket()
        port = sock.getsockname()[1]
        fields.setdefault("probe", {"interval_seconds": 0.05, "timeout_seconds": 2})
        cfg = DeploymentConfig(port=port, node_control_key=TOKEN, **fields)
        deployment = Deployment(cfg, tmp_path / f"state-{port}", TOKEN)
        server: uvicorn.Server

        def shutdown() -> None:
            server.should_exit = True

        app = create_app(deployment, shutdown)
        server = uvicorn.Server(uvicorn_config(app, cfg))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        d = Daemon(f"http://127.0.0.1:{port}", deployment, server, task)
        running.append(d)
        return d

    yield start
    for d in running:
        d.server.should_exit = True
        await asyncio.wait_for(d.task, 30)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- the engine's API on a tiny real model ---------------------------------------------------------

#: The model name the ``engine`` fixture serves.
TINY = "tiny"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny model, built once for the whole run: tests only read it."""
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Iterator[Engine]:
    from flockctl.engine.config import EngineConfig
    from flockctl.engine.loader import load_engine

    config = EngineConfig(model=str(tiny), served_model_name=TINY, device="cpu", max_batch_size=4)
    engine = load_engine(config, progress=False)
    try:
        yield engine
    finally:
        engine.close()


def before_forwards(
    engine: Engine, wait: Callable[[list[Job]], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Call ``wait(jobs)`` on the model loop's thread before each forward of ``jobs``: the
    runner's ``forward``, and ``greedy`` for a decode step whose tokens come straight from the
    compiled forward (where that declines, the ``forward`` after it calls ``wait`` again). A
    test holds the model loop there until what it set up has arrived, instead of hoping to catch
    a fast job mid-flight."""
    forward, greedy = engine.runner.forward, engine.runner.greedy

    def forwarding(jobs: list[Job], counts: Any = None) -> Any:
        wait(jobs)
        return forward(jobs, counts)

    def picking(jobs: list[Job], *run: Any) -> list[list[int]] | None:
        wait(jobs)
        return greedy(jobs, *run)

    monkeypatch.setattr(engine.runner, "forward", forwarding)
    monkeypatch.setattr(engine.runner, "greedy", picking)


def hold_first_decode(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Hold the model loop before the first decode step until ``go`` is set; ``decoding`` is
    set once it waits there (a job is then mid-flight, however fast the model)."""
    decoding, go = threading.Event(), threading.Event()

    def held(jobs: list[Job]) -> None:
        if any(j.output_ids for j in jobs) and not go.is_set():
            decoding.set()
            go.wait(30)

    before_forwards(engine, held, monkeypatch)
    return decoding, go


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    from flockctl.engine.api import create_app as create_engine_app

    transport = httpx.ASGITransport(app=create_engine_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
        yield c


@pytest.fixture
async def served(engine: Engine) -> AsyncIterator[str]:
    """The same app under a real uvicorn on 127.0.0.1, for what needs real connections."""
    from flockctl.engine.api import create_app as create_engine_app

    sock = free_socket()
    config = uvicorn.Config(
        create_engine_app(engine),
        loop="none",
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await asyncio.wait_for(task, 30)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of an answer in OpenAI's error shape, checking status and shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.fixture
def sky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSky]:
    """The fake SkyPilot SDK, for this process and the daemons and CLIs it starts (they find
    it through ``FLOCKCTL_SKY_SDK``), with a HOME of the test's own; every cluster it still
    runs is torn down after the test, so a failed test leaves no server behind."""
    from fake_sky import FakeSky

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    monkeypatch.setenv("FLOCKCTL_SKY_SDK", "fake_sky:FakeSky")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    fake = FakeSky()
    yield fake
    for cluster in fake.clusters():
        fake.down(cluster)
