"""Decode steps replayed from CUDA graphs, with a static KV cache inside the arena's address range.

Eager decoding of a 7B model is bound by Python and kernel launches (~16 tok/s with transformers' generate on an
H200, against a memory-bandwidth floor near 300). Here one decode step (batch 1, one token) is captured once per
cache length and replayed per token. The KV cache is transformers' StaticCache with its key/value tensors pointed
at the arena's scratch block, so it is released on sleep (never copied: a sleeping model has no requests) and,
with CUDA VMM, mapped back at the same address on wake: the graphs, which captured the weights' and the cache's
addresses, stay valid across sleep/wake and are captured once. Without stable addresses (ROCm, --vmm off) they
are captured again after the next wake.

transformers' StaticLayer writes at its own on-device counter (`cumulative_length`) and builds the decode mask
from it, so a replay needs no host-side position: we reset the counters at the start of a request and keep the
RoPE position tensor equal to the counter.

Cache lengths come in powers of two from MIN_TOKENS up to `max_tokens` (a decode step attends over the whole
static length, masked, so short requests use short caches: measured on an H200, 7B, 7.2 ms per step at 256
positions, 10 ms at 2048). All lengths are views of the one scratch block. Attention runs without cuDNN's SDPA
kernel, which was measured to give run-to-run different tokens; the remaining kernels gave the same tokens for
graph and eager steps, run after run.

`compile=True` also runs the step through torch.compile (kernel fusion: 6.45 ms instead of 8.4 ms per step at
1024 positions, measured) at the price of ~35 s of compilation when the worker starts. A compiled step is
specialised to one cache length, `max_tokens`, so keep it short (--graph-tokens 512) in that mode.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

log = logging.getLogger(__name__)

MIN_TOKENS = 256
DETERMINISTIC_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device):
    """The SDPA kernels every forward of the engine uses (all but cuDNN's, on a GPU)."""
    return sdpa_kernel(DETERMINISTIC_SDPA) if device.type == "cuda" else contextlib.nullcontext()


def kv_bytes(config, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of a batch-1 KV cache of `tokens` positions for `config`."""
    heads = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return 2 * int(config.num_hidden_layers) * heads * tokens * head_dim * torch.empty(0, dtype=dtype).element_size()


def static_cache_unsupported(config, max_tokens: int) -> str | None:
    """Why this model cannot decode over our static cache (None when it can)."""
    if not all(hasattr(config, name) for name in ("num_key_value_heads", "num_attention_heads", "hidden_size")):
        return f"{type(config).__name__} does not describe its attention heads as the static cache needs"
    try:
        layers = StaticCache(config=config, max_cache_len=max_tokens).layers
    except Exception as exc:  # a configuration transformers' StaticCache cannot take
        return f"transformers' StaticCache refused the model: {exc}"
    if any(type(layer) is not StaticLayer for layer in layers):
        return "the model has sliding-window layers (the graph decoder needs full attention)"
    return None


def cache_length(tokens: int, max_tokens: int) -> int:
    """The smallest power-of-two length from MIN_TOKENS that holds `tokens`, capped at `max_tokens`."""
    length = MIN_TOKENS
    while length < tokens:
        length *= 2
    return min(length, max_tokens)


@dataclass(slots=True)
class DecodeCache:
    cache: StaticCache
    graphed: bool  # a length of the shared cache in the arena, decoded through its graph; else private, eager
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class GraphDecoder:
    """One request at a time decodes through the graphs (`acquire`/`release`); a concurrent one gets a private
    cache of the same length (`private`) and eager steps, which give the same tokens."""

    def __init__(self, model, config, dtype: torch.dtype, device: torch.device, max_tokens: int,
                 compile: bool = False):
        self.model, self.config, self.dtype, self.device = model, config, dtype, device
        self.max_tokens = max_tokens
        self.layers = int(config.num_hidden_layers)
        self.heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._shared: dict[int, DecodeCache] = {}  # cache length -> its views of the scratch block and graph
        self._scratch_ptr: int | None = None
        self._busy = False
        self._pool = None  # one memory pool shared by every captured graph
        # made once and distinct: a warm-up on the capture stream would allocate that stream's cuBLAS workspace
        # outside the graph's pool, where a sleep's workspace clean-up would free it under the graph
        self._warm_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._capture_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._step_fn = torch.compile(self._run, dynamic=False) if compile else self._run
        self.compiled = compile
        self.captures = 0  # graphs captured so far (the benchmark checks it stays put across sleep/wake)
        self.replays = 0

    def accepts(self, tokens: int) -> bool:
        """Whether a request of `tokens` positions (prompt + new) decodes over a static cache at all."""
        return tokens <= self.max_tokens

    @property
    def busy(self) -> bool:
        return self._busy

    @torch.inference_mode()  # the cache's tensors are made and reset in one mode, as the steps use them
    def acquire(self, scratch: torch.Tensor, tokens: int) -> DecodeCache:
        """Claim the shared cache and its graph for one request of `tokens` positions. `scratch` is the arena's
        scratch block. (An arena that re-allocates on wake moves the weights too: `invalidate` before its sleep.)"""
        if scratch.data_ptr() != self._scratch_ptr:
            self._shared.clear()  # the graphs captured addresses that are gone
            self._scratch_ptr = scratch.data_ptr()
        length = self._length(tokens)
        entry = self._shared.get(length)
        if entry is None:
            entry = self._shared[length] = DecodeCache(self._cache(scratch, length, self.max_tokens), graphed=True)
        self.reset(entry)
        self._busy = True
        return entry

    @torch.inference_mode()
    def private(self, tokens: int) -> DecodeCache:
        """A cache of its own, of the length the shared one would have, for a request that cannot have that."""
        length = self._length(tokens)
        scratch = torch.zeros(kv_bytes(self.config, self.dtype, length), dtype=torch.uint8, device=self.device)
        return DecodeCache(self._cache(scratch, length, length), graphed=False)

    def release(self) -> None:
        self._busy = False

    def invalidate(self) -> None:
        """Forget the graphs and cache views (the scratch they point into is about to be freed and re-made
        elsewhere: an arena without stable addresses)."""
        self._shared.clear()
        self._scratch_ptr = None

    def _length(self, tokens: int) -> int:
        # a compiled step is specialised to its shapes: one length, one compilation
        return self.max_tokens if self.compiled else cache_length(tokens, self.max_tokens)

    @torch.inference_mode()
    def prepare(self, scratch: torch.Tensor) -> None:
        """Compile (when asked to) and capture the graph now, at load, rather than in the first request."""
        entry = self.acquire(scratch, MIN_TOKENS)
        try:
            self.prefill(entry, torch.zeros(1, 1, dtype=torch.long, device=self.device))
            self._capture(entry)
        finally:
            self.release()

    @torch.inference_mode()
    def reset(self, entry: DecodeCache) -> None:
        """Start a cache over (positions only: stale keys and values are masked, then overwritten)."""
        for layer in entry.cache.layers:
            layer.cumulative_length.zero_()

    def _cache(self, scratch: torch.Tensor, length: int, stride_tokens: int) -> StaticCache:
        """A StaticCache of `length` positions whose keys and values are views into `scratch`, laid out as
        [layer][keys|values][head][stride_tokens][head_dim]."""
        cache = StaticCache(config=self.config, max_cache_len=length)  # full-attention layers: checked at load
        per = self.heads * stride_tokens * self.head_dim  # elements of one layer's keys (or values)
        # a tensor of the cache's dtype over the scratch bytes, not a dtype view of them: torch.compile does not
        # handle mutations of inputs that are views with another dtype than their base
        size = torch.empty(0, dtype=self.dtype).element_size()
        flat = torch.empty(0, dtype=self.dtype, device=self.device)
        flat.set_(scratch.untyped_storage(), scratch.storage_offset() // size, (2 * self.layers * per,), (1,))
        shape, stride = (1, self.heads, length, self.head_dim), (per, stride_tokens * self.head_dim, self.head_dim, 1)
        for i, layer in enumerate(cache.layers):
            layer.dtype, layer.device = self.dtype, self.device
            layer.batch_size, layer.num_heads = 1, self.heads
            layer.k_head_dim = layer.v_head_dim = self.head_dim
            layer.keys = flat[2 * i * per : (2 * i + 1) * per].as_strided(shape, stride)
            layer.values = flat[(2 * i + 1) * per : (2 * i + 2) * per].as_strided(shape, stride)
            layer.cumulative_length = torch.zeros((), dtype=torch.long, device=self.device)
            layer.is_initialized = True
        return cache

    def prefill(self, entry: DecodeCache, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt eagerly into the static cache; returns the last position's logits."""
        n = input_ids.shape[1]
        positions = torch.arange(n, device=self.device).view(1, n)
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=entry.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1, :]

    def step(self, entry: DecodeCache, token: torch.Tensor) -> torch.Tensor:
        """One decode step for `token` ([1, 1] on the device): replayed from the length's graph, captured on
        first use. The returned logits are the graph's output buffer: read them before the next step."""
        self._ids.copy_(token.view(1, 1))
        self._pos.copy_(entry.cache.layers[0].cumulative_length.view(1, 1))
        if self.device.type != "cuda" or not entry.graphed:
            return self._step_fn(entry.cache)  # compiled too when the graph is: the same kernels, the same tokens
        if entry.graph is None:
            self._capture(entry)
        entry.graph.replay()
        self.replays += 1
        return entry.logits

    def _run(self, cache: StaticCache) -> torch.Tensor:
        out = self.model(input_ids=self._ids, position_ids=self._pos, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1, :]

    def _capture(self, entry: DecodeCache) -> None:
        counters = [layer.cumulative_length.clone() for layer in entry.cache.layers]
        side = self._warm_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation (and compilation) must not happen in capture
            for _ in range(2):
                self._step_fn(entry.cache)
                self._pos.add_(1)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for layer, saved in zip(entry.cache.layers, counters):
            layer.cumulative_length.copy_(saved)  # the warm-up wrote ahead; those positions are rewritten
        self._pos.copy_(counters[0].view(1, 1))
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream):
            entry.logits = self._step_fn(entry.cache)
        entry.graph = graph
        self.captures += 1
        log.info("captured a decode graph for %d cache positions", entry.cache.layers[0].max_cache_len)
