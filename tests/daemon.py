"""A ksleepd started as a real process for a test, with helpers to talk to it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc

PROMPT = "The future of artificial intelligence is"


def request(prompt: str = PROMPT, max_tokens: int = 12, **params) -> ksleep_pb2.GenerateRequest:
    return ksleep_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=prompt),
                                      params=common_pb2.SamplingParams(max_tokens=max_tokens, **params))


class Daemon:
    def __init__(self, tmp: Path, prefix: str, model: str = "synthetic:tiny", *flags: str, env: dict | None = None):
        self.socket = tmp / "ksleepd.sock"
        self.prefix = prefix
        self.log = open(tmp / "ksleepd.log", "w+")
        environ = {**os.environ, "XDG_RUNTIME_DIR": str(tmp / "run"), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ksleep.supervisor", "start", "--model", model, "--device", "cpu",
             "--listen", f"unix:{self.socket}", "--pool-prefix", prefix, "--grace", "10", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=environ)
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.stub = ksleep_pb2_grpc.KsleepStub(self.channel)

    def wait_ready(self, timeout: float = 180) -> Daemon:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ksleepd exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                time.sleep(0.1)
        raise AssertionError(f"ksleepd not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-6000:]

    def status(self, **kw) -> ksleep_pb2.StatusResponse:
        return self.stub.Status(ksleep_pb2.StatusRequest(**kw), timeout=30)

    def generate(self, req: ksleep_pb2.GenerateRequest | None = None, timeout: float = 120):
        return list(self.stub.Generate(req or request(), timeout=timeout))

    def ids(self, req=None) -> list[int]:
        return [r.token.id for r in self.generate(req)]

    def wait_for_state(self, state: int, timeout: float = 60) -> ksleep_pb2.StatusResponse:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.state == state:
                return status
            time.sleep(0.05)
        raise AssertionError(f"state {common_pb2.State.Name(state)} not reached; now {common_pb2.State.Name(status.state)}")

    def processes(self) -> list[psutil.Process]:
        """ksleepd and every process under it (forkserver, worker)."""
        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True)]

    def stop(self, timeout: float = 60) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"ksleepd ignored SIGTERM:\n{self.output()}")
        self.log.close()
        return self.proc.returncode
