"""What a generation takes and gives: sampling parameters, token events, completions, and the per-request writer
that turns sampled ids into text (incremental detokenisation, stop strings, finish reasons)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from ksleep.v1 import common_pb2

from .errors import ValidationError
from .limits import MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, MAX_STOP_STRINGS, MAX_LOGPROBS
from .names import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, FINISH_TO_PB  # noqa: F401 - FINISH_STOP: re-exported


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (the default, and what the evaluation uses)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    repetition_penalty: float = 1.0  # 1: off
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # with each token: its log-probability and this many alternatives

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValidationError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValidationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ValidationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValidationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValidationError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValidationError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if (not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            raise ValidationError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValidationError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValidationError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} token ids >= 0")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValidationError("stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValidationError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                                  f"characters, got {len(self.stop)} (longest {max(map(len, self.stop))})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> SamplingParams:
        """Unset fields take the defaults; values are validated (ValueError) as for a direct call."""
        fields = {name: getattr(pb, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                                                       "min_tokens", "repetition_penalty", "logprobs") if pb.HasField(name)}
        return cls(stop=tuple(pb.stop), stop_token_ids=tuple(pb.stop_token_ids), **fields)

    @property
    def needs_history(self) -> bool:
        """Its draws depend on its tokens so far (a penalty on them, or masks until min_tokens)."""
        return self.repetition_penalty != 1.0 or self.min_tokens > 0


def prompt_from_pb(pb: common_pb2.Prompt) -> str | list[int] | list[dict]:
    """Text, token ids, or chat messages as [{"role": ..., "content": ...}], within the size caps (limits.py)."""
    kind = pb.WhichOneof("input")
    if kind is None:
        raise ValidationError("prompt is missing: set prompt.text, prompt.token_ids or prompt.chat")
    if kind == "chat":
        messages = pb.chat.messages
        if not messages or len(messages) > MAX_MESSAGES:
            raise ValidationError(f"a chat prompt takes 1 to {MAX_MESSAGES} messages, got {len(messages)}")
        if any(not m.role for m in messages):
            raise ValidationError("every chat message needs a non-empty role")
        chars = sum(len(m.content) for m in messages)
        if chars > MAX_PROMPT_CHARS:
            raise ValidationError(f"the chat's messages hold {chars:,} characters, over the limit of {MAX_PROMPT_CHARS:,}")
        return [{"role": m.role, "content": m.content} for m in messages]
    if kind == "text":
        if not pb.text:
            raise ValidationError("prompt is empty")
        if len(pb.text) > MAX_PROMPT_CHARS:
            raise ValidationError(f"the prompt holds {len(pb.text):,} characters, over the limit of {MAX_PROMPT_CHARS:,}")
        return pb.text
    ids = pb.token_ids.ids
    if not ids or len(ids) > MAX_PROMPT_TOKENS:
        raise ValidationError(f"a token-id prompt takes 1 to {MAX_PROMPT_TOKENS:,} ids, got {len(ids):,}")
    return list(ids)


def check_request(prompt: str | list[int] | list[dict], params: SamplingParams, context_tokens: int | None,
                  cache_positions: int | None) -> None:
    """What can be checked without the tokenizer, before a request is admitted (the supervisor, so that a bad
    request never wakes the model): its length against the model's context and the KV cache (a prompt holds at
    least one token; token ids are counted exactly)."""
    prompt_tokens = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else 1
    if context_tokens and prompt_tokens + params.max_tokens > context_tokens:
        raise ValidationError(f"prompt is at least {prompt_tokens} tokens and max_tokens is {params.max_tokens}: "
                              f"{prompt_tokens + params.max_tokens} exceeds the model's context of {context_tokens} tokens")
    need = prompt_tokens + params.max_tokens + 1
    if cache_positions and need > cache_positions:
        raise ValidationError(f"the request needs at least {need} KV cache positions (prompt {prompt_tokens} + "
                              f"max_tokens {params.max_tokens} + 1) but the cache holds at most {cache_positions} "
                              f"for one request")


@dataclass(slots=True)
class TokenEvent:
    """One generated token. `text` is what this token adds to the output (possibly empty while a multi-byte
    character or a possible stop string is incomplete); the last event carries `finish_reason`."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None
    elapsed: float  # seconds from the request's start to this token being known on the host
    logprob: tuple[str, float] | None = None  # (the token decoded alone, its log-probability), when asked for
    top_logprobs: tuple[tuple[int, str, float], ...] = ()  # (id, text, log-probability), most likely first

    def to_pb(self) -> common_pb2.Token:
        pb = common_pb2.Token(index=self.index, id=self.token_id, text=self.text,
                              finish_reason=FINISH_TO_PB[self.finish_reason], elapsed_seconds=self.elapsed,
                              top_logprobs=[common_pb2.TokenLogprob(id=i, text=t, logprob=p) for i, t, p in self.top_logprobs])
        if self.logprob is not None:
            pb.logprob.CopyFrom(common_pb2.TokenLogprob(id=self.token_id, text=self.logprob[0], logprob=self.logprob[1]))
        return pb


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    ttft: float
    total: float
    token_times: list[float] = field(default_factory=list)

    @classmethod
    def collect(cls, events: Iterator[TokenEvent], started: float) -> Completion:
        evs = list(events)
        return cls("".join(e.text for e in evs), [e.token_id for e in evs], evs[-1].finish_reason,
                   evs[0].elapsed, time.perf_counter() - started, [e.elapsed for e in evs])


class _StopScanner:
    """Holds back just enough text to tell whether a stop string is starting."""

    def __init__(self, stops: Sequence[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = min(self.hold, len(self.pending))
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenWriter:
    """Turns one request's sampled ids into TokenEvents: incremental detokenisation (never a broken UTF-8
    sequence), stop strings (held back until they can be told apart) and the finish reason."""

    __slots__ = ("params", "eos_ids", "started", "index", "_backend", "_decoder", "_scanner")

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: frozenset[int], started: float):
        self.params, self.eos_ids, self.started = params, eos_ids, started
        self.index = 0
        self._backend = tokenizer.backend_tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._scanner = _StopScanner(params.stop)

    def ends(self, token_id: int, count: int) -> str | None:
        """The finish reason that follows from the id alone (EOS, or the `count`-th token reaching max_tokens):
        known without detokenising. Stop strings are found by `push`."""
        if token_id in self.eos_ids and not self.params.ignore_eos:
            return FINISH_EOS
        if token_id in self.params.stop_token_ids:
            return FINISH_STOP
        return FINISH_LENGTH if count >= self.params.max_tokens else None

    def push(self, token_id: int, now: float | None = None) -> TokenEvent:
        index, self.index = self.index, self.index + 1
        elapsed = (time.perf_counter() if now is None else now) - self.started
        finish = self.ends(token_id, index + 1)
        if finish == FINISH_EOS or (finish == FINISH_STOP and token_id in self.params.stop_token_ids):
            text = self._scanner.flush()  # (the ending token itself is not text)
        else:
            text, hit = self._scanner.feed(self._decoder.step(self._backend, token_id) or "")
            if hit:
                finish = FINISH_STOP
            elif finish == FINISH_LENGTH:
                text += self._scanner.flush()
        return TokenEvent(index, token_id, text, finish, elapsed)
