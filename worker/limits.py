"""Limits named once for every process (no torch here: the supervisor and the HTTP face import it): the batching
settings' ranges and the KV cache size's syntax, checked alike by ksleepd's and the worker's configuration, and
the caps on a request that both faces (gRPC and HTTP) apply before a request is admitted."""
from __future__ import annotations

MAX_LOGPROBS = 20  # most likely tokens returned per position
MAX_STOP_TOKEN_IDS = 64  # stop_token_ids per request
MAX_STOP_STRINGS = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_PROMPT_CHARS = 4 << 20  # characters of text in a prompt (a chat's contents together): far past any context
MAX_PROMPT_TOKENS = 1 << 20  # token ids in a prompt
MAX_MESSAGES = 4096  # messages in a chat prompt
PAD_TOKENS = 16  # KV cache positions never handed to a request: the padding rows of a graph-captured step write there

PREFILL_CHUNK = 256  # default --prefill-chunk: a 4,000-token prompt beside 15 decodes keeps their ITL p99 < 3x median (H200, 7B)
INT_RANGES = {"max_batch": (1, 512), "max_queue": (0, 1 << 20), "prefill_chunk": (16, 1 << 16)}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def check_int(name: str, value) -> None:
    low, high = INT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def parse_kv_cache(text: str) -> tuple[float | None, int | None]:
    """`auto` -> (None, None); a fraction in (0, 1] such as `0.3` -> (0.3, None); a size such as `8GiB`, `512MB`
    or `1000000000` (bytes) -> (None, bytes). ValueError otherwise."""
    value = str(text).strip().lower()
    if value == "auto":
        return None, None
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):].strip()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _UNITS or not amount > 0 or (not unit and "." in number and amount > 1):
        raise ValueError(f"kv_cache {text!r} is not auto, a fraction in (0, 1] or a size such as 8GiB")
    if not unit and amount <= 1:
        return amount, None
    return None, int(amount * _UNITS[unit])
