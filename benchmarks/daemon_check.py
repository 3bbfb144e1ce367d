"""ksleepd on a GPU, measured from a client: what the gRPC and supervisor path add to a wake, the level-3
wake, and a worker restart from the pool, phase by phase.

    python benchmarks/daemon_check.py --model synthetic:deepseek-r1-distill-qwen-7b --json out.json

Starts its own ksleepd (idle timeout off), then:
1. TTFT awake, and after each level-1 sleep (--pause s asleep), measured in this client from sending Generate
   to receiving the first token; the daemon's own ttft (request arrival to first token) beside it;
2. level 3: device memory of our processes while asleep (NVML), then wake-to-first-token;
3. restart: SIGKILL the worker, send Generate at once, time to the first token; the restart's phases.
With --standby the daemon keeps a spare worker (ksleepd --standby): each kill waits for the spare first, the
restart is its promotion, and the spare's own device memory is reported.
Every first token is checked against the baseline's, and a full greedy output after each part.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from pathlib import Path

import psutil

from ksleep.client import Client
from ksleep.client.spawn import SpawnedDaemon
from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc

PROMPT = "The future of artificial intelligence is"


def request(max_tokens: int) -> ksleep_pb2.GenerateRequest:
    return ksleep_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=PROMPT),
                                      params=common_pb2.SamplingParams(max_tokens=max_tokens))


def first_token(stub) -> tuple[float, float, int]:
    """(client TTFT, daemon TTFT, token id) of a one-token Generate."""
    t = time.perf_counter()
    responses = stub.Generate(request(1), timeout=600)
    first = next(responses)
    client = time.perf_counter() - t
    rest = list(responses)
    last = (rest or [first])[-1]
    return client, last.summary.ttft_seconds, first.token.id


def wait_for_standby(stub, worker_pid: int = 0, timeout: float = 600) -> int:
    """The pid of a ready spare other than `worker_pid`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = stub.Status(ksleep_pb2.StatusRequest()).standby_pid
        if pid and pid != worker_pid:
            return pid
        time.sleep(0.2)
    raise TimeoutError(f"no standby worker after {timeout} s")


