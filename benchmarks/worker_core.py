"""Worker-core benchmark (GPU): sleep/wake of one model against the physical floor, in one process.

    python benchmarks/worker_core.py --model synthetic:deepseek-r1-distill-qwen-7b --json out.json

Prints and saves: weight bytes; pinned host->device peak measured here; copy floor = bytes / peak; TTFT awake;
TTFT after a level-1 sleep (wake included, median of --cycles, sleeping before each; the wake overlapped with
the forward, as the daemon wakes for a request, and, for comparison, copy-then-run); ratio
TTFT_sleep / (floor + TTFT_awake); sleep time; device memory awake and asleep (torch and NVML); the reference
approach (module .to('cpu') / .to('cuda')) side by side; greedy output identity; and, with --checkpoint-dir, the
cold load from a local safetensors copy and the level-2 wake TTFT.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from ksleep.worker import Engine, SamplingParams, WorkerConfig
from ksleep.worker.memory import nvml_process_bytes
from ksleep.worker.reference import ReferenceModel

PROMPT = "The future of artificial intelligence is"
GiB = 2**30


DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def used_bytes() -> int:
    """Device-wide bytes in use (host RAM in use when the benchmark is smoke-tested on cpu)."""
    if DEVICE.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        return total - free
    import psutil

    vm = psutil.virtual_memory()
    return vm.total - vm.available


class CopyProbe:
    """The reference probe of the copy floor: best-of-n bytes/s of one pinned host->device copy of 4 GiB. Its
    buffers are kept, so that it can be run again right before each measured wake (the host's copy rate drifts
    by a few percent between runs and machines; a floor read minutes earlier is not the same run's floor)."""

    def __init__(self, nbytes: int = 4 * GiB):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=DEVICE.type == "cuda")
        self.host.fill_(1)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)

    def rate(self, reps: int = 3) -> float:
        best = float("inf")
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            self.dev.copy_(self.host, non_blocking=True)
            sync()
            best = min(best, time.perf_counter() - t)
        return self.host.numel() / best

    def close(self) -> None:
        del self.host, self.dev
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def pinned_peak(nbytes: int = 4 * GiB, reps: int = 3) -> float:
    """Best-of-n bytes/s of one pinned host->device copy, like the reference probe."""
    probe = CopyProbe(nbytes)
    try:
        return probe.rate(reps)
    finally:
        probe.close()


def first_token_seconds(engine: Engine) -> tuple[float, int]:
    t = time.perf_counter()
    event = next(engine.generate(PROMPT, SamplingParams(max_tokens=1), started=t))
    return event.elapsed, event.token_id


def naive_reference(engine: Engine, baseline: list[int], tokens: int) -> dict:
    """The reference approach on the same weights, with the engine asleep so that it has the GPU alone."""
    reference = ReferenceModel(engine)
    engine.sleep(1)
    try:
        return reference.measure(PROMPT, tokens, baseline)
    finally:
        reference.close()
        engine.wake()


