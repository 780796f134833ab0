"""Which device and dtype the engine runs on, and how much memory it uses there.

Memory comes from NVML when an NVIDIA GPU and its library exist (the whole device, as
``nvidia-smi`` shows it), else from torch's own CUDA/MPS counters, else from the process RSS on
CPU. No NVML is the normal case on CPU and MPS machines, never an error.

NVML is asked by the device's UUID, never by its CUDA index: with ``CUDA_VISIBLE_DEVICES``
remapped (flockctl gives each local worker its own GPUs), this process's ``cuda:0`` is NVML's GPU
2, say. The reading carries the CUDA index and the UUID, so the daemon can tell which GPU it is.
A worker that shares its GPU (``FLOCKCTL_GPU_SHARE``, 0.5 for half) counts only its share of the
device's memory as free.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil
import torch

from flockctl.schema import DeviceMemory as MemoryReading


class DeviceError(ValueError):
    """The requested device or dtype is not available here."""


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available (torch sees none)")
    if name == "mps" and not _mps_available():
        raise DeviceError("--device mps: Apple MPS is not available on this machine")
    if name not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"--device {name}: expected auto, cuda, mps or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA where supported (float16 otherwise), float16 on MPS, float32 on
    CPU (CPU half-precision matmuls are slower than float32 on most machines)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise DeviceError(f"--dtype {name}: expected auto, float32, float16 or bfloat16")
    return dtypes[name]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


class DeviceMemory:
    """Reads used/total memory of one device; NVML is tried once and remembered."""

    def __init__(self, device: torch.device):
        self.device = device
        self._nvml_handle: Any = None
        self.name = self._name()
        self.index: int | None = None
        self.uuid: str | None = None
        if device.type == "cuda":
            self.index = device.index if device.index is not None else torch.cuda.current_device()
            self.uuid = _cuda_uuid(self.index)
            self._nvml_handle = _nvml_handle(self.uuid)

    def _name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "mps":
            return "Apple MPS"
        return platform.processor() or platform.machine() or "cpu"

    def free_bytes(self) -> int:
        """Memory the engine could still claim on the device (used for the default KV budget)."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return shared_free(int(free), int(total), gpu_share())
        if self.device.type == "mps":
            limit = int(torch.mps.recommended_max_memory())
            return max(0, limit - int(torch.mps.driver_allocated_memory()))
        return int(psutil.virtual_memory().available)

    def read(self) -> MemoryReading:
        if self._nvml_handle is not None:
            try:
                import pynvml

                mem = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
                return self._reading(int(mem.used), int(mem.total), "nvml")
            except Exception:  # the driver went away; fall back to torch's counters
                self._nvml_handle = None
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return self._reading(int(total - free), int(total), "torch")
        if self.device.type == "mps":
            used = int(torch.mps.driver_allocated_memory())
            return self._reading(used, int(torch.mps.recommended_max_memory()), "torch")
        rss = int(psutil.Process().memory_info().rss)
        return self._reading(rss, int(psutil.virtual_memory().total), "psutil")

    def _reading(self, used: int, total: int, source: str) -> MemoryReading:
        reading: MemoryReading = {
            "type": self.device.type,
            "name": self.name,
            "memory_used": used,
            "memory_total": total,
            "source": source,
        }
        if self.index is not None:
            reading["index"] = self.index
        if self.uuid is not None:
            reading["uuid"] = self.uuid
        return reading


def gpu_share() -> float:
    """The share of its GPU this engine may use (``FLOCKCTL_GPU_SHARE``; 1 when unset)."""
    try:
        share = float(os.environ.get("FLOCKCTL_GPU_SHARE", "1"))
    except ValueError:
        return 1.0
    return share if 0 < share <= 1 else 1.0


def shared_free(free: int, total: int, share: float) -> int:
    """Free memory within this engine's share of a device: of a GPU shared by two engines
    (share 0.5), the second to start finds the first's memory gone, and each may claim at most
    half the device."""
    return max(0, min(free, int(total * share))) if share < 1 else free


def _cuda_uuid(index: int) -> str | None:
    """NVML's UUID (``GPU-...``) of CUDA device ``index``, as torch knows it."""
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # an older torch without it
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def _nvml_handle(uuid: str | None) -> Any:
    """An NVML handle for the GPU ``uuid``, or None when NVML is not there (normal)."""
    if uuid is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # no library, no driver, or a UUID NVML doesn't know
        return None