def nvml_bytes_of(pids: set[int]) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001
        return None
    total = 0
    for i in range(pynvml.nvmlDeviceGetCount()):
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
            if proc.pid in pids:
                total += int(proc.usedGpuMemory or 0)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:deepseek-r1-distill-qwen-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--standby", action="store_true", help="run ksleepd --standby")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    spawned = SpawnedDaemon(args.model, args.device, "ksleep-check", *(["--standby"] if args.standby else []))
    ksleep = Client(spawned.address)
    channel = ksleep.channel
    stub = ksleep_pb2_grpc.KsleepStub(channel)
    daemon = spawned.process
    R: dict = {"model": args.model, "standby": args.standby}
    try:
        spawned.wait_ready(ksleep)
        R["daemon_start_s"] = time.perf_counter() - t0
        base = [r.token.id for r in stub.Generate(request(args.tokens), timeout=600)]
        awake = [first_token(stub) for _ in range(5)]
        R["ttft_awake_client_median_s"] = statistics.median(a[0] for a in awake)
        R["ttft_awake_daemon_median_s"] = statistics.median(a[1] for a in awake)

        if args.standby:
            spare = wait_for_standby(stub)
            R["standby_device_bytes_nvml"] = nvml_bytes_of({spare})
        client, server, wake_s, ok = [], [], [], True
        for _ in range(args.cycles):
            stub.Sleep(ksleep_pb2.SleepRequest(level=1))
            time.sleep(args.pause)
            R["level1_device_used_asleep"] = stub.Status(ksleep_pb2.StatusRequest()).device_used_bytes
            c, s, tok = first_token(stub)
            client.append(c), server.append(s)
            ok &= tok == base[0]
            wake_s.append(stub.Status(ksleep_pb2.StatusRequest()).last_wake.seconds)
        ok &= [r.token.id for r in stub.Generate(request(args.tokens), timeout=600)] == base
        R["level1"] = {"ttft_client_s": client, "ttft_daemon_s": server, "wake_s": wake_s,
                       "ttft_client_median_s": statistics.median(client), "ttft_daemon_median_s": statistics.median(server),
                       "client_minus_daemon_median_ms": 1e3 * statistics.median(c - s for c, s in zip(client, server)),
                       "identical": ok}

        status = stub.Status(ksleep_pb2.StatusRequest())
        stub.Sleep(ksleep_pb2.SleepRequest(level=3))
        time.sleep(args.pause)
        ours = {p.pid for p in [psutil.Process(daemon.pid), *psutil.Process(daemon.pid).children(recursive=True)]}
        asleep = stub.Status(ksleep_pb2.StatusRequest())
        c, s, tok = first_token(stub)
        woke = stub.Status(ksleep_pb2.StatusRequest()).last_wake
        R["level3"] = {"our_device_bytes_asleep_nvml": nvml_bytes_of(ours), "worker_pid_asleep": asleep.worker_pid,
                       "device_used_asleep": asleep.device_used_bytes, "device_used_awake_before": status.device_used_bytes,
                       "ttft_client_s": c, "ttft_daemon_s": s, "wake_phases": dict(woke.phases),
                       "identical": tok == base[0] and [r.token.id for r in stub.Generate(request(args.tokens), timeout=600)] == base}

        restarts = []
        for _ in range(2):
            pid = stub.Status(ksleep_pb2.StatusRequest()).worker_pid
            if args.standby:
                wait_for_standby(stub, pid)
            t = time.perf_counter()
            killed_unix = time.time()
            os.kill(pid, signal.SIGKILL)
            responses = stub.Generate(request(1), timeout=600)
            tok = next(responses).token.id
            total = time.perf_counter() - t
            first_unix = time.time()
            list(responses)
            st = stub.Status(ksleep_pb2.StatusRequest())
            restarts.append({"kill_to_first_token_s": total, "restart_s": st.last_restart.seconds,
                             "kill_to_crash_noticed_s": st.last_restart.at_unix - st.last_restart.seconds - killed_unix,
                             "restart_start_to_first_token_s": first_unix - (st.last_restart.at_unix - st.last_restart.seconds),
                             "phases": dict(st.last_restart.phases), "source": st.last_restart.source,
                             "load_source": st.worker_load_source,
                             "identical": tok == base[0]})
        R["restart"] = restarts
    finally:
        ksleep.close()
        R["daemon_exit_code"] = spawned.stop()
    print(json.dumps(R, indent=1))
    L1 = R["level1"]
    print(f"\nTTFT awake (client)                  {R['ttft_awake_client_median_s'] * 1e3:.1f} ms")
    print(f"TTFT after L1 sleep: client median    {L1['ttft_client_median_s'] * 1e3:.1f} ms; daemon {L1['ttft_daemon_median_s'] * 1e3:.1f} ms;"
          f" client - daemon {L1['client_minus_daemon_median_ms']:.2f} ms")
    print(f"L3 asleep: our device bytes (NVML)   {R['level3']['our_device_bytes_asleep_nvml']}; wake to first token {R['level3']['ttft_client_s']:.3f} s")
    if args.standby:
        print(f"standby: its own device memory      {R['standby_device_bytes_nvml']} bytes (NVML); device used asleep (L1) "
              f"{R['level1_device_used_asleep']}")
    for r in R["restart"]:
        print(f"restart: kill to first token        {r['kill_to_first_token_s']:.3f} s ({r['source']}, {r['load_source']}); crash noticed after "
              f"{r['kill_to_crash_noticed_s']:.3f} s; restart to first token {r['restart_start_to_first_token_s']:.3f} s; "
              f"phases {r['phases']}")
    if args.json:
        args.json.write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
