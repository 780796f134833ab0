"""A stand-in for ``pynvml`` (NVIDIA's NVML bindings) that reports GPUs this machine does not have.

Tests put it in ``sys.modules["pynvml"]`` (``install``), so flockctl's GPU code runs unchanged:
GPU ``i`` has UUID ``GPU-fake-<i>``, 80 GiB, and ``i + 1`` GiB in use, so each worker's memory
figures tell which GPU they were read from. ``install(monkeypatch, 0)`` is a machine with NVML
and no GPU; ``install(monkeypatch, None)`` one without the library at all.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclass
class Memory:
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass
class Device:
    index: int
    uuid: str
    name: str
    memory: Memory


def make_module(count: int | None) -> types.ModuleType:
    """A ``pynvml`` with ``count`` GPUs (None: the library is missing)."""
    devices = [
        Device(i, f"GPU-fake-{i}", "Fake H100", Memory(80 * GIB, (i + 1) * GIB))
        for i in range(count or 0)
    ]
    by_uuid = {d.uuid: d for d in devices}
    lib = types.ModuleType("pynvml")

    def init() -> None:
        if count is None:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def by_index(index: int) -> Device:
        if not 0 <= index < len(devices):
            raise NVMLError("Invalid Argument")
        return devices[index]

    def by_uuid_of(uuid: Any) -> Device:
        key = uuid.decode() if isinstance(uuid, bytes) else uuid
        if key not in by_uuid:
            raise NVMLError("Not Found")
        return by_uuid[key]

    lib.NVMLError = NVMLError  # type: ignore[attr-defined]
    lib.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound  # type: ignore[attr-defined]
    lib.nvmlInit = init  # type: ignore[attr-defined]
    lib.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    lib.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    lib.nvmlDeviceGetHandleByIndex = by_index  # type: ignore[attr-defined]
    lib.nvmlDeviceGetHandleByUUID = by_uuid_of  # type: ignore[attr-defined]
    lib.nvmlDeviceGetUUID = lambda d: d.uuid  # type: ignore[attr-defined]
    lib.nvmlDeviceGetName = lambda d: d.name  # type: ignore[attr-defined]
    lib.nvmlDeviceGetMemoryInfo = lambda d: d.memory  # type: ignore[attr-defined]
    lib.devices = devices  # type: ignore[attr-defined]
    return lib


def install(monkeypatch: Any, count: int | None) -> types.ModuleType:
    """Make ``import pynvml`` give a fake with ``count`` GPUs for the rest of the test."""
    lib = make_module(count)
    monkeypatch.setitem(sys.modules, "pynvml", lib)
    return lib
