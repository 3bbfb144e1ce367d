"""Model switching and weight updates through ksleepd (GPU): two models, one awake at a time; then UpdateWeights.

    bash benchmarks/on_device.sh python3 benchmarks/model_switch.py --json "$OUT/model-switch.json"
    python benchmarks/model_switch.py --model synthetic:tiny --device cpu --rounds 3   # smoke test

1. ksleepd with two models of one preset and different seeds (served as "a" and "b"), `--max-awake 1`.
2. Each model's baseline (--tokens greedy tokens), then --rounds requests alternating a, b, a, ...: each one wakes
   its model after putting the other to sleep. Client-side time to first token (switch included): p50 / p99;
   every output against its model's baseline; device memory in use after each request (Status, device-wide)
   against one model's arena.
3. UpdateWeights on "a" with b's weights (drawn by an engine in this process) staged in shared memory by a
   WeightWriter, the trainer's path: staging seconds, seconds to serving, seconds requests were held, and the first
   request's output against b's baseline.
Targets (issue 15): switch to first token p50 <= 0.35 s at level 1 for a 7B; outputs identical; memory never
above one model plus the contexts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ksleep.client import Client, WeightWriter
from ksleep.client.spawn import SpawnedDaemon

PROMPT = "The future of artificial intelligence is"


def timed(client: Client, model: str, tokens: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    first, ids = None, []
    for token in client.generate(PROMPT, max_tokens=tokens, model=model):
        first = first if first is not None else time.perf_counter() - t
        ids.append(token.id)
    return first, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ksleep-switch-"))
    config = folder / "ksleepd.toml"
    config.write_text(f'max_awake = 1\nkv_cache = "2GiB"\n'
                      f'[[models]]\nmodel = "{args.model}"\nserved_name = "a"\nseed = 0\n'
                      f'[[models]]\nmodel = "{args.model}"\nserved_name = "b"\nseed = 1\n')
    spawned = SpawnedDaemon(args.model, args.device, "ksleep-switch", "--config", str(config))
    client = Client(spawned.address, timeout=1800)
    R: dict = {"args": vars(args) | {"json": str(args.json)}}
    try:
        spawned.wait_ready(client)
        status = client.status()
        R["weight_bytes_per_model"] = status.weight_bytes
        base = {m: timed(client, m, args.tokens)[1] for m in ("a", "b")}
        R["baselines_differ"] = base["a"] != base["b"]
        ttfts, same, used = [], [], []
        for i in range(args.rounds):
            model = "ab"[i % 2]
            first, ids = timed(client, model, args.tokens)
            ttfts.append(first)
            same.append(ids == base[model])
            now = client.status()
            used.append(now.device_used_bytes)
            R.setdefault("awake_counts", []).append(sum(m.state == "awake" for m in now.models))
        ordered = sorted(ttfts)
        R["switch_ttft_s"] = ttfts
        R["switch_ttft_p50_s"] = statistics.median(ttfts)
        R["switch_ttft_p99_s"] = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        R["outputs_identical"] = all(same)
        R["device_used_max_bytes"] = max(used)
        R["model_switches"] = client.status().model_switches

        # UpdateWeights on "a": b's weights from the trainer's memory (staged in /dev/shm), then from a directory
        from ksleep.worker import Engine, WorkerConfig

        # (synthetic weights are drawn on the device: on the same kind of device as the daemon's, they are b's)
        source = Engine.load(WorkerConfig(model=args.model, device=args.device, dtype="bfloat16", seed=1, pool_prefix="ksleep-switch-src", pool_format="raw",
                                          kv_cache="64MiB", cuda_graphs="off", fused_kernels="off"))
        try:
            tensors = {s.name: s.view(source.weights.pool.tensor) for s in source.layout.slots if s.kind == "param"}
            with WeightWriter() as staged:
                t = time.perf_counter()
                for name, tensor in tensors.items():
                    staged.write(name, tensor)
                folder_staged = staged.commit()
                R["stage_in_shm_s"] = time.perf_counter() - t
                update = client.update_weights(folder_staged, model="a")
                first, ids = timed(client, "a", args.tokens)
                R["update_from_shm"] = update | {"first_ttft_s": first, "identical_to_b": ids == base["b"]}
        finally:
            source.close(remove_pool=True)
    finally:
        R["daemon_exit_code"] = spawned.stop()
    text = json.dumps(R, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
