"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic (a bad one is a 400)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ksleep.v1 import common_pb2, ksleep_pb2
from ksleep.worker.errors import ValidationError
from ksleep.worker.limits import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS


MAX_CHOICES = 16  # n


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]  # plain text is what is generated; json_object / json_schema are refused (400)


class _Sampling(BaseModel):
    # Unknown fields are refused rather than silently ignored; the few that clients send with neutral values
    # (user, echo=false, logprobs=null, response_format text...) are accepted.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, lt=2**32)  # (the wire's uint32)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)  # OpenAI's newer name for max_tokens
    ignore_eos: bool | None = None  # vLLM's extension: keep going past the end-of-sequence token
    # vLLM's sampling extensions, with its meaning (benchmark tools such as evalscope send them)
    min_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0, allow_inf_nan=False)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**32)]] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices, generated together in the batch (seed + i each)
    response_format: ResponseFormat | None = None
    user: str | None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    def sampling_pb(self) -> common_pb2.SamplingParams:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValidationError("max_tokens and max_completion_tokens disagree; send one of them")
        fields = {k: getattr(self, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                                                "min_tokens", "repetition_penalty") if getattr(self, k) is not None}
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        if (alternatives := self.logprob_alternatives()) is not None:
            fields["logprobs"] = alternatives
        return common_pb2.SamplingParams(stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], **fields)

    def logprob_alternatives(self) -> int | None:
        """How many most likely tokens to return with each token (None: no logprobs)."""
        return None

    def choice_requests(self) -> list[ksleep_pb2.GenerateRequest]:
        """One request per choice (n); with a seed, choice i draws with seed + i."""
        first = self.request_pb()
        out = [first]
        for i in range(1, self.n):
            other = ksleep_pb2.GenerateRequest()
            other.CopyFrom(first)
            if first.params.HasField("seed"):
                other.params.seed = (first.params.seed + i) % 2**63
            out.append(other)
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[Annotated[int, Field(ge=0, lt=2**32)]] | list[str] = Field(min_length=1)
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the legacy API: alternatives per token

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    def request_pb(self) -> ksleep_pb2.GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ValidationError("one prompt per request: send a single string")
            prompt = prompt[0]
        wire = (common_pb2.Prompt(text=prompt) if isinstance(prompt, str)
                else common_pb2.Prompt(token_ids=common_pb2.Prompt.TokenIds(ids=prompt)))
        return ksleep_pb2.GenerateRequest(prompt=wire, params=self.sampling_pb())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def logprob_alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValidationError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def request_pb(self) -> ksleep_pb2.GenerateRequest:
        chat = common_pb2.Prompt.Chat(messages=[common_pb2.Prompt.ChatMessage(role=m.role, content=m.content)
                                                for m in self.messages])
        return ksleep_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=chat), params=self.sampling_pb())


class UpdateWeightsRequest(BaseModel):
    """POST /update_weights_from_disk, in SGLang's field names (its RL integrations call that route)."""

    model_config = ConfigDict(extra="forbid")
    model_path: str = Field(min_length=1, max_length=4096)  # a checkpoint directory on the daemon's machine
    abort_all_requests: bool = False  # False: requests in flight finish first (at most --drain-timeout)
    model: str | None = Field(default=None, max_length=4096)  # which served model (default: the first)
