"""GPU placement for local workers, against a fake NVML (tests/fake_nvml.py) with four GPUs.

The placement itself is pure and tested directly; the daemon tests run real worker processes
(the fake OpenAI server) and read each one's environment from /proc, and its memory figures
from the status snapshot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import fake_nvml
import pytest
from conftest import fake_worker_command, until
from typer.testing import CliRunner

from flockctl.cli import app
from flockctl.server.engine_stats import gpu_memory_of
from flockctl.server.gpus import Gpu, Placement, discover, memory_of

GIB = 1 << 30
FOUR = [Gpu(i, f"GPU-fake-{i}", "Fake H100", 80 * GIB) for i in range(4)]


def environ(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_four_workers_get_a_gpu_each_and_a_fifth_waits_saying_who_holds_them():
    placement = Placement(FOUR, 1)
    given = [placement.assign(f"w{i}") for i in range(1, 5)]
    assert [a.env()["CUDA_VISIBLE_DEVICES"] for a in given if a] == ["0", "1", "2", "3"]
    assert placement.assign("w5") is None
    assert "w1: GPU 0" in placement.why_none() and "w4: GPU 3" in placement.why_none()
    placement.release("w3")
    again = placement.assign("w5")
    assert again is not None and again.describe() == "GPU 2"


def test_shares_put_two_workers_on_each_gpu_and_whole_numbers_take_several():
    halves = Placement(FOUR, 0.5)
    given = [halves.assign(f"w{i}") for i in range(8)]
    assert sorted(a.gpus[0].index for a in given if a) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert halves.assign("w9") is None
    env = given[0].env(mps=True) if given[0] else {}
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert env["FLOCKCTL_GPU_SHARE"] == "0.5"
    pairs = Placement(FOUR, 2)
    first, second = pairs.assign("a"), pairs.assign("b")
    assert first is not None and first.count == 2
    assert first.env()["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert second is not None and second.env()["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert pairs.assign("c") is None


def test_nvml_is_read_by_uuid_and_no_library_means_no_gpus(monkeypatch):
    lib = fake_nvml.install(monkeypatch, 4)
    gpus = discover()
    assert [g.uuid for g in gpus] == [f"GPU-fake-{i}" for i in range(4)]
    memory = memory_of([gpus[2]])
    assert memory == {"used": 3 * GIB, "total": 80 * GIB, "device": "cuda:2", "source": "nvml"}
    lib.devices[2].memory.used = 9 * GIB  # read again, not remembered
    assert memory_of([gpus[2]])["used"] == 9 * GIB  # type: ignore[index]
    fake_nvml.install(monkeypatch, None)
    assert discover() == []


def test_an_engines_device_is_named_by_the_gpu_its_uuid_is_here():
    """Inside a worker given GPU 2 the engine's device is cuda:0; status names the real one."""
    device = {
        "type": "cuda",
        "index": 0,
        "uuid": "GPU-fake-2",
        "name": "Fake H100",
        "memory_used": 3 * GIB,
        "memory_total": 80 * GIB,
        "source": "nvml",
    }
    stats = {"engine": "flockctl", "device": device}
    known = {f"GPU-fake-{i}": i for i in range(4)}
    assert gpu_memory_of(stats, known)["device"] == "cuda:2"  # type: ignore[arg-type,index]
    assert gpu_memory_of(stats, {})["device"] == "cuda:0"  # type: ignore[arg-type,index]


@pytest.mark.parametrize(
    ("gpus", "flags", "said"),
    [
        (None, ["--gpus", "0"], "NVML sees none"),
        (0, ["--gpus-per-worker", "0.5"], "NVML sees none"),
        (None, ["--cuda-mps"], "NVML sees none"),
        (4, ["--gpus", "1,7"], "no GPU 7 here; NVML sees GPUs 0,1,2,3"),
        (4, ["--gpus-per-worker", "1.5"], "give a whole number of GPUs"),
    ],
)
def test_gpu_flags_that_cannot_work_here_are_refused_with_exit_2(monkeypatch, gpus, flags, said):
    fake_nvml.install(monkeypatch, gpus)
    result = CliRunner().invoke(app, ["up", "--model", "demo", *flags])
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert "Traceback" not in result.output


