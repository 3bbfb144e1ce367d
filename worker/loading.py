"""Bringing an engine up, on its own thread: the device, the prepared model, the KV cache's size, the arena, the
attention backend, the runner, the scheduler, then the weights themselves and one warm-up forward."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import attention, fusion
from .config import WorkerConfig
from .arena import DeviceArena
from .kvcache import PAD_TOKENS, CacheSize, KVCache, bytes_per_token, head_dim, kv_heads
from .prepared import PreparedModel
from .prompt import PromptEncoder
from .reports import LoadReport, Phases
from .runner import Batch, ModelRunner
from .sampler import Sampler
from .scheduler import IDLE_STEP_TOKENS, Scheduler
from .weights import WeightState, WeightStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineParts:
    device: torch.device
    skeleton: object
    layout: object
    tokenizer: object
    context_tokens: int
    encode: object  # PromptEncoder.encode
    eos_ids: frozenset
    kv_cache: KVCache
    weights: WeightStore
    attention: str  # "flash" or "gather"
    runner: ModelRunner
    scheduler: Scheduler
    sampler: Sampler
    load_report: LoadReport


def load_parts(config: WorkerConfig, prepared: PreparedModel | None, awake: bool) -> EngineParts:
    phases = Phases(torch.device("cpu"))
    device = config.resolve_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # create the CUDA context now, so that it is timed as such
        phases.device = device
    phases.mark("device_init")
    prepared = prepared or PreparedModel.build(config, device.type)
    skeleton, layout, tokenizer = prepared.skeleton, prepared.layout, prepared.tokenizer
    model_config = skeleton.config
    attention.register()
    model_config._attn_implementation = attention.ATTENTION_NAME
    context_tokens = int(getattr(model_config, "max_position_embeddings", 0) or 2**31)
    encode = PromptEncoder(tokenizer, int(model_config.vocab_size), context_tokens, config.model).encode
    eos = [model_config.eos_token_id, tokenizer.eos_token_id]
    eos_ids = frozenset(i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e]) if i is not None)
    dtype = config.torch_dtype
    per_token = bytes_per_token(model_config, dtype)
    tokens = CacheSize.parse(config.kv_cache).tokens(per_token, device, layout.total_bytes, config.max_batch)
    kv_cache = KVCache.for_model(model_config, dtype, tokens)
    graph_tokens = max(config.prefill_chunk, config.max_batch + 32)  # the largest step a graph runs
    # mapped at every wake: the pad positions, and what the padding sequence of a graph's step may read (from 0)
    head = max(graph_tokens, PAD_TOKENS) * kv_cache.position_bytes
    arena = DeviceArena(layout, device, config.keep_layers, config.vmm, kv_cache.nbytes, head)
    kv_cache.backing = arena.map_scratch
    weights = WeightStore(config, device, prepared.source, skeleton, layout, arena, phases)
    reason = attention.flash_unavailable_reason(device, dtype, int(model_config.num_attention_heads),
                                                kv_heads(model_config), head_dim(model_config))
    backend = "flash" if reason is None else "gather"
    if reason is not None and device.type == "cuda":
        log.warning("attention falls back to padded SDPA, steps run eagerly: %s", reason)
    if config.cuda_graphs == "on" and reason is not None:
        raise ValueError(f"cuda_graphs=on, but CUDA graphs do not apply here: {reason}")
    runner = ModelRunner(skeleton.model, kv_cache, device, backend, config.cuda_graphs != "off", config.max_batch,
                         graph_tokens)
    if fusion.wanted(config.fused_kernels, device):
        runner.fusion = fusion.Fusion(skeleton.model)  # compiled by the warm-up (or the first step after a wake)
    scheduler = Scheduler(kv_cache, config.max_batch, config.max_queue, config.prefill_chunk)
    phases.mark("prepare")
    try:
        how = weights.bring_up(awake)
        if weights.state is WeightState.AWAKE:
            kv_cache.bind(arena.scratch())
            if device.type == "cuda" or runner.fusion is not None:  # behind the copy still in flight
                warm_up(runner, config.fused_kernels)
            if weights.settle():  # the attached pool failed its checksum behind the warm-up
                how = "rebuilt"
        phases.mark("copy_verify_warm_up" if device.type == "cuda" else "copy_verify")
    except BaseException:
        weights.close()
        if runner.fusion is not None:
            runner.fusion.revert()
        raise
    if device.type == "cuda":
        torch.cuda.empty_cache()  # loading's scratch (synthetic draws, checksums) must not count as "awake"
    pool = weights.pool
    report = LoadReport(phases.total, how, weights.pool_name, layout.weight_bytes, layout.total_bytes,
                        arena.stable_addresses, pool is not None and pool.pinned, phases.seconds)
    log.info("loaded %s: %s; KV cache %d positions (%.2f GB), attention %s, graphs %s, fused %s", config.model, report,
             tokens, kv_cache.nbytes / 1e9, backend, runner.graphs_enabled, runner.fused or "none")
    return EngineParts(device, skeleton, layout, tokenizer, context_tokens, encode, eos_ids, kv_cache, weights, backend,
                       runner, scheduler, Sampler(device), report)


def warm_up(runner: ModelRunner, fused_kernels: str = "off") -> None:
    """Forwards before serving: a fresh process loads its kernels and creates its cuBLAS handle on its first
    forward (~1 s for a 7B), compiles its fused kernels (one-token and longer steps compile apart), and loads
    the matrix kernels of each step size a graph runs and of larger prefills (the first 8 requests prefilled
    together behind a wake were ~40 ms late without): better here than in a user's time to first token. Nothing
    holds the cache yet: they write only positions below the graphs' largest step, which every wake maps. Fused
    kernels that fail to compile give way to transformers' modules, unless they were required (`on`)."""
    first = [Batch([0, 0], [0, 1], [0, 1], [2], [0], [2]), Batch([0], [0], [0], [1], [0], [1])]
    try:
        for batch in first if runner.fusion is not None else first[:1]:
            runner.forward(batch, eager=True)
    except Exception as exc:  # noqa: BLE001 - a compiler error (no Triton, no C compiler...) is not fatal in auto
        if runner.fusion is None or fused_kernels == "on":
            raise
        log.warning("fused kernels do not compile here (%s: %s); using transformers' modules", type(exc).__name__, exc)
        runner.fusion.revert()
        runner.fusion = None
        runner.forward(first[0], eager=True)
    if runner.graphs_enabled:
        sizes = [Batch([0] * n, list(range(n)), list(range(n)), [n], [0], [n]) for n in runner.token_sizes if n > 2]
        for n in (512, 1024, 2048, 4096, IDLE_STEP_TOKENS):  # 32-token prompts, all at the same positions
            seqs = n // 32
            sizes.append(Batch([0] * n, list(range(32)) * seqs, list(range(32)) * seqs, [32] * seqs, [0] * seqs,
                               [32] * seqs))
        for batch in sizes:
            runner.forward(batch, eager=True)
