"""Where a lone wake's time goes beyond the copy floor, and a sleep's time (GPU, engine level, one process).

    python benchmarks/wake_breakdown.py --json docs/bench/h200-wake-breakdown.json

The copy floor is weight bytes / the pinned host->device peak, measured before anything is loaded. Then, for each
--kv-cache size: the mission prompt's TTFT after a level-1 sleep (the wake overlapped with the forward), with
and without the wake's checksums, and with the KV cache mapped before the copy is queued instead of while it
runs; for each wake, on the GPU's clock from the wake's start: when the copy stream and the verification stream
were done; and each sleep's phases. Last, for batches of 1 and 16 decoding: the engine's time per step beside
the bare replay of that step's CUDA graph (what the GPU alone needs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ksleep.worker import Engine, SamplingParams, WorkerConfig  # noqa: E402
from worker_core import PROMPT, pinned_peak  # noqa: E402

PREFIX = "ksleep-breakdown"


def timed_event(stream: torch.cuda.Stream | None = None) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def lone_wake(engine: Engine, pause: float, kv_first: bool) -> dict:
    sleep = engine.sleep(1)
    time.sleep(pause)
    arena = engine.weights.arena
    t = time.perf_counter()
    start = timed_event()
    if kv_first:  # the scratch block mapped now; the wake's allocate() after the copy then finds it present
        scratch = arena.blocks[-1]
        arena._tensors[scratch.start] = arena._new_block(scratch)
    wake = engine.wake(overlap=True)
    returned = time.perf_counter() - t
    fill = engine.weights._fill
    ends = {}
    if fill is not None:
        ends["copy"] = timed_event(fill._copy_stream)
        if fill._verify_stream is not None:
            ends["verify"] = timed_event(fill._verify_stream)
    event = next(engine.generate(PROMPT, SamplingParams(max_tokens=1), started=t))
    torch.cuda.synchronize()
    return {"ttft_s": event.elapsed, "wake_returned_s": returned, "wake_phases": wake.phases,
            **{f"{k}_done_s": start.elapsed_time(e) / 1e3 for k, e in ends.items()},
            "sleep_s": sleep.seconds, "sleep_phases": sleep.phases}


def rows(engine: Engine, cycles: int, pause: float, kv_first: bool) -> dict:
    for _ in range(2):  # unmeasured: the first wakes of a process are slower
        lone_wake(engine, pause, kv_first)
    runs = [lone_wake(engine, pause, kv_first) for _ in range(cycles)]
    out = {"runs": runs}
    for key in ("ttft_s", "wake_returned_s", "copy_done_s", "verify_done_s", "sleep_s"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[f"{key}_median"] = statistics.median(values)
    return out


def decode_rows(engine: Engine, tokens: int = 128) -> dict:
    out = {}
    for batch in (1, 16):
        def run() -> tuple[float, int]:
            before = engine.stats().steps
            t = time.perf_counter()
            streams = [engine.generate(f"{PROMPT} ({i})", SamplingParams(max_tokens=tokens, ignore_eos=True))
                       for i in range(batch)]
            for stream in streams:
                for _ in stream:
                    pass
            return time.perf_counter() - t, engine.stats().steps - before

        run()  # captures what it needs
        wall, steps = run()
        graph = engine.runner._graphs.get((batch, batch, True))
        replay = None
        if graph is not None:
            graph.replay()
            start = timed_event()
            for _ in range(50):
                graph.replay()
            end = timed_event()
            torch.cuda.synchronize()
            replay = start.elapsed_time(end) / 1e3 / 50
        out[batch] = {"wall_s": wall, "steps": steps, "engine_step_s": wall / steps, "graph_replay_s": replay,
                      "tok_s": batch * tokens / wall}
        print(f"decode batch {batch:2d}: {wall / steps * 1e3:.2f} ms per engine step, "
              f"{(replay or float('nan')) * 1e3:.2f} ms per bare graph replay, {batch * tokens / wall:.0f} tok/s",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--kv-cache", nargs="+", default=["16GiB", "1GiB"])
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for stale in Path("/dev/shm").glob(f"{PREFIX}-*"):
        stale.unlink()
    R: dict = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "pinned_h2d_peak_GBps": pinned_peak() / 1e9}
    try:
        for n, kv in enumerate(args.kv_cache):
            engine = Engine.load(WorkerConfig(model=args.model, device="cuda", pool_prefix=PREFIX, kv_cache=kv))
            label = kv if kv not in R else f"{kv} #{n}"
            try:
                engine.wait_pinned()
                R.setdefault("weight_bytes", engine.layout.weight_bytes)
                R["floor_s"] = R["weight_bytes"] / (R["pinned_h2d_peak_GBps"] * 1e9)
                for _ in range(3):
                    engine.complete(PROMPT, SamplingParams(max_tokens=1))
                row = {"pool": engine.load_report.pool,  # "created" by this engine or "attached" to
                       "verified": rows(engine, args.cycles, args.pause, False),
                       "kv_mapped_first": rows(engine, args.cycles, args.pause, True)}
                engine.config.verify_on_wake = False
                row["unverified"] = rows(engine, args.cycles, args.pause, False)
                for name, r in row.items():
                    if name == "pool":
                        continue
                    r["ttft_over_floor"] = r["ttft_s_median"] / R["floor_s"]
                    print(f"kv {label:>9} ({row['pool']}) {name:16s} ttft {r['ttft_s_median'] * 1e3:7.1f} ms "
                          f"= {r['ttft_over_floor']:.3f} x floor; copy done {r['copy_done_s_median'] * 1e3:.1f} ms; "
                          f"verify done {r.get('verify_done_s_median', float('nan')) * 1e3:.1f} ms; "
                          f"sleep {r['sleep_s_median'] * 1e3:.1f} ms {r['runs'][-1]['sleep_phases']}", flush=True)
                R[label] = row
                if n == 0:
                    R["decode"] = decode_rows(engine)
            finally:
                engine.close()
    finally:
        for stale in Path("/dev/shm").glob(f"{PREFIX}-*"):
            stale.unlink()
    print(f"floor {R['floor_s'] * 1e3:.1f} ms at {R['pinned_h2d_peak_GBps']:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
