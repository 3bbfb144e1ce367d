"""Serving benchmark (GPU): many users at once through ksleepd's public APIs, against transformers on the same
weights, and the wake rows, in one run.

    bash benchmarks/on_device.sh python3 benchmarks/serving.py --json $OUT/serving.json

1. transformers `generate` (static cache, greedy, batch N) on this model's weights, in this process: tok/s.
2. ksleepd (spawned, idle timeout off), N concurrent gRPC clients (N = --clients), each sending --requests
   requests one after another, 128 new tokens each (ignore_eos); clients run in several processes so that
   reading the streams never limits the daemon. Per N: aggregate output tok/s, requests/s, TTFT p50/p99,
   inter-token latency p50/p99, measured in the clients. One row (N = --http-clients) goes through the OpenAI
   HTTP face instead.
3. Outputs: the first request of each N = 16 client run again alone; the share whose tokens equal their solo
   run, and where they part the top-2 logit margin of the solo run (one eager forward in this process).
4. Wake: a lone request after a level-1 sleep (TTFT, median), then 8 requests arriving together while asleep:
   every TTFT against the lone one, and the wakes they cost.
5. A 4,000-token prompt arriving while 15 streams decode: the 15 streams' inter-token latency p99 / median.
6. One user: the copy floor measured here (the reference probe, 4 GiB pinned host->device best of 3, run again
   right before each lone wake: the host's copy rate drifts by a few percent within minutes), TTFT after sleep /
   its floor (median over the wakes), batch-1 decode tok/s, sleep seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

# Only the standard library at the top: the client processes (spawned) import this module, and must start fast.

PROMPT = "The future of artificial intelligence is"
PREFIX = "ksleep-serving"
TOKENS = 128


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def prompt_of(i: int) -> str:
    return f"{PROMPT} (request {i}): a note on item {i * 7919 % 1000} of the list"


# -- clients (run in child processes) ------------------------------------------------------------------------------
async def _grpc_request(stub, prompt, max_tokens: int, ignore_eos: bool = True) -> dict:
    from ksleep.v1 import common_pb2, ksleep_pb2

    wire = common_pb2.Prompt(token_ids=common_pb2.Prompt.TokenIds(ids=prompt)) if isinstance(prompt, list) \
        else common_pb2.Prompt(text=prompt)
    request = ksleep_pb2.GenerateRequest(prompt=wire, params=common_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=ignore_eos))
    sent = time.time()
    times, ids, summary = [], [], None
    async for response in stub.Generate(request, timeout=600):
        times.append(time.time())
        ids.append(response.token.id)
        if response.HasField("summary"):
            summary = response.summary
    return {"prompt": prompt, "sent": sent, "times": times, "ids": ids,
            "daemon_ttft": summary.ttft_seconds if summary else None, "woke": bool(summary and summary.woke)}


async def _http_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
    sent = time.time()
    times = []
    async with client.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.time())
    return {"prompt": prompt, "sent": sent, "times": times, "ids": [], "daemon_ttft": None, "woke": False}


async def _clients(address: str, http: str | None, jobs: list[list], max_tokens: int) -> list[list[dict]]:
    """Each job list is one client: its requests one after the other."""
    import grpc

    from ksleep.v1 import ksleep_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = ksleep_pb2_grpc.KsleepStub(channel)
        if http:
            import httpx

            async with httpx.AsyncClient() as client:
                async def run_http(prompts):
                    return [await _http_request(client, f"{http}/v1/completions", p, max_tokens) for p in prompts]
                return await asyncio.gather(*(run_http(j) for j in jobs))

        async def run(prompts):
            return [await _grpc_request(stub, p, max_tokens) for p in prompts]
        return await asyncio.gather(*(run(j) for j in jobs))


def _client_process(address, http, jobs, max_tokens, start_at, queue) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    queue.put(asyncio.run(_clients(address, http, jobs, max_tokens)))


def run_clients(address: str, clients: int, requests: int, offset: int, http: str | None = None,
                max_tokens: int = TOKENS, prompts: list[str] | None = None) -> list[list[dict]]:
    """`clients` concurrent clients of `requests` requests each, spread over child processes (`prompts`: the one
    client's prompts, instead of numbered ones)."""
    jobs = [prompts] if prompts else [[prompt_of(offset + c * requests + r) for r in range(requests)]
                                      for c in range(clients)]
    procs = min(clients, os.cpu_count() // 2 or 1, 8)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0  # every process connected and waiting: the clients start together
    workers = [ctx.Process(target=_client_process, args=(address, http, jobs[i::procs], max_tokens, start_at, queue))
               for i in range(procs)]
    for w in workers:
        w.start()
    results = [r for _ in workers for r in queue.get(timeout=900)]
    for w in workers:
        w.join(60)
    return results


def summarise(results: list[list[dict]]) -> dict:
    flat = [r for client in results for r in client]
    tokens = sum(len(r["times"]) for r in flat)
    start = min(r["sent"] for r in flat)
    end = max(r["times"][-1] for r in flat)
    ttft = [r["times"][0] - r["sent"] for r in flat]
    itl = [b - a for r in flat for a, b in zip(r["times"], r["times"][1:])]
    wall = end - start
    return {"requests": len(flat), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "req_s": len(flat) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99)}


# -- transformers' generate on the same weights ---------------------------------------------------------------------
def transformers_rows(args, sizes) -> tuple[dict, int, int]:
    import torch
    from transformers import GenerationConfig

    from ksleep.worker import Engine, WorkerConfig

    engine = Engine.load(WorkerConfig(model=args.model, device=args.device, pool_prefix=PREFIX, kv_cache="64MiB"))
    weight_bytes, vocab = engine.layout.weight_bytes, int(engine.skeleton.config.vocab_size)
    model = engine.model
    model.config._attn_implementation = "sdpa"
    rows = {}
    try:
        ids = engine.encode(PROMPT, 1)
        started = time.perf_counter()
        for n in sorted(sizes, key=lambda n: (n != 16, -n)):  # 16 first: the figure the targets compare with
            if n != 16 and time.perf_counter() - started > args.transformers_seconds:
                rows[n] = "skipped: the time budget for transformers' rows was spent"
                continue
            batch = torch.tensor([ids] * n, device=engine.device)
            gc = GenerationConfig(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=0,
                                  eos_token_id=None, cache_implementation="static")
            with torch.inference_mode():
                model.generate(batch, generation_config=gc)  # the same shapes: transformers compiles the step
                sync()
                t = time.perf_counter()
                model.generate(batch, generation_config=gc)
                sync()
            wall = time.perf_counter() - t
            rows[n] = {"tok_s": n * TOKENS / wall, "wall_s": wall}
            print(f"transformers generate, static cache, batch {n}: {rows[n]['tok_s']:.0f} tok/s", flush=True)
    finally:
        engine.close()  # the pool stays: the daemon attaches to it
    return rows, weight_bytes, vocab


def margins(args, pairs: list[tuple[str, list[int], list[int]]]) -> list[dict]:
    """Where each batched output parts from its solo run, the solo run's top-2 logit margin there."""
    import torch

    from ksleep.worker import Engine, WorkerConfig

    engine = Engine.load(WorkerConfig(model=args.model, device=args.device, pool_prefix=PREFIX, kv_cache="64MiB"))
    engine.model.config._attn_implementation = "sdpa"
    out = []
    try:
        for prompt, alone, batched in pairs:
            at = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a != b), None)
            if at is None:
                continue
            ids = engine.encode(prompt, 1) + alone[:at]
            with torch.inference_mode():
                logits = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            out.append({"index": at, "top2_margin": (top[0] - top[1]).item(), "logit_scale": top[0].abs().item()})
    finally:
        engine.close(remove_pool=True)
    return out


