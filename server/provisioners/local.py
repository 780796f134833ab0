"""Workers as local processes: one command line per worker, each in its own process group.

The command is a template: ``{port}`` becomes the port assigned to the worker,
``{worker_id}`` its id (the environment also carries ``PORT`` and ``FLOCKCTL_WORKER_ID``) and
``{gpus}`` how many GPUs it was given. A
worker may carry its own template (``Worker.command``: an operator started it with another model);
it replaces the deployment's for that worker only. Output goes to ``workers/<id>.log``. Live
workers are recorded in ``workers.json`` (pid, process start time, command and model) so a
restarted daemon re-adopts them instead of leaving orphans.

A worker may be any third-party server, so it never gets the deployment's keys: the variables
that carry them (``KEY_ENV_VARS``) are taken out of its environment. Its log may hold what an
earlier worker of the same id wrote; why a worker ended quotes only its own lines.

With GPUs (``server/gpus.py``), each worker gets its own ``CUDA_VISIBLE_DEVICES`` before it
starts; one that finds no GPU free is not started: it waits in PROVISIONING, its reason saying
who holds the GPUs, until a worker ends. The memory of a worker's GPUs is read by their UUIDs
for a worker whose own ``/stats`` does not report it (any server other than flockctl's engine).
Under ``--cuda-mps`` the provisioner starts the MPS control daemon before the first worker and
stops it when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flockctl.net import client_url
from flockctl.server import gpus as gpu_info
from flockctl.server import mps
from flockctl.server.gpus import Assignment, Placement
from flockctl.server.offline import stop_recorded_workers
from flockctl.server.provisioners.base import ALIVE, Capabilities, Provisioner, ResourceHealth
from flockctl.server.workers import Worker, WorkerState
from flockctl.state import is_same_process, process_start_time, read_json
from flockctl.state import write_json_atomic as _write

if TYPE_CHECKING:
    from flockctl.server.config import DeploymentConfig

#: Environment variables that carry the deployment's keys (``--node-control-key``, ``--api-key``):
#: a local worker, which may be any third-party server, never gets them.
KEY_ENV_VARS = ("FLOCKCTL_NODE_CONTROL_KEY", "FLOCKCTL_API_KEY")
_SHELL_CHARS = frozenset("$`*?[~")
#: Bytes at the end of a worker's log searched for the lines that say why it ended.
_REASON_BYTES = 65536


def argv_for(command: str) -> list[str]:
    """How to run ``command``: directly when it is a plain command line, so the recorded pid is
    the server itself, else through ``/bin/sh -c`` (pipes, ``&&``, variables, globs)."""
    if not _SHELL_CHARS.intersection(command):
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: let the shell report it
            tokens = []
        if tokens and not any(set(t) <= set("();<>|&") for t in tokens):
            return tokens
    return ["/bin/sh", "-c", command]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pidfd(pid: int) -> int | None:
    """A pidfd of process ``pid``, or None where there are none (not Linux) or no such process.

    Opened before the process is signalled, it keeps naming that process even if the pid is
    reused after it exits.
    """
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def worker_env(port: int, worker_id: str) -> dict[str, str]:
    """The environment a local worker runs with: the daemon's, less the deployment's keys,
    plus its port and id, and its own seed for flockctl's engine (``--seed``'s variable), so
    no two workers sample alike (unless the daemon itself was given one for all)."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_ENV_VARS}
    env.setdefault("FLOCKCTL_ENGINE_SEED", str(secrets.randbits(63)))
    return {**env, "PORT": str(port), "FLOCKCTL_WORKER_ID": worker_id}


def lines_since(path: Path, offset: int, n: int) -> list[str]:
    """The last ``n`` lines written to ``path`` after byte ``offset``: one process's own output
    in a log that earlier runs appended to (all of it if the file is now shorter than that)."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            offset = offset if offset <= end else 0
            start = max(offset, end - _REASON_BYTES)
            f.seek(start)
            data = f.read(end - start)
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > offset and lines:
        lines = lines[1:]  # cut inside a line
    return lines[-n:]


async def _exit_of(pidfd: int, timeout: float) -> None:
    """Return when the process behind ``pidfd`` exits, or after ``timeout``; closes ``pidfd``.

    The pidfd turns readable at the exit, so the event loop is woken by the exit itself.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exited, timeout)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


class _Handle:
    """What the provisioner knows of one worker's process."""

    def __init__(
        self,
        pid: int,
        start_time: float,
        port: int,
        popen: subprocess.Popen | None,
        command: str | None = None,
        log_offset: int = 0,
    ):
        self.pid = pid
        self.start_time = start_time
        self.port = port
        self.popen = popen
        self.command = command
        #: The log's size when this process started: its own lines come after it.
        self.log_offset = log_offset


