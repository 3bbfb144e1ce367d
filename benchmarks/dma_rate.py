"""Host->device copy rate by source memory, destination memory, chunk size and stream count (GPU, no model).

    python benchmarks/dma_rate.py --gib 14 --json docs/bench/h200-dma-rate.json

Why: a wake's bulk copy runs from a registered POSIX shared-memory pool into VMM-mapped device memory, while the
copy floor is measured from torch's pinned (cudaHostAlloc) memory into cudaMalloc memory. This measures each
difference alone, several times, so that a gap between the wake and the floor can be placed. Also recorded: the
host's transparent-huge-page settings, the GPU's NUMA node and the pool pages' nodes.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ksleep.worker.vmm import VirtualRange, vmm_unavailable_reason  # noqa: E402
from worker_core import pinned_peak  # noqa: E402

GiB = 2**30
MADV_HUGEPAGE = 14


def read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host_facts() -> dict:
    bus = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id,pcie.link.gen.current,pcie.link.gen.max,"
                          "pcie.link.width.current", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
    bus_id = bus.split(",")[0].strip().lower()[-12:] if bus else ""
    return {
        "nvidia_smi_pcie": bus,
        "gpu_numa_node": read(f"/sys/bus/pci/devices/{bus_id}/numa_node"),
        "numa_nodes": read("/sys/devices/system/node/online"),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "iommu_groups": len(list(Path("/sys/kernel/iommu_groups").glob("*"))) if Path("/sys/kernel/iommu_groups").exists() else None,
        "dev_shm_mount": next((l for l in (read("/proc/mounts") or "").splitlines() if " /dev/shm " in l), None),
    }


def meminfo(*keys: str) -> dict:
    out = {}
    for line in (read("/proc/meminfo") or "").splitlines():
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = v.strip()
    return out


class Source:
    """nbytes of host memory of one kind, filled, pinned, as a uint8 tensor."""

    def __init__(self, kind: str, nbytes: int):
        self.kind, self.nbytes, self._mm, self._registered = kind, nbytes, None, []
        t = time.perf_counter()
        if kind == "cudaHostAlloc":
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.tensor.fill_(1)
        else:
            path = f"/dev/shm/ksleep-dma-{os.getpid()}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, nbytes)
            self._mm = mmap.mmap(fd, nbytes)
            os.close(fd)
            os.unlink(path)
            if kind == "shm_thp":
                self._mm.madvise(MADV_HUGEPAGE)
            self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
            self.tensor.fill_(1)
            base = self.tensor.data_ptr()
            for lo in range(0, nbytes, GiB):
                rc = int(torch.cuda.cudart().cudaHostRegister(base + lo, min(GiB, nbytes - lo), 1))
                if rc == 0:
                    self._registered.append(base + lo)
        self.setup_s = time.perf_counter() - t
        self.facts = {"setup_s": self.setup_s, **meminfo("ShmemHugePages", "ShmemPmdMapped", "AnonHugePages"),
                      "registered_chunks": len(self._registered)}

    def close(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        del self.tensor
        if self._mm is not None:
            self._mm.close()


class Dest:
    """nbytes of device memory: cudaMalloc, VMM mapped up front, or VMM mapped chunk by chunk as copies queue."""

    def __init__(self, kind: str, nbytes: int):
        self.kind, self.nbytes = kind, nbytes
        self._range = VirtualRange(torch.device("cuda"), nbytes) if kind.startswith("vmm") else None
        self._mapped: set[int] = set()
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if self._range is None else self._range.tensor

    def prepare(self, chunk: int) -> None:
        if self.kind == "vmm_premapped" and not self._mapped:
            for lo in range(0, self.nbytes, chunk):
                self._map(lo, chunk)

    def _map(self, lo: int, chunk: int) -> None:
        if lo not in self._mapped:
            self._range.map(lo, min(chunk, self.nbytes - lo))
            self._mapped.add(lo)

    def before_copy(self, lo: int, chunk: int) -> None:
        if self.kind == "vmm_deferred":
            self._map(lo, chunk)

    def after_rep(self) -> None:
        if self.kind == "vmm_deferred":  # a sleep: the physical memory goes back
            torch.cuda.synchronize()
            for lo in sorted(self._mapped):
                self._range.unmap(lo)
            self._mapped.clear()

    def close(self) -> None:
        self.after_rep()
        if self._range is not None:
            for lo in sorted(self._mapped):
                self._range.unmap(lo)
            self._mapped.clear()
            self._range.close()
        del self.tensor
        torch.cuda.empty_cache()


def copy_once(src: Source, dst: Dest, chunk: int, streams: list[torch.cuda.Stream]) -> float:
    """Seconds on the GPU's clock for the whole copy, queued as the wake queues it."""
    dst.prepare(chunk)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    for s in streams:
        s.wait_event(start)
    for i, lo in enumerate(range(0, src.nbytes, chunk)):
        hi = min(lo + chunk, src.nbytes)
        dst.before_copy(lo, chunk)
        with torch.cuda.stream(streams[i % len(streams)]):
            dst.tensor[lo:hi].copy_(src.tensor[lo:hi], non_blocking=True)
    end = torch.cuda.Event(enable_timing=True)
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    dst.after_rep()
    return seconds


