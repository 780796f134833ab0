"""Which GPUs each local worker gets: NVML's list of GPUs, and a pure assignment of them.

Four engines started on a four-GPU machine without placement all land on ``cuda:0``. Here each
local worker gets its own ``CUDA_VISIBLE_DEVICES`` (NVML's indices, with ``CUDA_DEVICE_ORDER=
PCI_BUS_ID`` so CUDA numbers the GPUs as NVML and ``nvidia-smi`` do). A worker takes
``per_worker`` GPUs: a whole number of GPUs of its own, or a share of one (``0.5``: two workers
on a GPU), spread over the least loaded GPUs first. When none is free the worker waits, and
``Placement.why_none`` is the reason ``status`` shows.

NVML is read through ``pynvml`` (the ``nvidia-ml-py`` package). No library, no driver or no GPU
is the normal case on most machines and means "no GPUs", never an error. The module is looked up
when it is used, so tests put a fake NVML in ``sys.modules["pynvml"]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import ModuleType
from typing import TYPE_CHECKING, Any

from flockctl.schema import GpuMemory

if TYPE_CHECKING:
    from flockctl.server.config import DeploymentConfig


class PlacementError(ValueError):
    """GPU flags that cannot work on this machine; the message names the flag."""


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML numbers it."""

    index: int
    uuid: str
    name: str
    memory_total: int


def nvml() -> ModuleType | None:
    """``pynvml``, initialised, or None when there is no NVML here (no library, no driver)."""
    try:
        lib = importlib.import_module("pynvml")
        lib.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, ImportError, a driver that went away
        return None
    return lib


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover(lib: ModuleType | None = None) -> list[Gpu]:
    """Every GPU NVML sees, in its order; empty when there is no NVML or no GPU."""
    lib = lib if lib is not None else nvml()
    if lib is None:
        return []
    try:
        found = []
        for index in range(int(lib.nvmlDeviceGetCount())):
            handle = lib.nvmlDeviceGetHandleByIndex(index)
            memory = lib.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                Gpu(
                    index,
                    _text(lib.nvmlDeviceGetUUID(handle)),
                    _text(lib.nvmlDeviceGetName(handle)),
                    int(memory.total),
                )
            )
        return found
    except Exception:  # a driver that stopped answering: as good as none
        return []


def memory_of(gpus: Sequence[Gpu], lib: ModuleType | None = None) -> GpuMemory | None:
    """The memory of ``gpus`` (summed over several), read by UUID so it is these GPUs whatever
    ``CUDA_VISIBLE_DEVICES`` does to the numbering; None when NVML cannot say."""
    lib = lib if lib is not None else nvml()
    if lib is None or not gpus:
        return None
    used = total = 0
    try:
        for gpu in gpus:
            info = lib.nvmlDeviceGetMemoryInfo(lib.nvmlDeviceGetHandleByUUID(gpu.uuid))
            used, total = used + int(info.used), total + int(info.total)
    except Exception:
        return None
    device = "cuda:" + ",".join(str(g.index) for g in gpus)
    return {"used": used, "total": total, "device": device, "source": "nvml"}


def parse_indices(value: str | Iterable[Any]) -> list[int]:
    """``"0,1,3"`` (or a list) as GPU indices; a ValueError names what is not one."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    indices: list[int] = []
    for part in parts:
        text = str(part).strip()
        if not text.isdigit():
            raise ValueError(f"{text!r} is not a GPU index (0, 1, ... as nvidia-smi numbers them)")
        if int(text) in indices:
            raise ValueError(f"GPU {text} is listed twice")
        indices.append(int(text))
    if not indices:
        raise ValueError("no GPU index given")
    return indices


def check_share(per_worker: float) -> None:
    """A share a worker can take: a whole number of GPUs, or a part of one."""
    if per_worker < 0:
        raise ValueError(f"{per_worker:g} is negative")
    if per_worker > 1 and per_worker != int(per_worker):
        raise ValueError(f"{per_worker:g}: above 1, give a whole number of GPUs")


@dataclass(frozen=True)
class Assignment:
    """The GPUs one worker was given, and its share of each (1 for GPUs of its own)."""

    gpus: tuple[Gpu, ...]
    share: Fraction

    @property
    def count(self) -> int:
        """What ``{gpus}`` becomes in a worker command (vLLM's ``--tensor-parallel-size``)."""
        return len(self.gpus)

    def env(self, mps: bool = False) -> dict[str, str]:
        """What the worker's environment carries: its GPUs, their order, its share, and under
        CUDA MPS the part of each GPU's threads it may use."""
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in self.gpus),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "FLOCKCTL_GPU_SHARE": f"{float(self.share):g}",
        }
        if mps:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, round(float(self.share) * 100)))
        return env

    def describe(self) -> str:
        """``GPU 0``, ``GPU 0,1``, ``GPU 2 (0.5 of it)``: as ``status`` shows the worker's place."""
        where = "GPU " + ",".join(str(g.index) for g in self.gpus)
        return where if self.share == 1 else f"{where} ({float(self.share):g} of it)"


