"""Client and AsyncClient: the Ksleep gRPC service as a few Python calls.

    from ksleep.client import Client

    with Client("127.0.0.1:50051") as client:
        for token in client.generate("The future of artificial intelligence is", max_tokens=50):
            print(token.text, end="", flush=True)
        result = client.complete("Hello", max_tokens=8)      # text, token_ids, finish_reason, ttft, total
        client.sleep(level=1)
        print(client.status().state)                         # "asleep"
"""
from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from ksleep.supervisor.config import default_listen
from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc

from .errors import from_rpc_error
from .types import Completion, Status, Token, transition_dict, update_dict

MAX_MESSAGE = 16 << 20


def resolve_address(address: str | None = None) -> str:
    """A gRPC target: `address`, else $KSLEEP_ADDRESS, else ksleepd's default unix socket.
    Accepts unix:/path, a bare /path, and HOST:PORT."""
    address = address or os.environ.get("KSLEEP_ADDRESS") or default_listen()
    return f"unix:{address}" if address.startswith("/") else address


def build_request(prompt: str | Sequence[int] | Sequence[dict], *, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  seed: int | None = None, stop: str | Sequence[str] | None = None,
                  ignore_eos: bool | None = None, model: str = "", min_tokens: int | None = None,
                  repetition_penalty: float | None = None,
                  stop_token_ids: Sequence[int] | None = None) -> ksleep_pb2.GenerateRequest:
    """A GenerateRequest from text, token ids or chat messages ([{"role": ..., "content": ...}]); `model` picks
    one of a daemon's models (default: its first)."""
    if isinstance(prompt, str):
        wire = common_pb2.Prompt(text=prompt)
    elif prompt and all(isinstance(m, dict) for m in prompt):
        wire = common_pb2.Prompt(chat=common_pb2.Prompt.Chat(messages=[
            common_pb2.Prompt.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]))
    else:
        wire = common_pb2.Prompt(token_ids=common_pb2.Prompt.TokenIds(ids=list(prompt)))
    params = {k: v for k, v in dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, ignore_eos=ignore_eos, min_tokens=min_tokens,
                                    repetition_penalty=repetition_penalty).items() if v is not None}
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return ksleep_pb2.GenerateRequest(prompt=wire, model=model, params=common_pb2.SamplingParams(
        stop=stops, stop_token_ids=list(stop_token_ids or []), **params))


def _sleep_request(level: int | None, abort: bool, model: str = "") -> ksleep_pb2.SleepRequest:
    mode = ksleep_pb2.SLEEP_MODE_ABORT if abort else ksleep_pb2.SLEEP_MODE_WAIT
    return ksleep_pb2.SleepRequest(mode=mode, model=model, **({"level": level} if level is not None else {}))


def _update_request(directory: str, abort: bool, model: str = "") -> ksleep_pb2.UpdateWeightsRequest:
    return ksleep_pb2.UpdateWeightsRequest(
        directory=str(directory), mode=ksleep_pb2.SLEEP_MODE_ABORT if abort else ksleep_pb2.SLEEP_MODE_WAIT,
        model=model)