def write_checkpoint(engine: Engine, directory: Path) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    params = {s.name: s.view(engine.weights.pool.tensor).clone() for s in engine.layout.slots if s.kind == "param"}
    save_file(params, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del params
    engine.skeleton.config.save_pretrained(directory)
    engine.tokenizer.save_pretrained(directory)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--vmm", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds asleep before each wake (the driver scrubs released memory for ~0.3 s; a wake "
                         "inside that window is measured separately)")
    ap.add_argument("--no-naive", action="store_true", help="skip the reference .to() approach")
    ap.add_argument("--cuda-graphs", default="off", choices=["auto", "on", "off"],
                    help="off (default) runs every step eagerly; benchmarks/performance.py and serving.py measure "
                         "the graphs")
    ap.add_argument("--kv-cache", default="1GiB", help="the engine's batch KV cache (one request at a time here)")
    ap.add_argument("--checkpoint-dir", type=Path, help="write the model here as safetensors; time cold load and level 2")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--peak-bytes", type=int, default=4 * GiB, help="size of the pinned-bandwidth probe copy")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    R: dict = {"model": args.model, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"}
    torch.empty(1, device=DEVICE)
    R["device_used_context_only"] = used_bytes()
    R["pinned_h2d_peak_GBps"] = pinned_peak(args.peak_bytes) / 1e9

    for stale in Path("/dev/shm").glob("ksleep-bench-*"):  # measure a first load, not an attach to a leftover
        stale.unlink()
    config = WorkerConfig(model=args.model, device=args.device, vmm=args.vmm, pool_prefix="ksleep-bench",
                          cuda_graphs=args.cuda_graphs, kv_cache=args.kv_cache)
    engine = Engine.load(config)
    R["load"] = engine.load_report.to_dict()
    R["weight_bytes"] = engine.layout.weight_bytes
    R["arena_bytes"] = engine.layout.total_bytes
    R["copy_floor_s"] = engine.layout.weight_bytes / (R["pinned_h2d_peak_GBps"] * 1e9)

    for _ in range(3):
        first_token_seconds(engine)
    R["ttft_awake_s"] = statistics.median(first_token_seconds(engine)[0] for _ in range(5))
    base = engine.complete(PROMPT, SamplingParams(max_tokens=args.tokens))
    R["baseline"] = {"text": base.text, "token_ids": base.token_ids, "decode_tok_s": (len(base.token_ids) - 1) / (base.total - base.ttft)}
    R["device_used_awake"] = used_bytes()
    R["nvml_process_awake"] = (nvml_process_bytes(DEVICE, os.getpid()) if DEVICE.type == "cuda" else None)

    sleeps, wakes, ttfts, asleep, nvml_asleep, firsts, phases = [], [], [], [], [], [], []
    immediate = []
    for _ in range(3):  # a request arriving right after the sleep, while the driver still scrubs the memory
        engine.sleep(1)
        t = time.perf_counter()
        engine.wake(overlap=True)
        immediate.append(next(engine.generate(PROMPT, SamplingParams(max_tokens=1), started=t)).elapsed)
    R["ttft_wake_right_after_sleep_median_s"] = statistics.median(immediate)
    serial = []
    for _ in range(3):  # copy-then-run: the whole copy before the forward starts
        engine.sleep(1)
        time.sleep(args.pause)
        t = time.perf_counter()
        engine.wake(overlap=False)
        serial.append(next(engine.generate(PROMPT, SamplingParams(max_tokens=1), started=t)).elapsed)
    R["ttft_after_sleep_copy_then_run_median_s"] = statistics.median(serial)
    for _ in range(args.cycles):
        sleeps.append(engine.sleep(1).seconds)
        time.sleep(args.pause)
        asleep.append(used_bytes())
        if DEVICE.type == "cuda" and "torch_reserved_asleep" not in R:
            R["torch_reserved_asleep"] = torch.cuda.memory_reserved()
            R["torch_allocated_asleep"] = torch.cuda.memory_allocated()
            R["live_blocks_asleep"] = sorted((b["size"] for s in torch.cuda.memory_snapshot()
                                              for b in s["blocks"] if b["state"] == "active_allocated"), reverse=True)[:10]
        nvml_asleep.append((nvml_process_bytes(DEVICE, os.getpid()) if DEVICE.type == "cuda" else None))
        t = time.perf_counter()
        woke = engine.wake(overlap=True)
        wakes.append(woke.seconds)
        phases.append(woke.phases)
        event = next(engine.generate(PROMPT, SamplingParams(max_tokens=1), started=t))
        ttfts.append(event.elapsed)
        firsts.append(event.token_id)
    after = engine.complete(PROMPT, SamplingParams(max_tokens=args.tokens))
    R["level1"] = {
        "sleep_s": sleeps, "wake_s": wakes, "wake_phases": phases, "ttft_after_sleep_s": ttfts,
        "ttft_after_sleep_median_s": statistics.median(ttfts), "sleep_median_s": statistics.median(sleeps),
        "device_used_asleep": asleep, "nvml_process_asleep": nvml_asleep,
        "asleep_minus_context_MiB": (min(asleep) - R["device_used_context_only"]) / 2**20,
        "output_identical": after.token_ids == base.token_ids and all(f == base.token_ids[0] for f in firsts),
    }
    R["ratio_ttft_sleep_over_floor_plus_awake"] = R["level1"]["ttft_after_sleep_median_s"] / (R["copy_floor_s"] + R["ttft_awake_s"])
    R["ratio_ttft_sleep_over_floor"] = R["level1"]["ttft_after_sleep_median_s"] / R["copy_floor_s"]
    R["device_used_after_wake"] = used_bytes()

    if not args.no_naive:
        R["naive"] = naive_reference(engine, base.token_ids, args.tokens)
        R["speedup_vs_naive_ttft"] = R["naive"]["ttft_after_sleep_s"] / R["level1"]["ttft_after_sleep_median_s"]

    if args.checkpoint_dir:
        write_checkpoint(engine, args.checkpoint_dir)
        engine.close(remove_pool=True)
        R["page_cache_dropped"] = drop_page_cache()
        t = time.perf_counter()
        engine = Engine.load(WorkerConfig(model=str(args.checkpoint_dir), device=args.device, vmm=args.vmm, pool_prefix="ksleep-bench"))
        cold = time.perf_counter() - t
        R["cold_load"] = {"seconds": cold, "GBps": engine.layout.weight_bytes / cold / 1e9, "pool": engine.load_report.pool,
                          "phases": engine.load_report.phases}
        ck = engine.complete(PROMPT, SamplingParams(max_tokens=args.tokens))
        engine.sleep(2)
        R["page_cache_dropped_before_level2"] = drop_page_cache()
        t = time.perf_counter()
        woke = engine.wake()
        event = next(engine.generate(PROMPT, SamplingParams(max_tokens=1), started=t))
        R["level2"] = {"ttft_after_sleep_s": event.elapsed, "output_identical": ck.token_ids == base.token_ids,
                       "phases": woke.phases}
        shutil.rmtree(args.checkpoint_dir, ignore_errors=True)
    engine.close(remove_pool=True)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        R["device_used_after_close"] = used_bytes()  # context plus every kernel module loaded on the way
        R["asleep_minus_context_with_kernels_MiB"] = (min(R["level1"]["device_used_asleep"])
                                                      - R["device_used_after_close"]) / 2**20

    print(json.dumps({k: v for k, v in R.items() if k != "baseline"}, indent=1, default=str)[-7000:])
    summary = [
        ("device", R["device"]), ("weight bytes", f"{R['weight_bytes']:,}"),
        ("pinned H2D peak", f"{R['pinned_h2d_peak_GBps']:.1f} GB/s"), ("copy floor", f"{R['copy_floor_s']:.4f} s"),
        ("TTFT awake", f"{R['ttft_awake_s']:.4f} s"),
        ("TTFT after L1 sleep (median)", f"{R['level1']['ttft_after_sleep_median_s']:.4f} s"),
        ("ratio (target <= 1.10)", f"{R['ratio_ttft_sleep_over_floor_plus_awake']:.3f}"),
        ("TTFT / floor", f"{R['ratio_ttft_sleep_over_floor']:.3f}"),
        ("TTFT copy-then-run (median)", f"{R['ttft_after_sleep_copy_then_run_median_s']:.4f} s"),
        ("sleep (median, target <= 20 ms)", f"{R['level1']['sleep_median_s'] * 1e3:.1f} ms"),
        ("asleep - bare context", f"{R['level1']['asleep_minus_context_MiB']:.1f} MiB"),
        ("identical after L1", R["level1"]["output_identical"]),
    ]
    if "naive" in R:
        summary += [("naive sleep / TTFT", f"{R['naive']['sleep_s']:.2f} s / {R['naive']['ttft_after_sleep_s']:.3f} s"),
                    ("speed-up vs naive (target >= 8x)", f"{R['speedup_vs_naive_ttft']:.1f}x"),
                    ("naive identical", R["naive"]["output_identical"])]
    if "cold_load" in R:
        summary += [("cold load", f"{R['cold_load']['seconds']:.2f} s ({R['cold_load']['GBps']:.2f} GB/s)"),
                    ("TTFT after L2 sleep", f"{R['level2']['ttft_after_sleep_s']:.3f} s"),
                    ("identical after L2", R["level2"]["output_identical"])]
    if "asleep_minus_context_with_kernels_MiB" in R:
        summary.append(("asleep - context with its kernels", f"{R['asleep_minus_context_with_kernels_MiB']:.1f} MiB"))
    for k, v in summary:
        print(f"{k:38s} {v}")
    if args.json:
        args.json.write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main()
