"""Names every process gives what crosses the wire: finish reasons and states (no torch, no tokenizers: the
supervisor and the client import it). Defined once here; the faces translate from these (the HTTP face into
OpenAI's vocabulary)."""
from __future__ import annotations

from ksleep.v1 import common_pb2

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"  # max_tokens reached, end of sequence, a stop string
FINISH_TO_PB = {None: common_pb2.FINISH_REASON_UNSPECIFIED, FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
                FINISH_EOS: common_pb2.FINISH_REASON_EOS, FINISH_STOP: common_pb2.FINISH_REASON_STOP}
_FINISH_FROM_PB = {pb: name for name, pb in FINISH_TO_PB.items()}


def finish_name(value: int) -> str | None:
    """FINISH_REASON_EOS -> "eos"; None while not finished."""
    return _FINISH_FROM_PB.get(value)


def state_name(value: int) -> str:
    """STATE_AWAKE -> "awake"."""
    return common_pb2.State.Name(value).removeprefix("STATE_").lower()


STATES = tuple(state_name(v) for n, v in common_pb2.State.items() if n != "STATE_UNSPECIFIED")  # "loading", "awake"...
MODES = ("auto", "on", "off")  # settings such as cuda_graphs and fused_kernels
POOL_FORMATS = ("auto", "raw", "compressed")  # how the shared-memory pool holds the weights (compressed.py)