class _Collector:
    """Accumulates a Generate stream into a Completion, timing it from the request's send."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.tokens: list[Token] = []
        self.summary = None

    def add(self, response: ksleep_pb2.GenerateResponse) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        self.tokens.append(Token.from_pb(response.token))
        if response.HasField("summary"):
            self.summary = response.summary

    def result(self) -> Completion:
        s = self.summary
        return Completion("".join(t.text for t in self.tokens), [t.id for t in self.tokens],
                          self.tokens[-1].finish_reason, self.ttft, time.perf_counter() - self.t0,
                          s.prompt_tokens if s else 0, bool(s and s.woke), s.weights.number if s else 0)


class _Base:
    def __init__(self, address: str | None, token: str | None, timeout: float | None):
        self.address = resolve_address(address)
        token = token if token is not None else os.environ.get("KSLEEP_CONTROL_TOKEN")
        self._control = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout
        self._options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


class Client(_Base):
    """Blocking client. `token` (or $KSLEEP_CONTROL_TOKEN) authorises sleep and wake when ksleepd requires it."""

    def __init__(self, address: str | None = None, token: str | None = None, timeout: float | None = None):
        super().__init__(address, token, timeout)
        self.channel = grpc.insecure_channel(self.address, options=self._options)
        self._stub = ksleep_pb2_grpc.KsleepStub(self.channel)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Raise Unavailable unless the daemon accepts a connection within `timeout` seconds."""
        from .errors import Unavailable

        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no ksleepd answers at {self.address}") from None

    def generate(self, prompt, **params) -> Iterator[Token]:
        """Yield tokens as they stream (see build_request for the parameters)."""
        try:
            for response in self._stub.Generate(build_request(prompt, **params), timeout=self.timeout):
                yield Token.from_pb(response.token)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def complete(self, prompt, **params) -> Completion:
        """The whole generation, with time to first token and total time measured here."""
        collector = _Collector()
        try:
            for response in self._stub.Generate(build_request(prompt, **params), timeout=self.timeout):
                collector.add(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return collector.result()

    def sleep(self, level: int | None = None, abort: bool = False, model: str = "") -> dict:
        """Sleep now (level 1, 2 or 3; default: the daemon's). `abort` cancels requests in flight. `model`: one
        of several models (default: every model)."""
        try:
            reply = self._stub.Sleep(_sleep_request(level, abort, model), timeout=self.timeout, metadata=self._control)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return {**transition_dict(reply.sleep), "aborted_requests": reply.aborted_requests}

    def wake(self, model: str = "") -> dict:
        try:
            reply = self._stub.WakeUp(ksleep_pb2.WakeUpRequest(model=model), timeout=self.timeout, metadata=self._control)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return transition_dict(reply.wake)

    def update_weights(self, directory: str, abort: bool = False, model: str = "") -> dict:
        """Serve the weights of a checkpoint directory (on the daemon's machine) from now on; `abort` cancels the
        requests in flight instead of letting them finish. Needs the control token when one is set."""
        try:
            reply = self._stub.UpdateWeights(_update_request(directory, abort, model), timeout=self.timeout,
                                             metadata=self._control)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return update_dict(reply)

    def status(self, history: bool = False) -> Status:
        try:
            return Status.from_pb(self._stub.Status(ksleep_pb2.StatusRequest(include_history=history), timeout=self.timeout))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The same calls for asyncio: `async for token in client.generate(...)`, `await client.complete(...)`."""

    def __init__(self, address: str | None = None, token: str | None = None, timeout: float | None = None):
        super().__init__(address, token, timeout)
        self.channel = grpc.aio.insecure_channel(self.address, options=self._options)
        self._stub = ksleep_pb2_grpc.KsleepStub(self.channel)

    async def generate(self, prompt, **params) -> AsyncIterator[Token]:
        try:
            async for response in self._stub.Generate(build_request(prompt, **params), timeout=self.timeout):
                yield Token.from_pb(response.token)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def complete(self, prompt, **params) -> Completion:
        collector = _Collector()
        try:
            async for response in self._stub.Generate(build_request(prompt, **params), timeout=self.timeout):
                collector.add(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return collector.result()

    async def sleep(self, level: int | None = None, abort: bool = False, model: str = "") -> dict:
        try:
            reply = await self._stub.Sleep(_sleep_request(level, abort, model), timeout=self.timeout, metadata=self._control)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return {**transition_dict(reply.sleep), "aborted_requests": reply.aborted_requests}

    async def wake(self, model: str = "") -> dict:
        try:
            reply = await self._stub.WakeUp(ksleep_pb2.WakeUpRequest(model=model), timeout=self.timeout, metadata=self._control)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return transition_dict(reply.wake)

    async def update_weights(self, directory: str, abort: bool = False, model: str = "") -> dict:
        try:
            reply = await self._stub.UpdateWeights(_update_request(directory, abort, model), timeout=self.timeout,
                                                   metadata=self._control)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return update_dict(reply)

    async def status(self, history: bool = False) -> Status:
        try:
            return Status.from_pb(await self._stub.Status(ksleep_pb2.StatusRequest(include_history=history), timeout=self.timeout))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