class LocalProvisioner(Provisioner):
    name = "local"
    capabilities = Capabilities(runs_models=True)

    def __init__(
        self,
        command: str,
        state_dir: Path,
        host: str = "127.0.0.1",
        stop_timeout: float = 10.0,
        cwd: Path | None = None,
        model: str | None = None,
        gpus: Placement | None = None,
        cuda_mps: bool = False,
    ) -> None:
        self.command = command
        #: Which GPUs each worker gets; None: workers get the daemon's environment as it is.
        self.gpus = gpus
        self.cuda_mps = cuda_mps and gpus is not None
        self._gpu_freed: asyncio.Event | None = None
        #: Workers waiting for GPUs, in the order they asked.
        self._gpu_queue: list[str] = []
        self._mps_started = False
        #: Why MPS could not start: every launch fails with it.
        self._mps_error: str | None = None
        #: The model ``command`` serves (flockctl's engine), None for a custom worker command.
        self.model = model
        self.cwd = cwd
        self.state_dir = state_dir
        self.host = host
        self.stop_timeout = stop_timeout
        self.log_dir = state_dir / "workers"
        self._table = state_dir / "workers.json"
        self._records: dict[str, dict[str, Any]] = {}

    def render(self, worker_id: str, port: int, command: str | None = None, gpus: int = 0) -> str:
        """The command line of one worker: ``command`` (else the deployment's) filled in."""
        template = command or self.command
        return (
            template.replace("{port}", str(port))
            .replace("{worker_id}", worker_id)
            .replace("{gpus}", str(gpus))
        )

    def use_config(self, cfg: DeploymentConfig) -> None:
        """Workers launched from now on run ``cfg``'s command (``flockctl update``); running
        ones keep theirs, and the placement and records stay shared by both."""
        command = cfg.local_command()
        if command is None:
            raise NotImplementedError("the new config runs no local command")
        self.command, self.model = command, cfg.model
        self.cwd = Path(cfg.workdir) if cfg.workdir else None

    def command_line(self, worker: Worker) -> str | None:
        """The command line ``worker`` runs, once it was launched (or re-adopted)."""
        handle: _Handle | None = worker.handle
        return handle.command if handle is not None else None

    async def launch(self, worker: Worker) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if worker.command is None:
            worker.model = self.model
        if self._mps_error is not None:
            raise RuntimeError(self._mps_error)
        placed = await self._placed(worker)
        port = free_port(self.host)
        cmd = self.render(worker.id, port, worker.command, placed.count if placed else 0)
        env = worker_env(port, worker.id)
        if placed is not None:
            env |= placed.env(self.cuda_mps)
            if self.cuda_mps:
                env |= mps.mps_env(self.state_dir)
        log_path = self.log_dir / f"{worker.id}.log"
        with log_path.open("ab") as log:
            log_offset = log.seek(0, os.SEEK_END)
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {cmd}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv_for(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.cwd,
            )
        start = process_start_time(popen.pid) or time.time()
        worker.handle = _Handle(popen.pid, start, port, popen, cmd, log_offset)
        worker.pid = popen.pid
        worker.url = client_url(self.host, port)
        self._records[worker.id] = {
            "id": worker.id,
            "pid": popen.pid,
            "start_time": start,
            "port": port,
            "url": worker.url,
            "command": cmd,
            "template": worker.command,
            "model": worker.model,
            "log_offset": log_offset,
            "gpus": [g.index for g in placed.gpus] if placed else None,
        }
        self._save()

    async def _placed(self, worker: Worker) -> Assignment | None:
        """The GPUs ``worker`` gets, once some are free (None without placement). While none
        is, the worker's reason says why; cancelling the launch ends the wait."""
        if self.gpus is None:
            return None
        if self._gpu_freed is None:
            self._gpu_freed = asyncio.Event()
        self._gpu_queue.append(worker.id)
        try:
            while True:
                first = self._gpu_queue[0] == worker.id  # first come, first placed
                placed = self.gpus.assign(worker.id) if first else None
                if placed is not None:
                    break
                worker.reason = self.gpus.why_none()
                self._gpu_freed.clear()
                await self._gpu_freed.wait()
        finally:
            self._gpu_queue.remove(worker.id)
            self._gpu_freed.set()  # the next in line looks again
        worker.resource = placed.describe()
        return placed

    def _release(self, worker_id: str) -> None:
        """Give ``worker_id``'s GPUs back and wake the launches waiting for one."""
        if self.gpus is not None and self.gpus.of(worker_id) is not None:
            self.gpus.release(worker_id)
            if self._gpu_freed is not None:
                self._gpu_freed.set()

    def start(self) -> None:
        if self.cuda_mps and not self._mps_started:
            self._mps_started = True
            try:
                mps.start(self.state_dir)
            except mps.MpsError as exc:
                self._mps_error = str(exc)

    async def close(self) -> None:
        if self._mps_started:
            await asyncio.to_thread(mps.stop, self.state_dir)
            self._mps_started = False

    def health(self, worker: Worker) -> ResourceHealth:
        handle: _Handle | None = worker.handle
        if handle is None:
            return ALIVE
        self._read_gpu_memory(worker)
        if handle.popen is not None:
            code = handle.popen.poll()
            if code is None:
                return ALIVE
            return ResourceHealth(False, self._exit_reason(worker.id, handle, code))
        if is_same_process(handle.pid, handle.start_time):
            return ALIVE
        return ResourceHealth(False, self._exit_reason(worker.id, handle, None))

    def _read_gpu_memory(self, worker: Worker) -> None:
        """The memory of the GPUs ``worker`` was given, read by their UUIDs, for a worker whose
        engine does not report its own (flockctl's engine does, in its ``/stats``)."""
        placed = self.gpus.of(worker.id) if self.gpus is not None else None
        if placed is not None and worker.engine is None:
            worker.gpu_memory = gpu_info.memory_of(placed.gpus)

    def _exit_reason(self, worker_id: str, handle: _Handle, code: int | None) -> str:
        if code is None:
            what = "process exited"
        elif code < 0:
            what = f"process killed by signal {-code}"
        else:
            what = f"process exited with code {code}"
        last = [
            line
            for line in lines_since(self.log_dir / f"{worker_id}.log", handle.log_offset, 5)
            if line.strip() and not line.startswith("--- ")
        ]
        return f"{what}: {last[-1].strip()[:200]}" if last else what

    async def terminate(self, worker: Worker) -> None:
        handle: _Handle | None = worker.handle
        if handle is None:
            self._release(worker.id)  # a launch that ended before its process started
            return
        if handle.popen is not None and handle.popen.poll() is not None:
            self._kill_group(handle.pid, signal.SIGKILL)  # leftovers of the group, if any
        elif handle.popen is not None or is_same_process(handle.pid, handle.start_time):
            pidfd = _pidfd(handle.pid)
            self._kill_group(handle.pid, signal.SIGTERM)
            if not await self._stopped(handle, pidfd):
                self._kill_group(handle.pid, signal.SIGKILL)
        if handle.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.popen.wait(timeout=1)
        self.forget(worker)

    async def _stopped(self, handle: _Handle, pidfd: int | None) -> bool:
        """Wait up to ``stop_timeout`` for the worker's process group to end; False if it did
        not. The process's exit wakes the wait (through ``pidfd``), so a worker that stops at
        once is not held up by a polling interval; the rest of its group, if any, is polled."""
        deadline = time.monotonic() + self.stop_timeout
        if pidfd is not None:
            await _exit_of(pidfd, self.stop_timeout)
        while self._group_alive(handle):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    @staticmethod
    def _kill_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    @staticmethod
    def _group_alive(handle: _Handle) -> bool:
        if handle.popen is not None and handle.popen.poll() is None:
            return True
        try:
            os.killpg(handle.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def forget(self, worker: Worker) -> None:
        self._release(worker.id)
        if self._records.pop(worker.id, None) is not None:
            self._save()

    def adopt(self) -> list[Worker]:
        data = read_json(self._table)
        adopted: list[Worker] = []
        for rec in data.get("workers", []) if isinstance(data, dict) else []:
            try:
                pid, start, port = int(rec["pid"]), float(rec["start_time"]), int(rec["port"])
                worker_id, url = str(rec["id"]), str(rec["url"])
            except (KeyError, TypeError, ValueError):
                continue
            if not is_same_process(pid, start):
                continue
            template, command, model = rec.get("template"), rec.get("command"), rec.get("model")
            worker = Worker(id=worker_id, provisioner=self.name, url=url, pid=pid)
            worker.command = template if isinstance(template, str) else None
            if "model" not in rec and worker.command is None:  # an older daemon's record
                model = self.model
            worker.model = model if isinstance(model, str) else None
            cmd = command if isinstance(command, str) else None
            offset = rec.get("log_offset")
            offset = offset if isinstance(offset, int) and offset >= 0 else 0
            worker.handle = _Handle(pid, start, port, None, cmd, offset)
            indices = rec.get("gpus")
            if self.gpus is not None and isinstance(indices, list):
                placed = self.gpus.restore(worker_id, [i for i in indices if isinstance(i, int)])
                worker.resource = placed.describe() if placed else None
            worker.transition(WorkerState.PROVISIONING)
            worker.transition(WorkerState.STARTING, "re-adopted after a daemon restart")
            adopted.append(worker)
            self._records[worker_id] = rec
        self._save()
        return adopted

    def _save(self) -> None:
        _write(self._table, {"workers": list(self._records.values())})

    def kill_recorded(self, timeout: float = 5.0) -> list[str]:
        """Stop every recorded worker process (for ``down`` when the daemon itself is gone)."""
        self._records.clear()
        stopped = stop_recorded_workers(self.state_dir, timeout)
        mps.stop(self.state_dir)
        return stopped
