"""An in-process fake of the GPU worker, for driving the supervisor through races deterministically.

`FakeWorker` serves the real Worker gRPC service on a unix socket, from the test's own event loop; what each RPC
does is set per test (`script`): answer, answer late, hang, answer "asleep" (a worker that fell asleep behind
ksleepd's back), or die before or after a first token. Its "process" is a real child (`sleep`), so that the
supervisor's watchdog kills it with SIGKILL and its watcher sees the exit, exactly as with a real worker; the
fake's server stops when that child exits, so calls in flight fail as they would on a dead worker's socket.

`FakeLifecycle` is the real Lifecycle with `_spawn` making fakes instead of forking workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from pathlib import Path

import grpc

from ksleep.supervisor.launcher import CHANNEL_OPTIONS
from ksleep.supervisor.lifecycle import Lifecycle
from ksleep.v1 import common_pb2, worker_pb2, worker_pb2_grpc

S = common_pb2
TOKENS = [11, 22, 33, 44]  # what every fake generation streams (then FINISH_REASON_LENGTH)
_ids = itertools.count()


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """`script` maps an RPC name to what it does: "ok" (the default), "hang", ("delay", seconds), "asleep"
    (Generate: refused as asleep, the worker's state becomes ASLEEP), "die" (the process dies before answering),
    "die_after_token" (Generate: one token, then the process dies)."""

    def __init__(self, script: dict, calls: dict):
        self.script = script
        self.calls = calls  # RPC name -> times called, over every fake of one lifecycle
        self.state, self.level = S.STATE_AWAKE, 0
        self.process: asyncio.subprocess.Process | None = None
        self.server: grpc.aio.Server | None = None

    async def _behave(self, rpc: str, context) -> None:
        self.calls[rpc] = self.calls.get(rpc, 0) + 1
        action = self.script.get(rpc, "ok")
        if action == "hang":
            await asyncio.Event().wait()  # until the server stops (the process was killed)
        elif action == "die":
            self.kill()
            await asyncio.Event().wait()
        elif isinstance(action, tuple) and action[0] == "delay":
            await asyncio.sleep(action[1])

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)

    async def Status(self, request, context):
        await self._behave("Status", context)
        return worker_pb2.WorkerStatusResponse(
            state=self.state, sleep_level=self.level, model="fake", device="cpu", pid=self.process.pid,
            pool_name="", load_source="created", load_seconds=0.01, context_tokens=4096,
            memory=common_pb2.Memory(arena_bytes=1000, weight_bytes=1000, resident_bytes=1000 if self.level == 0 else 0))

    async def Sleep(self, request, context):
        await self._behave("Sleep", context)
        self.state, self.level = S.STATE_ASLEEP, request.level
        return worker_pb2.WorkerSleepResponse(sleep=common_pb2.Transition(seconds=0.001, bytes=1000, level=request.level))

    async def Wake(self, request, context):
        await self._behave("Wake", context)
        self.state, self.level = S.STATE_AWAKE, 0
        return worker_pb2.WorkerWakeResponse(wake=common_pb2.Transition(seconds=0.002, bytes=1000, source="mirror"))

    async def Generate(self, request, context):
        await self._behave("Generate", context)
        action = self.script.get("Generate", "ok")
        if action == "asleep" or self.state != S.STATE_AWAKE:
            self.state, self.level = S.STATE_ASLEEP, max(1, self.level)
            self.script["Generate"] = "ok"  # once: after a wake it serves
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model is asleep")
        for index, token in enumerate(TOKENS):
            last = index == len(TOKENS) - 1
            yield worker_pb2.WorkerGenerateResponse(prompt_tokens=3 if index == 0 else 0, token=common_pb2.Token(
                index=index, id=token, text=f"t{token}", elapsed_seconds=0.001,
                finish_reason=S.FINISH_REASON_LENGTH if last else S.FINISH_REASON_UNSPECIFIED))
            if index == 0 and action == "die_after_token":
                self.kill()
                await asyncio.Event().wait()


class FakeHandle:
    """What the supervisor knows of a worker (launcher.WorkerHandle's surface), for a FakeWorker."""

    def __init__(self, servicer: FakeWorker, socket_path: Path, exited: asyncio.Future):
        self.servicer = servicer
        self.pid = servicer.process.pid
        self.socket_path = socket_path
        self.exited = exited
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.stopping = False
        self.answered = 0.0
        self.startup = {"fork": 0.0, "start": 0.0}

    @classmethod
    async def launch(cls, directory: Path, script: dict, calls: dict) -> FakeHandle:
        servicer = FakeWorker(script, calls)
        servicer.process = await asyncio.create_subprocess_exec("sleep", "3600")
        socket_path = directory / f"fake-{next(_ids)}.sock"
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        servicer.server = server
        exited = asyncio.get_running_loop().create_future()

        async def reap() -> None:
            code = await servicer.process.wait()
            await server.stop(0)  # a dead process answers nothing: calls in flight fail
            socket_path.unlink(missing_ok=True)
            exited.set_result(code)

        asyncio.create_task(reap())
        return cls(servicer, socket_path, exited)

    async def stop(self, grace: float) -> int:
        self.stopping = True
        self.servicer.kill()
        code = await self.exited
        await self.channel.close()
        return code


class FakeLifecycle(Lifecycle):
    """The real lifecycle, serving fakes: the n-th worker it starts follows `scripts[n]` (none: it behaves);
    `handles` lists them in start order."""

    def __init__(self, config, directory: Path, *scripts: dict):
        super().__init__(config)
        self.directory = directory
        self.scripts = list(scripts)
        self.calls: dict[str, int] = {}
        self.handles: list[FakeHandle] = []

    async def _spawn(self, start_asleep: bool) -> dict[str, float]:
        n = len(self.handles)
        script = self.scripts[n] if n < len(self.scripts) else {}
        handle = await FakeHandle.launch(self.directory, script, self.calls)
        if start_asleep:
            handle.servicer.state, handle.servicer.level = S.STATE_ASLEEP, 1
        self.handles.append(handle)
        await self._adopt(handle)
        return {"fork": 0.0}

    async def close(self) -> None:
        await self.stop()
        for handle in self.handles:
            if not handle.exited.done():
                await handle.stop(1)


async def wait_until(predicate, within: float, what: str) -> float:
    """Seconds until `predicate()` holds (polling a condition the supervisor exposes only as state)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0
