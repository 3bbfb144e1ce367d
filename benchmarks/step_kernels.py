"""Where a decode step's time goes (GPU, engine level): the bare CUDA-graph replay of a batch-1 and a batch-16
decode step, and the kernels inside it (count, GPU time by kind), for the model's modules as they are
(`--variant stock`) or with its small element-wise pieces fused (RMSNorm, rotary embedding, SiLU x up).

    bash benchmarks/on_device.sh python3 benchmarks/step_kernels.py --variant stock --json $OUT/stock.json
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

from ksleep.worker import Engine, SamplingParams, WorkerConfig, fusion

PROMPT = "The future of artificial intelligence is"


def replay_seconds(graph, n: int = 50) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def kernels(graph) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name].append(event.device_time)
    total = sum(sum(v) for v in by_name.values()) / 3
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {"kernels_per_step": sum(len(v) for v in by_name.values()) / 3, "kernel_us_per_step": total,
            "top": [{"name": name[:90], "per_step": len(v) / 3, "us_per_step": sum(v) / 3} for name, v in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--variant", default="stock", choices=["stock", "fused"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    R = {"variant": args.variant, "torch": torch.__version__}
    config = WorkerConfig(model=args.model, device="cuda", pool_prefix="ksleep-bench-steps", kv_cache="4GiB",
                          fused_kernels="off")  # fused here, after loading, for --variant fused
    engine = Engine.load(config)
    try:
        if args.variant == "fused":
            engine.runner.fusion = fusion.Fusion(engine.model)
            R["fused"] = engine.runner.fused
            engine.runner.forget_graphs()
        outputs = {}
        for batch in (1, 16):
            def run() -> tuple[float, int, list[int]]:
                before = engine.stats().steps
                t = time.perf_counter()
                streams = [engine.generate(f"{PROMPT} ({i})", SamplingParams(max_tokens=64, ignore_eos=True))
                           for i in range(batch)]
                first = [e.token_id for e in streams[0]]
                for stream in streams[1:]:
                    for _ in stream:
                        pass
                return time.perf_counter() - t, engine.stats().steps - before, first

            run()  # compiles (fused) and captures what it needs
            wall, steps, first = run()
            outputs[batch] = first
            graph = engine.runner._graphs.get((batch, batch, True))
            row = {"engine_step_s": wall / steps, "tok_s": batch * 64 / wall}
            if graph is not None:
                row["graph_replay_s"] = replay_seconds(graph)
                row.update(kernels(graph))
            R[batch] = row
            print(f"{args.variant} batch {batch}: {row}", flush=True)
        R["first_tokens_batch1"] = outputs[1][:16]
    finally:
        engine.close(remove_pool=True)
    print(json.dumps(R, indent=1))
    if args.json:
        args.json.write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