def test_the_engine_refuses_a_max_model_len_its_gpu_cannot_hold():
    from flockctl.engine.kv import KVBudgetTooSmall, cuda_kv_budget

    mib = 1 << 20
    # 2 GiB free, 1 MiB a token: 1638 tokens after the margin
    assert cuda_kv_budget(2 * GIB, mib, 1024, 10**6, 16, required=True) == 1638
    with pytest.raises(KVBudgetTooSmall, match=r"--max-model-len 4096 needs 4\.00 GiB"):
        cuda_kv_budget(2 * GIB, mib, 4096, 10**6, 16, required=True)
    # the model's own context (no flag given) is cut to fit, as before
    assert cuda_kv_budget(2 * GIB, mib, 4096, 10**6, 16, required=False) == 1638
    assert cuda_kv_budget(2 * GIB, mib, 1024, 3000, 16, required=True) == 1638
    assert cuda_kv_budget(2 * GIB, mib, 1024, 1000, 16, required=False) == 1000


def test_a_shared_gpu_counts_only_its_share_as_free():
    from flockctl.engine.device import shared_free

    assert shared_free(70 * GIB, 80 * GIB, 0.5) == 40 * GIB
    assert shared_free(30 * GIB, 80 * GIB, 0.5) == 30 * GIB
    assert shared_free(70 * GIB, 80 * GIB, 1.0) == 70 * GIB


@pytest.mark.e2e
async def test_four_gpus_four_workers_each_its_own_and_a_fifth_waits(daemon, monkeypatch):
    fake_nvml.install(monkeypatch, 4)
    d = await daemon(
        worker_command=fake_worker_command("--model", "tp{gpus}"),
        gpus_per_worker=1,
        autoscaler="fixed",
        replicas=5,
        max_workers=5,
    )
    pool = d.deployment.pool
    await d.wait_ready(4)
    fifth = await until(
        lambda: next((w for w in pool if w.state.value == "PROVISIONING"), None),
        "a worker left without a GPU",
    )
    assert fifth.pid is None
    assert fifth.reason.startswith("waiting for a GPU: it needs 1 GPU (--gpus-per-worker 1)")
    ready = [w for w in pool if w.state.value == "READY"]
    seen = {environ(w.pid)["CUDA_VISIBLE_DEVICES"]: w for w in ready}
    assert sorted(seen) == ["0", "1", "2", "3"]
    assert all("--model tp1" in (d.deployment.provisioner.command_line(w) or "") for w in ready)
    await until(lambda: all(w.gpu_memory for w in ready), "each worker's GPU memory")
    snapshot = d.deployment.snapshot()
    by_id = {w["id"]: w for w in snapshot["workers"]}
    for index, worker in seen.items():
        view = by_id[worker.id]
        assert view["gpu_memory"]["device"] == f"cuda:{index}"
        assert view["gpu_memory"]["used"] == (int(index) + 1) * GIB  # that GPU's own figure
        assert view["resource"] == f"GPU {index}"
    assert "waiting for a GPU" in by_id[fifth.id]["reason"]
    # a worker that ends frees its GPU, and the waiting one starts on it
    gone = seen["2"]
    os.kill(gone.pid, signal.SIGKILL)
    await until(lambda: fifth.pid is not None, "the fifth worker to start")
    assert environ(fifth.pid)["CUDA_VISIBLE_DEVICES"] == "2"


def fake_mps_control(bin_dir: Path, log: Path) -> None:
    """``nvidia-cuda-mps-control`` as a script: logs each call, its pipe dir and its stdin."""
    script = bin_dir / "nvidia-cuda-mps-control"
    script.write_text(
        f'#!/bin/sh\necho "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {log}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.e2e
async def test_two_workers_per_gpu_under_cuda_mps(daemon, monkeypatch, tmp_path):
    fake_nvml.install(monkeypatch, 4)
    bin_dir, log = tmp_path / "bin", tmp_path / "mps.log"
    bin_dir.mkdir()
    fake_mps_control(bin_dir, log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    d = await daemon(
        worker_command=fake_worker_command(),
        gpus=[1],
        gpus_per_worker=0.5,
        cuda_mps=True,
        autoscaler="fixed",
        replicas=2,
        max_workers=2,
    )
    await d.wait_ready(2)
    state_dir = d.deployment.state_dir
    envs = [environ(w.pid) for w in d.deployment.pool]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "1"]
    assert [e["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] for e in envs] == ["50", "50"]
    assert {e["CUDA_MPS_PIPE_DIRECTORY"] for e in envs} == {str(state_dir / "mps" / "pipe")}
    calls = log.read_text().splitlines()
    assert calls == [f"args=-d pipe={state_dir / 'mps' / 'pipe'} stdin="]  # started once
    d.server.should_exit = True
    await asyncio.wait_for(d.task, 30)
    calls = log.read_text().splitlines()
    assert calls[1:] == [f"args= pipe={state_dir / 'mps' / 'pipe'} stdin=quit"]  # stopped
