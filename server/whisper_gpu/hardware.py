"""What the machine offers: CPU cores and memory as the container sees them, and NVIDIA GPUs through NVML."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import CpuThreads, Device

_LOGGER = logging.getLogger(__name__)
_MB = 1024 * 1024
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class DeviceMemory:
    """Memory of a device in MB."""

    total_mb: int
    free_mb: int


def cpu_threads(settings: Mapping[str, Any]) -> CpuThreads:
    """The CPU threads the settings give inference (`cpu_threads`, 0 for every usable core) and how they are shared."""
    return CpuThreads(settings["cpu_threads"] or usable_cpu_count(), settings["cpu_threads_per_worker"])


def usable_cpu_count() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a Kubernetes limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit, period = _cpu_quota()
    if limit > 0 and period > 0:
        cores = min(cores, max(1, -(-limit // period)))
    return max(1, cores)


def _cpu_quota() -> tuple[int, int]:
    """The cgroup CPU quota and period in microseconds (v2, else v1); (0, 0) when unlimited."""
    v2 = _read(_CGROUP / "cpu.max")
    if v2:
        limit, _, period = v2.partition(" ")
        return (int(limit), int(period)) if limit.isdigit() and period.isdigit() else (0, 0)
    limit_v1 = _read(_CGROUP / "cpu" / "cpu.cfs_quota_us") or ""
    period_v1 = _read(_CGROUP / "cpu" / "cpu.cfs_period_us") or ""
    if limit_v1.isdigit() and period_v1.isdigit():
        return int(limit_v1), int(period_v1)
    return 0, 0


def cpu_name() -> str:
    """The CPU's model name."""
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "CPU"


def cpu_memory() -> DeviceMemory:
    """Memory as the container sees it: the cgroup limit when there is one, else the machine's."""
    meminfo = _meminfo()
    total = meminfo.get("MemTotal", 0)
    free = meminfo.get("MemAvailable", 0)
    for limit_file, usage_file in (
        (_CGROUP / "memory.max", _CGROUP / "memory.current"),
        (_CGROUP / "memory" / "memory.limit_in_bytes", _CGROUP / "memory" / "memory.usage_in_bytes"),
    ):
        limit, usage = _read(limit_file), _read(usage_file)
        if limit and usage and limit.isdigit() and usage.isdigit() and int(limit) // _MB < total:
            total = int(limit) // _MB
            free = min(free, max(0, total - int(usage) // _MB))
            break
    return DeviceMemory(total, free)


def gpu_name_and_memory(index: int) -> tuple[str, DeviceMemory] | None:
    """The GPU's name and memory through NVML, or None without a driver."""
    try:
        import pynvml  # noqa: PLC0415 - loads the NVIDIA driver library

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as err:  # noqa: BLE001 - no driver, no library, no such GPU
        _LOGGER.debug("NVML unavailable: %s", err)
        return None
    return (name.decode() if isinstance(name, bytes) else str(name)), DeviceMemory(
        int(memory.total) // _MB, int(memory.free) // _MB
    )


def device_memory(device: Device) -> DeviceMemory:
    """Memory of the device that runs the model."""
    if device.kind == "cuda":
        gpu = gpu_name_and_memory(device.index)
        if gpu is not None:
            return gpu[1]
    return cpu_memory()


def describe_device(device: Device) -> dict[str, object]:
    """The device as `GET /api/v1/info` shows it."""
    if device.kind == "cuda":
        gpu = gpu_name_and_memory(device.index)
        if gpu is not None:
            name, memory = gpu
            return {
                "type": "cuda",
                "index": device.index,
                "name": name,
                "memory_total_mb": memory.total_mb,
                "memory_free_mb": memory.free_mb,
            }
    memory = cpu_memory()
    return {
        "type": device.kind,
        "name": cpu_name(),
        "cores": usable_cpu_count(),
        "memory_total_mb": memory.total_mb,
        "memory_free_mb": memory.free_mb,
    }


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in (_read(Path("/proc/meminfo")) or "").splitlines():
        key, _, rest = line.partition(":")
        number = rest.strip().split(" ")[0]
        if number.isdigit():
            values[key] = int(number) // 1024
    return values


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