class Placement:
    """Gives workers GPUs and takes them back; pure (no NVML, no processes)."""

    def __init__(self, gpus: Sequence[Gpu], per_worker: float) -> None:
        check_share(per_worker)
        if per_worker <= 0:
            raise ValueError("a placement gives each worker some GPU; 0 means no placement")
        self.gpus = list(gpus)
        self.per_worker = per_worker
        self._count = max(1, math.floor(per_worker))
        self._share = (
            Fraction(1) if per_worker >= 1 else Fraction(per_worker).limit_denominator(100)
        )
        self._load: dict[int, Fraction] = {g.index: Fraction(0) for g in self.gpus}
        self._given: dict[str, Assignment] = {}

    def of(self, worker_id: str) -> Assignment | None:
        return self._given.get(worker_id)

    def assign(self, worker_id: str) -> Assignment | None:
        """The GPUs for ``worker_id`` (the same ones if it has some), or None when too few are
        free (``why_none`` says why)."""
        if worker_id in self._given:
            return self._given[worker_id]
        room = [g for g in self.gpus if self._load[g.index] + self._share <= 1]
        if len(room) < self._count:
            return None
        room.sort(key=lambda g: (self._load[g.index], g.index))
        chosen = tuple(sorted(room[: self._count], key=lambda g: g.index))
        return self._take(worker_id, chosen)

    def restore(self, worker_id: str, indices: Sequence[int]) -> Assignment | None:
        """Give ``worker_id`` back the GPUs it had (a worker re-adopted after a restart)."""
        chosen = tuple(g for g in self.gpus if g.index in set(indices))
        return self._take(worker_id, chosen) if chosen else None

    def _take(self, worker_id: str, chosen: tuple[Gpu, ...]) -> Assignment:
        for gpu in chosen:
            self._load[gpu.index] += self._share
        assignment = Assignment(chosen, self._share)
        self._given[worker_id] = assignment
        return assignment

    def release(self, worker_id: str) -> None:
        assignment = self._given.pop(worker_id, None)
        if assignment is not None:
            for gpu in assignment.gpus:
                self._load[gpu.index] = max(Fraction(0), self._load[gpu.index] - assignment.share)

    def why_none(self) -> str:
        """Why a worker gets no GPU now: what it needs and who holds them."""
        need = (
            f"{self._count} GPU{'s' if self._count > 1 else ''}"
            if self._share == 1
            else f"{float(self._share):g} of a GPU"
        )
        holders = ", ".join(f"{w}: {a.describe()}" for w, a in sorted(self._given.items()))
        indices = ",".join(str(g.index) for g in self.gpus)
        return (
            f"waiting for a GPU: it needs {need} (--gpus-per-worker {self.per_worker:g}) and"
            f" GPUs {indices} are taken ({holders or 'by nobody'}); it starts when a worker"
            " ends, or give it more GPUs with --gpus"
        )


def choose(gpus: Sequence[Gpu], wanted: Sequence[int] | None) -> list[Gpu]:
    """The GPUs ``--gpus`` names (every one NVML sees when it names none); a PlacementError
    names an index this machine does not have."""
    if not gpus:
        raise PlacementError(
            "--gpus, --gpus-per-worker and --cuda-mps need NVIDIA GPUs, and NVML sees none on"
            " this machine; leave them out to run the workers without GPUs"
        )
    if wanted is None:
        return list(gpus)
    known = {g.index: g for g in gpus}
    missing = [i for i in wanted if i not in known]
    if missing:
        raise PlacementError(
            f"--gpus: no GPU {','.join(map(str, missing))} here; NVML sees GPUs"
            f" {','.join(str(g.index) for g in gpus)}"
        )
    return [known[i] for i in wanted]


def placement_for(cfg: DeploymentConfig, lib: ModuleType | None = None) -> Placement | None:
    """The placement of a local deployment's workers, or None when they get no GPUs of their
    own: no GPU here and none asked for, or ``--gpus-per-worker 0`` (the default for a worker
    command other than flockctl's engine). GPU flags on a machine without GPUs, or a GPU it
    does not have, raise a PlacementError."""
    asked = cfg.gpus is not None or bool(cfg.gpus_per_worker) or cfg.cuda_mps
    found = discover(lib)
    if not found and not asked:
        return None
    chosen = choose(found, cfg.gpus)
    share = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else engine_share(cfg)
    return Placement(chosen, share) if share > 0 else None


def engine_share(cfg: DeploymentConfig) -> float:
    """``--gpus-per-worker``'s default: one GPU for flockctl's engine, none for other commands
    (their own flags say how many GPUs they use)."""
    runs_engine = cfg.model is not None or any(g.model is not None for g in cfg.groups)
    return 1.0 if runs_engine else 0.0