# -- the daemon rows ----------------------------------------------------------------------------------------------
async def wake_rows(address: str, cycles: int, together: int, probe=None, weight_bytes: int = 0) -> dict:
    import grpc

    from ksleep.v1 import ksleep_pb2, ksleep_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = ksleep_pb2_grpc.KsleepStub(channel)

        async def asleep() -> float:
            sleep = await stub.Sleep(ksleep_pb2.SleepRequest(level=1), timeout=60)
            await asyncio.sleep(1.0)  # the driver scrubs memory just freed: a wake right after is slower
            return sleep.sleep.seconds

        lone, sleeps, groups, floors = [], [], [], []
        for _ in range(2):  # unmeasured: the first wakes of a process are slower
            await asleep()
            await _grpc_request(stub, PROMPT, 2)
        for _ in range(cycles):
            sleeps.append(await asleep())
            if probe is not None:  # the floor of this wake, read while the worker is asleep, just before it
                floors.append(weight_bytes / probe.rate())
                await asyncio.sleep(0.5)
            lone.append(await _grpc_request(stub, PROMPT, 2))
        for _ in range(cycles):
            sleeps.append(await asleep())
            before = (await stub.Status(ksleep_pb2.StatusRequest())).wakes_total
            group = await asyncio.gather(*(_grpc_request(stub, prompt_of(i), 2) for i in range(together)))
            after = (await stub.Status(ksleep_pb2.StatusRequest())).wakes_total
            groups.append({"ttft_s": [r["times"][0] - r["sent"] for r in group],
                           "daemon_ttft_s": [r["daemon_ttft"] for r in group], "wakes": after - before})
    lone_ttft = statistics.median(r["times"][0] - r["sent"] for r in lone)
    worst = max(max(g["ttft_s"]) for g in groups)
    return {"lone_ttft_s": [r["times"][0] - r["sent"] for r in lone], "lone_daemon_ttft_s": [r["daemon_ttft"] for r in lone],
            "lone_ttft_median_s": lone_ttft, "together": groups, "worst_over_lone": worst / lone_ttft,
            "sleep_s": sleeps, "floor_before_each_lone_s": floors,
            "lone_daemon_ttft_over_its_floor": [r["daemon_ttft"] / f for r, f in zip(lone, floors)]}


