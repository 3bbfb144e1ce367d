"""Attention over the batch KV cache: one packed forward serves every sequence of a step.

A step feeds T tokens of S sequences packed into one row (`input_ids` [1, T], each token with its own position).
The model is stock transformers: each attention layer calls `batch_attention` (registered with transformers'
AttentionInterface as ATTENTION_NAME) with the queries, keys and values of those T tokens. It writes the keys and
values into the cache (`StepContext.slots`: a cache position per token) and attends, for each sequence, over the
cache positions it owns (kvcache.py: one contiguous extent per sequence).

Two backends, chosen at load by `probe_backend`:
- "flash": torch's FlashAttention-2 varlen kernel (`aten._flash_attention_forward`) reading the cache in place:
  `cu_seqlens_k` are the extents' starts and `seqused_k` their lengths, so each sequence reads exactly its own
  tokens, no copy is made, and the shapes do not depend on the lengths (a CUDA graph per batch size replays it).
  Causal masking is aligned to the end of each sequence, which is what a chunked prefill needs.
- "gather": SDPA over each sequence's keys and values gathered into a padded batch, with a mask (CPU, and a GPU
  whose torch build lacks the varlen kernel or fails the probe). Correct everywhere, eager only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

log = logging.getLogger(__name__)

ATTENTION_NAME = "ksleep_batch"
STEP_KWARG = "ksleep_step"  # the keyword the runner passes through the model's forward to every attention layer


@dataclass(slots=True)
class StepContext:
    """What one forward's attention layers need, as device tensors (int32 for the kernel, int64 to index).

    slots [T]      cache position each new token's key and value are written to
    cu_q [S+1]     where each sequence's tokens start in the packed row (cumulative query lengths)
    kv_start [S+1] where each sequence's extent starts in the cache (the last entry is never read)
    kv_len [S]     tokens each sequence attends over once this step's are written (its cache length)
    max_q, max_k   host-side bounds of the query and cache lengths
    gather         the padded-batch indices and mask of the "gather" backend (None for "flash")
    """

    cache: object  # kvcache.KVCache
    backend: str
    slots: torch.Tensor
    cu_q: torch.Tensor
    kv_start: torch.Tensor
    kv_len: torch.Tensor
    max_q: int
    max_k: int
    gather: GatherIndex | None = None


@dataclass(slots=True)
class GatherIndex:
    query: torch.Tensor  # [S, Qmax] packed token index of each padded query position
    key: torch.Tensor  # [S, Lmax] cache position of each padded key position (clamped into the extent)
    mask: torch.Tensor  # [S, 1, Qmax, Lmax] True where the query may attend
    unpad: torch.Tensor  # [T] index of each packed token in the flattened [S * Qmax] padded output
    qpos: torch.Tensor  # [S, Qmax] absolute position of each padded query (for sliding windows)

    @classmethod
    def build(cls, q_start: torch.Tensor, q_len: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor,
              max_q: int, max_k: int) -> GatherIndex:
        """From per-sequence int64 vectors on the device."""
        device = q_len.device
        i = torch.arange(max_q, device=device)
        j = torch.arange(max_k, device=device)
        query = q_start[:, None] + torch.minimum(i[None], q_len[:, None] - 1)
        # positions past a sequence's length are masked; pointing them at its own first token keeps the gathered
        # values finite (a masked weight of zero times a NaN from unwritten memory would still be NaN)
        key = kv_start[:, None] + torch.minimum(j[None], kv_len[:, None] - 1)
        qpos = (kv_len - q_len)[:, None] + i[None]
        mask = (j[None, None, :] <= qpos[:, :, None]) & (j[None, :] < kv_len[:, None])[:, None, :]
        valid = i[None] < q_len[:, None]
        unpad = (torch.arange(len(q_len), device=device)[:, None] * max_q + i[None])[valid]
        return cls(query, key, mask[:, None], unpad, qpos)


def batch_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                    **kwargs):
    """transformers' attention interface: query [1, H, T, D], key/value [1, KV, T, D] -> ([1, T, H, D], None)."""
    step: StepContext = kwargs[STEP_KWARG]
    layer = module.layer_idx
    keys, values = step.cache.keys[layer], step.cache.values[layer]
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, heads, D]
    keys.index_copy_(0, step.slots, k)
    values.index_copy_(0, step.slots, v)
    if step.backend == "flash":
        out = torch.ops.aten._flash_attention_forward(
            q, keys, values, step.cu_q, step.kv_start, step.max_q, step.max_k, 0.0, True, False, scale=scaling,
            window_size_left=-1 if sliding_window is None else sliding_window - 1, window_size_right=-1,
            seqused_k=step.kv_len)[0]
    else:
        out = _gather_attention(q, keys, values, step.gather, scaling, sliding_window)
    return out.unsqueeze(0), None


