"""One memory report: what the arena, the caches, the device, the mirror and the process hold."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import psutil
import torch

from ksleep.v1 import common_pb2


@dataclass(slots=True)
class MemoryReport:
    arena_bytes: int  # the layout's size (weights + alignment padding)
    weight_bytes: int  # the weights alone
    resident_bytes: int  # arena bytes on the device right now
    cache_bytes: int  # KV cache / activations held by torch's allocator, outside the arena
    device_used_bytes: int  # device-wide (for cpu: host RAM in use)
    device_total_bytes: int
    process_device_bytes: int | None  # this process's device memory where the platform tells it (NVML; RSS on cpu)
    mirror_bytes: int  # the shared-memory pool (0 once dropped)
    rss_bytes: int  # this process's resident set (includes the touched part of the mirror)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_pb(self) -> common_pb2.Memory:
        return common_pb2.Memory(**self.to_dict())


def nvml_process_bytes(device: torch.device, pid: int) -> int | None:
    """Device memory used by `pid` according to NVML, or None where NVML is absent or cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver, ROCm, or nvidia-ml-py missing
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                return int(proc.usedGpuMemory or 0)
        return 0
    except Exception:  # containers hide pids from NVML; the device-wide figure still stands
        return None
    finally:
        pynvml.nvmlShutdown()


def measure(device: torch.device, *, arena_bytes: int, weight_bytes: int, resident_bytes: int,
            arena_in_torch_allocator: bool, mirror_bytes: int, scratch_bytes: int = 0) -> MemoryReport:
    rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        # the batch KV cache (scratch) counts as cache; with VMM it is outside torch's allocator
        cache = max(0, reserved - resident_bytes) if arena_in_torch_allocator else reserved + scratch_bytes
        return MemoryReport(arena_bytes, weight_bytes, resident_bytes, cache, total - free, total,
                            nvml_process_bytes(device, os.getpid()), mirror_bytes, rss)
    vm = psutil.virtual_memory()  # a cpu "device" is host RAM; the process's own share of it is its RSS
    return MemoryReport(arena_bytes, weight_bytes, resident_bytes, 0, vm.total - vm.available, vm.total,
                        rss, mirror_bytes, rss)