async def long_prompt_row(address: str, vocab: int, decoding: int, prompt_tokens: int, stream_tokens: int) -> dict:
    import grpc

    from ksleep.v1 import ksleep_pb2_grpc

    long_ids = [(i * 7919) % (vocab // 2) + vocab // 4 for i in range(prompt_tokens)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ksleep_pb2_grpc.KsleepStub(channel)
        streams = [asyncio.create_task(_grpc_request(stub, prompt_of(i), stream_tokens)) for i in range(decoding)]
        await asyncio.sleep(0.5)  # they are all decoding now
        long = await _grpc_request(stub, long_ids, 4)
        results = await asyncio.gather(*streams)
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    window = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])
              if long["sent"] <= b <= long["times"][0] + 0.05]
    return {"decoding": decoding, "prompt_tokens": prompt_tokens, "long_ttft_s": long["times"][0] - long["sent"],
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99), "itl_max_s": max(itl),
            "ratio_p99_over_median": percentile(itl, 99) / percentile(itl, 50),
            "during_prefill_itl_max_s": max(window) if window else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--device", default="cuda", help="cpu (with synthetic:tiny and small counts) to smoke-test this script")
    ap.add_argument("--compare-clients", type=int, default=16, help="the row whose outputs are compared with solo runs")
    ap.add_argument("--long-prompt-tokens", type=int, default=4000)
    ap.add_argument("--long-prompt-decoding", type=int, default=15)
    ap.add_argument("--stream-tokens", type=int, default=256, help="tokens of the streams beside the long prompt")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--http-clients", type=int, default=16)
    ap.add_argument("--wake-cycles", type=int, default=5)
    ap.add_argument("--kv-cache", default="16GiB")
    ap.add_argument("--transformers-seconds", type=float, default=120,
                    help="time for transformers' rows after batch 16's (each new shape compiles first)")
    ap.add_argument("--daemon-flag", action="append", default=[], help="more ksleepd start flags")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--daemon-log", type=Path, help="keep ksleepd's log there")
    args = ap.parse_args()
    import torch

    from ksleep.client import Client
    from ksleep.client.spawn import SpawnedDaemon

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from worker_core import CopyProbe, pinned_peak

    for stale in Path("/dev/shm").glob(f"{PREFIX}-*"):
        stale.unlink()
    cuda = args.device == "cuda"
    R: dict = {"model": args.model, "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    R["pinned_h2d_peak_GBps"] = pinned_peak() / 1e9 if cuda else None
    R["transformers"], weight_bytes, vocab = transformers_rows(args, args.clients)
    R["floor_s"] = weight_bytes / (R["pinned_h2d_peak_GBps"] * 1e9) if cuda else None
    port = 18000 + os.getpid() % 1000
    daemon = SpawnedDaemon(args.model, args.device, PREFIX, "--http", str(port), "--kv-cache", args.kv_cache,
                           "--keep-pool", *args.daemon_flag, log_path=args.daemon_log)
    http = f"http://127.0.0.1:{port}"
    try:
        with Client(daemon.address) as client:
            daemon.wait_ready(client)
            R["status_awake"] = client.status().to_dict()["batch"]
        offset = 0
        R["daemon"] = {}
        for n in args.clients:  # warm-up, the same workload: the graph of each step shape is captured on first use
            run_clients(daemon.address, n, args.requests, 10_000 + offset)
            offset += n * args.requests
        batched: dict[str, list[int]] = {}
        for n in args.clients:
            results = run_clients(daemon.address, n, args.requests, offset)
            offset += n * args.requests
            row = R["daemon"][n] = summarise(results)
            row["per_request_decode_tok_s"] = statistics.median(
                (len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for c in results for r in c)
            if n == args.compare_clients:
                batched = {c[0]["prompt"]: c[0]["ids"] for c in results}  # each client's first request
            print(f"ksleepd gRPC, {n} clients: {row['tok_s']:.0f} tok/s, TTFT p50/p99 {row['ttft_p50_s']:.3f}/"
                  f"{row['ttft_p99_s']:.3f} s, ITL p50/p99 {row['itl_p50_s'] * 1e3:.1f}/{row['itl_p99_s'] * 1e3:.1f} ms",
                  flush=True)
        alone = run_clients(daemon.address, 1, len(batched), 0, max_tokens=TOKENS, prompts=list(batched))[0]
        pairs = [(r["prompt"], r["ids"], batched[r["prompt"]]) for r in alone]
        R["numerics"] = {"batched_requests": len(pairs), "equal_to_solo": sum(a == b for _, a, b in pairs)}
        run_clients(daemon.address, args.http_clients, 1, 20_000, http=http, max_tokens=16)
        R["http"] = {args.http_clients: summarise(run_clients(daemon.address, args.http_clients, args.requests,
                                                              offset, http=http))}
        print(f"ksleepd HTTP, {args.http_clients} clients: {R['http'][args.http_clients]['tok_s']:.0f} tok/s", flush=True)
        probe = CopyProbe() if cuda else None
        try:
            R["wake"] = asyncio.run(wake_rows(daemon.address, args.wake_cycles, 8, probe, weight_bytes))
        finally:
            probe and probe.close()
        print(f"wake: lone {R['wake']['lone_ttft_median_s']:.3f} s, 8 together worst / lone "
              f"{R['wake']['worst_over_lone']:.3f}", flush=True)
        asyncio.run(long_prompt_row(daemon.address, vocab, args.long_prompt_decoding, args.long_prompt_tokens,
                                    args.stream_tokens))  # warm-up: the chunked steps' graphs
        R["long_prompt"] = asyncio.run(long_prompt_row(daemon.address, vocab, args.long_prompt_decoding,
                                                       args.long_prompt_tokens, args.stream_tokens))
        print(f"4000-token prompt beside 15 streams: ITL p99 / median {R['long_prompt']['ratio_p99_over_median']:.2f}",
              flush=True)
        with Client(daemon.address) as client:
            R["status_end"] = client.status().to_dict()["batch"]
    finally:
        R["daemon_exit"] = daemon.stop()
    R["numerics"]["where_they_part"] = margins(args, pairs)
    n1 = R["daemon"].get(1)
    R["targets"] = {
        "n16_tok_s": R["daemon"][16]["tok_s"] if 16 in R["daemon"] else None,
        "n16_over_transformers_b16": R["daemon"][16]["tok_s"] / R["transformers"][16]["tok_s"]
        if 16 in R["daemon"] and 16 in R["transformers"] else None,
        "n64_tok_s": R["daemon"][64]["tok_s"] if 64 in R["daemon"] else None,
        "n16_ttft_p99_s": R["daemon"][16]["ttft_p99_s"] if 16 in R["daemon"] else None,
        "wake_8_worst_over_lone": R["wake"]["worst_over_lone"],
        "long_prompt_itl_p99_over_median": R["long_prompt"]["ratio_p99_over_median"],
        "wake_ttft_over_floor": statistics.median(R["wake"]["lone_daemon_ttft_over_its_floor"]) if cuda else None,
        "wake_ttft_over_start_floor": statistics.median(R["wake"]["lone_daemon_ttft_s"]) / R["floor_s"] if cuda else None,
        "wake_client_ttft_over_floor": R["wake"]["lone_ttft_median_s"] / R["floor_s"] if cuda else None,
        "batch1_decode_tok_s": n1["per_request_decode_tok_s"] if n1 else None,
        "sleep_s_max": max(R["wake"]["sleep_s"]),
        "batched_equal_to_solo_share": R["numerics"]["equal_to_solo"] / max(1, R["numerics"]["batched_requests"]),
    }
    print(json.dumps({k: v for k, v in R.items() if k not in ("daemon", "status_awake", "status_end")}, indent=1,
                     default=str))
    print(json.dumps(R["daemon"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main()
