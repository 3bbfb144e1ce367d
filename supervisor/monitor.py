"""Device memory as the supervisor sees it, without a CUDA context of its own.

Backends, first that works: NVML (nvidia-ml-py) on NVIDIA; amdsmi, `rocm-smi` or Hygon's `hy-smi` on AMD/DCU;
else the worker's own report (torch.cuda.mem_get_info, or host RAM for a cpu device). Samples go into a
bounded time series for plots.
"""
from __future__ import annotations

import collections
import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger("ksleep.monitor")


@dataclass(slots=True)
class DeviceMemory:
    used: int
    total: int
    process: int | None  # the worker's own bytes, where the backend can tell


class NvmlBackend:
    name = "nvml"

    def __init__(self, uuid: str):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)

    def read(self, pid: int | None) -> DeviceMemory:
        nvml = self._nvml
        info = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        process = None
        if pid:
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                process = next((int(p.usedGpuMemory or 0) for p in procs if p.pid == pid), 0)
            except nvml.NVMLError:
                process = None
        return DeviceMemory(int(info.used), int(info.total), process)


class AmdSmiBackend:
    name = "amdsmi"

    def __init__(self, index: int):
        import amdsmi

        self._amdsmi = amdsmi
        amdsmi.amdsmi_init()
        self._handle = amdsmi.amdsmi_get_processor_handles()[index]

    def read(self, pid: int | None) -> DeviceMemory:
        usage = self._amdsmi.amdsmi_get_gpu_vram_usage(self._handle)  # MiB
        return DeviceMemory(int(usage["vram_used"]) << 20, int(usage["vram_total"]) << 20, None)


class SmiCliBackend:
    """`rocm-smi` or Hygon's `hy-smi` (same flags and JSON): --showmeminfo vram --json."""

    def __init__(self, tool: str, index: int):
        self.name = tool
        self._argv = [shutil.which(tool), "--showmeminfo", "vram", "--json"]
        self._index = index
        self.read(None)  # fail now, at selection, if the output is not what we parse

    def read(self, pid: int | None) -> DeviceMemory:
        out = subprocess.run(self._argv, capture_output=True, text=True, timeout=10, check=True).stdout
        return parse_smi_json(out, self._index)


def parse_smi_json(text: str, index: int) -> DeviceMemory:
    cards = json.loads(text)
    card = cards.get(f"card{index}") or list(cards.values())[index]
    total = next(int(v) for k, v in card.items() if "total" in k.lower() and "used" not in k.lower())
    used = next(int(v) for k, v in card.items() if "used" in k.lower())
    return DeviceMemory(used, total, None)


def select_backend(device: str, uuid: str):
    """The first backend that can read `device` (e.g. "cuda:0"); None means: ask the worker."""
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    candidates = []
    if uuid:
        candidates.append(lambda: NvmlBackend(uuid))
    candidates.append(lambda: AmdSmiBackend(index))
    candidates += [lambda tool=tool: SmiCliBackend(tool, index) for tool in ("rocm-smi", "hy-smi") if shutil.which(tool)]
    for make in candidates:
        try:
            backend = make()
            log.info("device memory from %s", backend.name)
            return backend
        except Exception as exc:  # noqa: BLE001 - absent library, driver or tool: try the next one
            log.debug("memory backend unavailable: %s", exc)
    return None


@dataclass(slots=True)
class Sample:
    at_unix: float
    state: int  # common_pb2.State
    device_used: int | None  # None: the reading failed (the figure is left out, the answer is not)
    worker_device: int | None
    pool_bytes: int


class MemoryHistory:
    """The bounded time series behind Status(include_history) and the benchmark's plot."""

    def __init__(self, maxlen: int):
        self.samples: collections.deque[Sample] = collections.deque(maxlen=maxlen)

    def add(self, state: int, memory: DeviceMemory | None, pool_bytes: int) -> Sample:
        sample = Sample(time.time(), state, memory.used if memory else None, memory.process if memory else None, pool_bytes)
        self.samples.append(sample)
        return sample