def _gather_attention(q, keys, values, index: GatherIndex, scaling, sliding_window) -> torch.Tensor:
    mask = index.mask
    if sliding_window is not None:  # a key within the last `sliding_window` positions of the query, itself included
        j = torch.arange(mask.shape[-1], device=mask.device)
        mask = mask & (j[None, None, :] > index.qpos[:, :, None] - sliding_window)[:, None]
    qp = q[index.query].transpose(1, 2)  # [S, H, Qmax, D]
    kp = keys[index.key].transpose(1, 2)  # [S, KV, Lmax, D]
    vp = values[index.key].transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scaling,
                                                           enable_gqa=qp.shape[1] != kp.shape[1])
    heads, dim = out.shape[1], out.shape[3]
    return out.transpose(1, 2).reshape(-1, heads, dim)[index.unpad]


def register() -> None:
    """Make ATTENTION_NAME known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, batch_attention)


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                             head_dim: int) -> str | None:
    """None when the varlen flash kernel computes this model's attention on `device` as the gather backend does
    (checked on a small batch of mixed prefill and decode rows), else why not."""
    if device.type != "cuda":
        return "the device is not a GPU"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the flash kernel takes float16 or bfloat16, not {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 8 up to 256"
    try:
        return _compare_backends(device, dtype, heads, kv_heads, head_dim)
    except Exception as exc:  # an op this build lacks, or one that refuses the arguments
        return f"the varlen flash kernel failed its probe: {type(exc).__name__}: {exc}"


def _compare_backends(device, dtype, heads, kv_heads, head_dim) -> str | None:
    from .kvcache import KVCache

    gen = torch.Generator(device=device).manual_seed(0)
    q_len = [1, 5, 1, 3]
    kv_len = [7, 5, 20, 9]  # the second is a whole prompt, the others continue cached sequences
    starts = [16, 48, 96, 160]
    cache = KVCache.standalone(1, kv_heads, head_dim, 256, dtype, device)
    torch.nn.init.normal_(cache.keys[0], generator=gen)
    torch.nn.init.normal_(cache.values[0], generator=gen)
    total = sum(q_len)
    q = torch.randn(1, heads, total, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype, generator=gen)
    slots = torch.tensor([s + n - m + i for s, n, m in zip(starts, kv_len, q_len) for i in range(m)], device=device)
    cu_q = torch.tensor([0, *torch.tensor(q_len).cumsum(0).tolist()], device=device, dtype=torch.int32)
    kv_start = torch.tensor([*starts, 256], device=device, dtype=torch.int32)
    lens = torch.tensor(kv_len, device=device, dtype=torch.int32)
    index = GatherIndex.build(cu_q[:-1].long(), cu_q.diff().long(), kv_start[:-1].long(), lens.long(), max(q_len),
                              max(kv_len))
    module = type("Layer", (), {"layer_idx": 0})()
    outs = {}
    for backend in ("gather", "flash"):
        step = StepContext(cache, backend, slots, cu_q, kv_start, lens, max(q_len), 256, index)
        outs[backend] = batch_attention(module, q, k, v, None, scaling=head_dim**-0.5, **{STEP_KWARG: step})[0]
    error = (outs["flash"].float() - outs["gather"].float()).abs().max().item()
    if not error < 2e-2:
        return f"the varlen flash kernel disagrees with SDPA by {error:.3g}"
    return None