def measure(src: Source, dst: Dest, chunk: int, n_streams: int, reps: int, pause: float) -> dict:
    streams = [torch.cuda.Stream() for _ in range(n_streams)]
    rates = []
    for _ in range(reps):
        if pause:
            time.sleep(pause)
        rates.append(src.nbytes / copy_once(src, dst, chunk, streams) / 1e9)
    return {"source": src.kind, "dest": dst.kind, "chunk_MiB": chunk // 2**20, "streams": n_streams,
            "pause_s": pause, "GBps": rates, "GBps_median": statistics.median(rates), "GBps_min": min(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=14, help="bytes copied per measurement, in GiB")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    nbytes = args.gib * GiB
    print("vmm:", vmm_unavailable_reason(torch.device("cuda")) or "available", flush=True)
    R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bytes": nbytes,
         "host": host_facts(), "pinned_peak_GBps_before": pinned_peak() / 1e9, "rows": [], "sources": {}}
    print(json.dumps(R["host"], indent=1), f"\npinned peak (4 GiB best of 3): {R['pinned_peak_GBps_before']:.2f} GB/s",
          flush=True)
    plan = {  # source -> [(dest, chunk, streams, pause)]
        "cudaHostAlloc": [("cudaMalloc", GiB, 1, 0), ("cudaMalloc", GiB, 2, 0), ("vmm_deferred", GiB, 1, 0)],
        "shm": [("cudaMalloc", GiB, 1, 0), ("vmm_premapped", GiB, 1, 0), ("vmm_deferred", GiB, 1, 0),
                ("cudaMalloc", 256 * 2**20, 1, 0), ("cudaMalloc", GiB, 2, 0), ("vmm_deferred", GiB, 2, 0),
                ("cudaMalloc", GiB, 1, 2.0), ("vmm_deferred", 256 * 2**20, 2, 0)],
        "shm_thp": [("vmm_deferred", GiB, 1, 0)],  # huge pages only where shmem_enabled allows madvise
    }
    for kind, rows in plan.items():
        src = Source(kind, nbytes)
        R["sources"][kind] = src.facts
        print(kind, src.facts, flush=True)
        try:
            for dest_kind, chunk, n_streams, pause in rows:
                try:
                    dst = Dest(dest_kind, nbytes)
                except RuntimeError as exc:  # one kind of memory missing must not end the run
                    R["rows"].append({"source": kind, "dest": dest_kind, "error": str(exc)})
                    print(kind, dest_kind, "failed:", exc, flush=True)
                    continue
                try:
                    row = measure(src, dst, chunk, n_streams, args.reps, pause)
                finally:
                    dst.close()
                R["rows"].append(row)
                print(f"{kind:14s} -> {dest_kind:14s} chunk {chunk // 2**20:5d} MiB x{n_streams} pause {pause}: "
                      f"median {row['GBps_median']:.2f} min {row['GBps_min']:.2f} GB/s "
                      f"[{' '.join(f'{r:.2f}' for r in row['GBps'])}]", flush=True)
        finally:
            src.close()
    R["pinned_peak_GBps_after"] = pinned_peak() / 1e9
    print(f"pinned peak after: {R['pinned_peak_GBps_after']:.2f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
