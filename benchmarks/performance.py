"""Performance benchmark (GPU): layer-streamed wake and CUDA-graph decode, in one run.

    bash benchmarks/on_device.sh python3 benchmarks/performance.py --json $OUT/performance.json

Prints and saves:
  floor           weight bytes / pinned host->device peak measured in this process
  TTFT_sleep      mission prompt, level-1 sleep, wake overlapped with the forward (median of --cycles, after
                  --warm-cycles unmeasured ones), and the ratio TTFT_sleep / floor; copy-then-run beside it; the
                  same without the wake's checksums (ksleepd --no-verify-wakes)
  overlap share   on a --long-prompt-token prompt: how much of the awake prefill the overlapped wake hides,
                  (copy-then-run TTFT - overlapped TTFT) / awake prefill
  decode tok/s    batch 1: every step eager (Python per step) vs replayed from the step's CUDA graph, greedy
                  tokens compared (and, where they part, the two candidates' logits)
  graph reuse     --reuse-cycles sleep/wake cycles: captures before and after (must not change), outputs equal
  mission         wake + --tokens tokens, end to end, after a level-1 sleep (median)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ksleep.worker import Engine, SamplingParams, WorkerConfig
from ksleep.worker.attention import ATTENTION_NAME
from worker_core import PROMPT, pinned_peak

GiB = 2**30


def first_token(engine: Engine, prompt, wake: bool | None = None, pause: float = 0.0) -> float:
    """TTFT of `prompt`; with `wake` set, sleep first and count the wake (overlapped when True)."""
    if wake is not None:
        engine.sleep(1)
        time.sleep(pause)
    t = time.perf_counter()
    if wake is not None:
        engine.wake(overlap=wake)
    event = next(engine.generate(prompt, SamplingParams(max_tokens=1), started=t))
    return event.elapsed


def decode_rate(engine: Engine, tokens: int, mode: str) -> tuple[float, list[int]]:
    """Batch-1 decode tok/s and the tokens, with every step eager or replayed from CUDA graphs."""
    graphs = engine.runner.graphs_enabled
    engine.runner.graphs_enabled = graphs and mode == "graph"
    try:
        engine.complete(PROMPT, SamplingParams(max_tokens=tokens))  # warm (captures the graphs on first use)
        done = engine.complete(PROMPT, SamplingParams(max_tokens=tokens))
    finally:
        engine.runner.graphs_enabled = graphs
    return (len(done.token_ids) - 1) / (done.total - done.ttft), done.token_ids


def divergence(engine: Engine, graph: list[int], eager: list[int]) -> dict | None:
    """Where two greedy sequences part, and how close the two tokens were there (one full forward of the prompt
    and the common prefix): a tie to bfloat16 resolution flips on any change of kernel."""
    at = next((i for i, (a, b) in enumerate(zip(graph, eager)) if a != b), None)
    if at is None:
        return None
    ids = engine.encode(PROMPT, 1) + graph[:at]
    engine.model.config._attn_implementation = "sdpa"  # transformers' own attention, outside the batch cache
    try:
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0, -1].float()
    finally:
        engine.model.config._attn_implementation = ATTENTION_NAME
    top = torch.topk(logits, 2)
    return {"index": at, "tokens": [graph[at], eager[at]], "logits": [logits[graph[at]].item(), logits[eager[at]].item()],
            "top2_gap": (top.values[0] - top.values[1]).item(), "logit_scale": top.values[0].abs().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--cycles", type=int, default=7)
    ap.add_argument("--warm-cycles", type=int, default=3, help="unmeasured sleep/wake cycles first (the first wakes "
                    "of a process are slower and noisier, measured: up to +15 ms)")
    ap.add_argument("--reuse-cycles", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--long-prompt-tokens", type=int, default=2000)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds asleep before each wake (driver scrub)")
    ap.add_argument("--peak-bytes", type=int, default=4 * GiB)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    R: dict = {"model": args.model, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    R["pinned_h2d_peak_GBps"] = pinned_peak(args.peak_bytes) / 1e9 if device.type == "cuda" else None
    for stale in Path("/dev/shm").glob("ksleep-perf-*"):
        stale.unlink()
    engine = Engine.load(WorkerConfig(model=args.model, device=args.device, pool_prefix="ksleep-perf", kv_cache="8GiB"))
    R["weight_bytes"] = engine.layout.weight_bytes
    R["floor_s"] = engine.layout.weight_bytes / (R["pinned_h2d_peak_GBps"] * 1e9) if R["pinned_h2d_peak_GBps"] else None

    # -- layer-streamed wake, mission prompt
    for _ in range(3):
        first_token(engine, PROMPT)
    R["ttft_awake_s"] = statistics.median(first_token(engine, PROMPT) for _ in range(5))
    R["ttft_sleep_warm_up_s"] = [first_token(engine, PROMPT, True, args.pause) for _ in range(args.warm_cycles)]
    R["ttft_sleep_s"] = [first_token(engine, PROMPT, True, args.pause) for _ in range(args.cycles)]
    R["ttft_sleep_copy_then_run_s"] = [first_token(engine, PROMPT, False, args.pause) for _ in range(3)]
    engine.config.verify_on_wake = False  # ksleepd --no-verify-wakes: the checksums read the arena during the copy
    R["ttft_sleep_unverified_s"] = [first_token(engine, PROMPT, True, args.pause) for _ in range(args.cycles)]
    engine.config.verify_on_wake = True
    R["ttft_sleep_median_s"] = statistics.median(R["ttft_sleep_s"])
    if R["floor_s"]:
        R["ratio_ttft_sleep_over_floor"] = R["ttft_sleep_median_s"] / R["floor_s"]
        R["ratio_unverified_over_floor"] = statistics.median(R["ttft_sleep_unverified_s"]) / R["floor_s"]

    # -- overlap on a long prompt (token ids: the byte-level synthetic tokenizer maps text 1:1 anyway)
    vocab = int(engine.skeleton.config.vocab_size)
    long_ids = [(i * 7919) % (vocab - 8) + 4 for i in range(args.long_prompt_tokens)]
    first_token(engine, long_ids)
    prefill = statistics.median(first_token(engine, long_ids) for _ in range(3))
    serial = statistics.median(first_token(engine, long_ids, False, args.pause) for _ in range(3))
    overlapped = statistics.median(first_token(engine, long_ids, True, args.pause) for _ in range(3))
    R["long_prompt"] = {"tokens": len(long_ids), "ttft_awake_s": prefill, "ttft_copy_then_run_s": serial,
                        "ttft_overlapped_s": overlapped, "hidden_share": (serial - overlapped) / prefill}
    if R["floor_s"]:
        R["long_prompt"]["hidden_share_vs_floor"] = (R["floor_s"] + prefill - overlapped) / prefill

    # -- decode, batch 1: eager vs graph
    eager_rate, eager_tokens = decode_rate(engine, args.tokens, "eager")
    graph_rate, graph_tokens = decode_rate(engine, args.tokens, "graph")
    R["decode"] = {"eager_tok_s": eager_rate, "graph_tok_s": graph_rate, "graph_tokens_equal_eager": graph_tokens == eager_tokens,
                   "graph_path": engine.runner.graphs_enabled, "graph_vs_eager_divergence": divergence(engine, graph_tokens, eager_tokens)}

    # -- the graph across sleep/wake, and the mission request end to end
    baseline = engine.complete(PROMPT, SamplingParams(max_tokens=args.tokens)).token_ids
    captures = engine.runner.captures
    missions, identical = [], True
    for _ in range(args.reuse_cycles):
        engine.sleep(1)
        time.sleep(args.pause)
        t = time.perf_counter()
        engine.wake(overlap=True)
        done = engine.complete(PROMPT, SamplingParams(max_tokens=args.tokens))
        missions.append(time.perf_counter() - t)
        identical = identical and done.token_ids == baseline
    R["graph_reuse"] = {"cycles": args.reuse_cycles, "captures_before": captures,
                        "captures_after": engine.runner.captures, "replays": engine.runner.replays,
                        "outputs_identical": identical}
    R["mission_s"] = missions
    R["mission_median_s"] = statistics.median(missions)
    engine.sleep(1)
    time.sleep(args.pause)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        R["device_used_asleep"] = total - free
        R["torch_reserved_asleep"] = torch.cuda.memory_reserved()
    engine.close(remove_pool=True)

    print(json.dumps(R, indent=1, default=str))
    floor = f"{R['floor_s']:.4f} s ({R['pinned_h2d_peak_GBps']:.1f} GB/s)" if R["floor_s"] else "-"
    lp = R["long_prompt"]
    rows = [("device", R["device"]), ("floor", floor),
            ("TTFT awake", f"{R['ttft_awake_s']:.4f} s"),
            ("TTFT_sleep overlapped (median)", f"{R['ttft_sleep_median_s']:.4f} s"),
            ("TTFT_sleep / floor (target <= 1.03)", f"{R.get('ratio_ttft_sleep_over_floor', float('nan')):.3f}"),
            ("the same without wake checksums (--no-verify-wakes)",
             f"{statistics.median(R['ttft_sleep_unverified_s']):.4f} s = {R.get('ratio_unverified_over_floor', float('nan')):.3f}"),
            ("TTFT_sleep copy-then-run (median)", f"{statistics.median(R['ttft_sleep_copy_then_run_s']):.4f} s"),
            (f"long prompt ({lp['tokens']} tok): awake / serial / overlapped",
             f"{lp['ttft_awake_s']:.4f} / {lp['ttft_copy_then_run_s']:.4f} / {lp['ttft_overlapped_s']:.4f} s"),
            ("prefill hidden by the overlap (goal >= 80 %)", f"{100 * lp['hidden_share']:.0f} %"),
            ("decode, batch 1: eager / graph", f"{eager_rate:.1f} / {graph_rate:.1f} tok/s"),
            ("graph tokens == eager", R["decode"]["graph_tokens_equal_eager"]),
            ("graph vs eager: first difference", R["decode"]["graph_vs_eager_divergence"]),
            (f"graph captures before / after {args.reuse_cycles} cycles",
             f"{R['graph_reuse']['captures_before']} / {R['graph_reuse']['captures_after']}"),
            ("outputs identical across cycles", identical),
            (f"mission: wake + {args.tokens} tokens (median, target < 0.7 s)", f"{R['mission_median_s']:.4f} s")]
    for k, v in rows:
        print(f"{k:52s} {v}")
    if args.json:
        args.json.write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main()
