"""Micro-benchmark of the pieces of a level-1 wake on raw buffers (no model): bulk vs chunked host->device copy
from a registered /dev/shm mirror, and ways to checksum the arena, alone and overlapped with the copy.

    python benchmarks/wake_paths.py --gib 14.2
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import time

import torch

from ksleep.worker.pool import BLOCK_BYTES

MiB = 2**20


def timed(fn, reps=3) -> float:
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=14.2)
    ap.add_argument("--json")
    args = ap.parse_args()
    n = int(args.gib * 2**30) // BLOCK_BYTES * BLOCK_BYTES
    path = "/dev/shm/ksleep-wake-paths"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, n)
    mm = mmap.mmap(fd, n)
    host = torch.frombuffer(mm, dtype=torch.uint8)
    host.view(torch.int64)[:: 4096].fill_(12345)  # not all zeros
    assert int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n, 0)) == 0
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    R = {"bytes": n}
    R["bulk_copy_s"] = timed(lambda: dev.copy_(host, non_blocking=True))
    R["GBps"] = n / R["bulk_copy_s"] / 1e9

    rows = n // BLOCK_BYTES
    sums = {
        "int64_sum_dim1": lambda x: x.view(torch.int64).view(rows, -1).sum(dim=1),
        "int32_sum_dim1_acc64": lambda x: x.view(torch.int32).view(rows, -1).sum(dim=1, dtype=torch.int64),
        "int64_two_stage": lambda x: x.view(torch.int64).view(rows * 64, -1).sum(dim=1).view(rows, 64).sum(dim=1),
        "float32_sum_dim1": lambda x: x.view(torch.float32).view(rows, -1).nan_to_num().sum(dim=1),
    }
    for name, fn in sums.items():
        R[f"checksum_{name}_s"] = timed(lambda: fn(dev))
    expected = sums["int64_sum_dim1"](dev)

    for chunk_mib in (64, 256, 1024):
        c = chunk_mib * MiB

        def chunked():
            for lo in range(0, n, c):
                dev[lo : lo + c].copy_(host[lo : lo + c], non_blocking=True)

        R[f"chunked_copy_{chunk_mib}MiB_s"] = timed(chunked)
        side = torch.cuda.Stream()

        def overlapped(fn=sums["int64_two_stage"]):
            main = torch.cuda.current_stream()
            flags = []
            for lo in range(0, n, c):
                hi = min(n, lo + c)
                dev[lo:hi].copy_(host[lo:hi], non_blocking=True)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    got = dev[lo:hi].view(torch.int64).view(-1, BLOCK_BYTES // 8).sum(dim=1)
                    flags.append((got != expected[lo // BLOCK_BYTES : hi // BLOCK_BYTES]).any())
            main.wait_stream(side)
            assert not bool(torch.stack(flags).any())

        R[f"overlapped_copy_verify_{chunk_mib}MiB_s"] = timed(overlapped)
    R["bulk_then_verify_s"] = timed(lambda: (dev.copy_(host, non_blocking=True), bool((sums["int64_sum_dim1"](dev) != expected).any())))
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    del host
    mm.close()
    os.close(fd)
    os.unlink(path)
    for k, v in R.items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        open(args.json, "w").write(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
