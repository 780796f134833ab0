"""CUDA MPS for local workers that share GPUs (``--cuda-mps``).

Without MPS, processes on one GPU take turns on it; under MPS their kernels run side by side,
each within the part of the GPU's threads its ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` allows. The
daemon starts one control daemon per deployment (``nvidia-cuda-mps-control -d``) with its pipe
and log directories in the deployment's state dir, so it is this deployment's alone, and stops it
at ``down`` (``echo quit | nvidia-cuda-mps-control``). Workers find it through the same
``CUDA_MPS_PIPE_DIRECTORY``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("flockctl.mps")

CONTROL = "nvidia-cuda-mps-control"
#: Seconds the control command may take to start or stop the control daemon.
COMMAND_TIMEOUT = 30.0


class MpsError(RuntimeError):
    """The MPS control daemon could not be started; the message says why."""


def mps_dir(state_dir: Path) -> Path:
    return state_dir / "mps"


def mps_env(state_dir: Path) -> dict[str, str]:
    """Where the control daemon's pipes and logs are: the daemon and every worker share it."""
    base = mps_dir(state_dir)
    return {
        "CUDA_MPS_PIPE_DIRECTORY": str(base / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(base / "log"),
    }


def _run(state_dir: Path, args: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **mps_env(state_dir)}
    return subprocess.run(
        [CONTROL, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def start(state_dir: Path) -> None:
    """Start this deployment's MPS control daemon (``-d`` returns once it runs in the
    background); an MpsError says why it could not."""
    if shutil.which(CONTROL) is None:
        raise MpsError(f"--cuda-mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    for path in mps_env(state_dir).values():
        Path(path).mkdir(parents=True, exist_ok=True)
    try:
        done = _run(state_dir, ["-d"], None)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MpsError(f"--cuda-mps: {CONTROL} -d failed: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise MpsError(
            f"--cuda-mps: {CONTROL} -d exited with {done.returncode}"
            + (f": {said[-1]}" if said else "")
        )
    log.info(
        "CUDA MPS control daemon started (pipes in %s)",
        mps_env(state_dir)["CUDA_MPS_PIPE_DIRECTORY"],
    )


def running(state_dir: Path) -> bool:
    """Whether this deployment started a control daemon that was not stopped since."""
    return (mps_dir(state_dir) / "pipe").is_dir()


def stop(state_dir: Path) -> None:
    """Stop this deployment's control daemon, if it started one (safe to call twice)."""
    if not running(state_dir):
        return
    try:
        done = _run(state_dir, [], "quit\n")
        if done.returncode != 0:
            log.warning("%s quit exited with %d: %s", CONTROL, done.returncode, done.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not stop the CUDA MPS control daemon: %s", exc)
    shutil.rmtree(mps_dir(state_dir) / "pipe", ignore_errors=True)
