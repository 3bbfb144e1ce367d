"""Soak: N streaming clients over M sleep/wake cycles (short idle timeout), then a fuzzing run; zero failed
requests, every output identical to the baseline, and flat resource curves (RSS, open descriptors, /dev/shm
bytes, device memory) between the first and the last 10 % of the cycles.

    python benchmarks/soak.py --model synthetic:tiny --device cpu --clients 8 --cycles 1000 --fuzz 10000
    python benchmarks/soak.py --cycles 1000 --fault-every 100 --worker-timeout 2     # with faults, see below
    python benchmarks/soak.py --model synthetic:deepseek-r1-distill-qwen-7b --device cuda --cycles 30 --max-tokens 4

With --fault-every N, three faults come in turn, one every N cycles, each while that cycle's clients are
sent: the worker stopped (SIGSTOP: the watchdog must kill and replace it within --worker-timeout), the worker
killed (SIGKILL), and a stalled client (a stream opened and never read again, alongside the others). Every
request must still give the baseline's tokens (those sent to a stopped or killed worker are replayed on its
successor); each fault's time to recovery and what the stalled client saw are reported.

Exit status 0 when everything holds, 1 otherwise. This is a script to run and report, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fuzzing import check_grpc, check_http, check_raw_grpc, grpc_requests, http_bodies, RAW_BYTES  # noqa: E402

from ksleep.client import Client  # noqa: E402
from ksleep.client.spawn import SpawnedDaemon  # noqa: E402

PROMPT = "The future of artificial intelligence is"


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def resources(pid: int, prefix: str, client: Client) -> dict:
    procs = tree(pid)
    rss = fds = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.NoSuchProcess:
            pass
    shm = sum(f.stat().st_size for f in Path("/dev/shm").glob(f"{prefix}*"))
    status = client.status()
    # The worker's own device memory where the platform tells it (NVML per process; RSS for a cpu device);
    # device-wide figures move with whatever else runs on the machine.
    own = status.worker_device_bytes if status.worker_device_bytes is not None else status.device_used_bytes
    return {"rss": rss, "fds": fds, "shm": shm, "device_used": own, "processes": len(procs)}


def fuzz(client_channel, http, examples: int) -> int:
    """Run `examples` generated cases over gRPC (typed and raw) and HTTP; returns how many ran."""
    from hypothesis import HealthCheck, given, settings

    per = max(1, examples // (4 if http else 2))
    quick = settings(max_examples=per, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    from ksleep.v1 import ksleep_pb2_grpc

    stub = ksleep_pb2_grpc.KsleepStub(client_channel)
    given(grpc_requests())(quick(lambda request: check_grpc(stub, request)))()
    given(RAW_BYTES)(quick(lambda data: check_raw_grpc(client_channel, data)))()
    if http is not None:
        given(http_bodies(chat=False))(quick(lambda body: check_http(http, "/v1/completions", body)))()
        given(http_bodies(chat=True))(quick(lambda body: check_http(http, "/v1/chat/completions", body)))()
    return per * (4 if http else 2)


def inject(cycle: int, every: int, client: Client, address: str, stalled: list) -> str | None:
    """The fault of this cycle, if any (see the module's doc): done now, just before the cycle's clients."""
    if not every or cycle == 0 or cycle % every:
        return None
    fault = ("stopped worker", "killed worker", "stalled client")[(cycle // every - 1) % 3]
    if fault == "stalled client":
        import grpc

        from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc

        # Its connection buffers ~1 KiB (no window growth): 200 tokens overflow it and the daemon's backlog.
        channel = grpc.insecure_channel(address, options=[
            ("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
        call = ksleep_pb2_grpc.KsleepStub(channel).Generate(ksleep_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text=PROMPT), params=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True)),
            timeout=600)
        next(call)  # streaming; never read again until the end
        stalled.append((channel, call))
        return fault
    pid = client.status().worker_pid
    if pid:
        os.kill(pid, signal.SIGSTOP if fault == "stopped worker" else signal.SIGKILL)
    return fault


def outcome(stalled) -> str:
    channel, call = stalled
    read = 1
    try:
        read += sum(1 for _ in call)
        return f"{read} tokens"
    except Exception as exc:  # noqa: BLE001 - what the client saw
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return f"{read} tokens, then {getattr(exc, 'code', lambda: '')()}: {details}"
    finally:
        channel.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="", help="ksleepd --dtype (default: float32 on cpu, where a request batched "
                    "with others must give its solo tokens; the model's own on a GPU, where bfloat16 near-ties may "
                    "resolve the other way in a batch of another shape: see the README's output guarantee)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--idle-timeout", type=float, default=0.3)
    ap.add_argument("--fuzz", type=int, default=10000, help="fuzzing cases after the cycles (0: none)")
    ap.add_argument("--no-http", action="store_true", help="no HTTP face (fuzz gRPC only)")
    ap.add_argument("--fault-every", type=int, default=0, help="cycles between injected faults (0: none)")
    ap.add_argument("--worker-timeout", type=float, default=10.0, help="ksleepd --worker-timeout")
    ap.add_argument("--stream-backlog", type=int, default=8, help="ksleepd --stream-backlog (the stalled client's bound)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = f"ksleep-soak-{os.getpid()}"
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "auto")
    spawned = SpawnedDaemon(args.model, args.device, prefix, "--idle-timeout", str(args.idle_timeout), "--dtype", args.dtype,
                            "--log-level", "warning", "--worker-timeout", str(args.worker_timeout),
                            "--stream-backlog", str(args.stream_backlog),
                            *([] if args.no_http else ["--http", f"127.0.0.1:{port}"]))
    daemon = spawned.process
    client = Client(spawned.address)
    R: dict = {"args": vars(args) | {"json": str(args.json)}}
    try:
        spawned.wait_ready(client)
        baseline = client.complete(PROMPT, max_tokens=args.max_tokens).token_ids
        failures, mismatches, samples, lock = [], 0, [], threading.Lock()
        faults, stalled, mismatch_sample = [], [], []  # what was injected; the stalled clients' streams (read at the end)
        t0 = time.time()

        def one_request():
            nonlocal mismatches
            try:
                ids = [t.id for t in client.generate(PROMPT, max_tokens=args.max_tokens)]
                if ids != baseline:
                    with lock:
                        mismatches += 1
                        if len(mismatch_sample) < 5:
                            mismatch_sample.append({"cycle": cycle, "ids": ids})
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append(repr(exc)[:300])

        for cycle in range(args.cycles):
            wait_until = time.monotonic() + 60
            while client.status().state != "asleep":  # the idle timer puts it to sleep
                if time.monotonic() > wait_until:
                    failures.append(f"cycle {cycle}: never fell asleep")
                    break
                time.sleep(0.02)
            fault = inject(cycle, args.fault_every, client, spawned.address, stalled)
            threads = [threading.Thread(target=one_request) for _ in range(args.clients)]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            if fault is not None:
                faults.append({"cycle": cycle, "fault": fault, "cycle_seconds": time.monotonic() - started,
                               "restarts": client.status().restarts})
            samples.append(resources(daemon.pid, prefix, client))
            if cycle % max(1, args.cycles // 20) == 0:
                print(f"cycle {cycle}: {len(failures)} failures, {mismatches} mismatches, {samples[-1]}", flush=True)
        R["cycles_seconds"] = time.time() - t0
        R["faults"] = faults
        R["stalled_clients_saw"] = [outcome(call) for call in stalled]
        status = client.status()
        R["sleeps_total"], R["wakes_total"], R["restarts"] = status.sleeps_total, status.wakes_total, status.restarts
        tenth = max(1, len(samples) // 10)
        first, last = samples[:tenth], samples[-tenth:]
        R["resources"] = {k: {"first_10pct": statistics.mean(s[k] for s in first), "last_10pct": statistics.mean(s[k] for s in last)}
                          for k in ("rss", "fds", "shm", "device_used", "processes")}
        flat = {k: abs(v["last_10pct"] - v["first_10pct"]) for k, v in R["resources"].items()}
        device_first = R["resources"]["device_used"]["first_10pct"]
        # On a cpu device the worker's "device" memory is its RSS, which a replaced worker (a fault) rebuilds
        # with another allocator history: it gets RSS's tolerance; a GPU's own bytes must stay within 1 %.
        device_slack = max(64 << 20, 0.05 * device_first) if args.device == "cpu" else 0.01 * max(1, device_first)
        R["flat"] = (flat["fds"] <= 2 and flat["shm"] == 0 and flat["processes"] == 0
                     and flat["rss"] <= max(64 << 20, 0.05 * R["resources"]["rss"]["first_10pct"])
                     and flat["device_used"] <= device_slack)
        R["flat_by"] = {k: v for k, v in flat.items()}
        R["requests"] = args.cycles * args.clients
        R["failed"], R["mismatches"] = len(failures), mismatches
        R["failures_sample"] = failures[:10]
        R["baseline"], R["mismatch_sample"] = baseline, mismatch_sample
        if args.fuzz:
            t = time.time()
            http = None
            if not args.no_http:
                import httpx

                http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            R["fuzz_cases"] = fuzz(client.channel, http, args.fuzz)
            R["fuzz_seconds"] = time.time() - t
            R["after_fuzz_identical"] = client.complete(PROMPT, max_tokens=args.max_tokens).token_ids == baseline
    finally:
        client.close()
        R["daemon_exit_code"] = spawned.stop()
        R["shm_left"] = sorted(p.name for p in Path("/dev/shm").glob(f"{prefix}*"))
    ok = (R.get("failed") == 0 and R.get("mismatches") == 0 and R.get("flat") and R["daemon_exit_code"] == 0
          and not R["shm_left"] and R.get("after_fuzz_identical", True))
    R["verdict"] = "pass" if ok else "fail"
    print(json.dumps(R, indent=1))
    if args.json:
        args.json.write_text(json.dumps(R, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
