"""The model runner: one packed forward per step, replayed from a CUDA graph whenever its shape has one.

A `Batch` is what the scheduler hands over: T tokens of S sequences, each token with its position and the cache
position its key and value go to; the logits come back for each sequence's last token. Everything in the model is
per token except attention, which reads its per-sequence boundaries from device tensors (attention.py), so a
forward's kernels depend only on T and S: the runner keeps one CUDA graph per (T bucket, S bucket), captured on
first use into one memory pool, over static input buffers, the arena's weights and the KV cache. With stable
addresses (CUDA VMM) the graphs stay valid across sleeps; otherwise they are dropped at each sleep.

Padding: in a decode step (one token per sequence) each padding row is a one-token sequence at the cache's pad
position; in a step with prompt tokens, the padding tokens form one extra sequence, also written at the pad
position, and padding sequences feed no token at all. Padding rows only ever write the pad positions and their
outputs are dropped. A step the engine asks to run eagerly (behind a wake's copy: see engine.py) launches the
kernels of the graph it would replay, over the same padded inputs. Steps larger than the largest bucket and the
"gather" attention backend run eagerly over unpadded inputs.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass

import numpy as np
import torch

from .attention import STEP_KWARG, GatherIndex, StepContext
from .kvcache import KVCache

log = logging.getLogger(__name__)

# Bucket sizes (tokens per step, sequences per step): a step runs in the graph of the smallest that holds it.
# Powers of two: up to a few hundred tokens a step costs about one read of the weights whatever its size, so
# padding is nearly free, and few buckets mean few captures.
SIZES = tuple(1 << i for i in range(13))


@dataclass(slots=True)
class Batch:
    """One forward: T packed tokens of S sequences (sequence s feeds q_lens[s] consecutive tokens)."""

    tokens: list[int]  # [T]
    positions: list[int]  # [T] position of each token in its sequence
    slots: list[int]  # [T] cache position its key and value are written to
    q_lens: list[int]  # [S]
    kv_starts: list[int]  # [S] start of each sequence's extent
    kv_lens: list[int]  # [S] its cache length once this step's tokens are in


def sizes_up_to(limit: int) -> tuple[int, ...]:
    return tuple(s for s in SIZES if s < limit) + (limit,)


class ModelRunner:
    def __init__(self, model, cache: KVCache, device: torch.device, backend: str, graphs: bool, max_batch: int,
                 max_graph_tokens: int):
        self.model, self.cache, self.device, self.backend = model, cache, device, backend
        self.graphs_enabled = graphs and device.type == "cuda" and backend == "flash"
        self.seq_sizes = sizes_up_to(max_batch + 1)  # + 1: a full batch plus a padding sequence
        self.token_sizes = sizes_up_to(max(max_graph_tokens, max_batch + 1))
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}  # (tokens, sequences, decode)
        self._uncapturable: set[tuple[int, int, bool]] = set()  # shapes whose capture failed: they run eagerly
        self._pool = None
        self._static: _StaticInputs | None = None
        self.captures = 0  # graphs captured so far (stays put across sleeps with stable addresses)
        self.replays = 0
        self.fusion = None  # fusion.Fusion: the decoder pieces run as compiled kernels (set by the loader)

    @property
    def fused(self) -> list[str]:
        return self.fusion.applied if self.fusion is not None else []

    @torch.inference_mode()
    def forward(self, batch: Batch, eager: bool = False, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, vocab] of each sequence's last token this step. A graph's output is its buffer: read it
        before the next forward. `eager` launches the kernels one by one (a step behind a wake's copy, whose
        layers wait for their weights), but over the inputs of the graph the step would replay, padding included:
        the same kernels on the same shapes, hence the same numbers, whether the model slept or not. `ids` ([T] on
        the device) replaces `batch.tokens`: a step queued before the tokens it feeds reached the host."""
        shape = self._graph_shape(batch) if self.graphs_enabled else None
        if shape is None or shape in self._uncapturable:
            return self._eager(batch, ids)
        if eager:
            return self._padded(batch, *shape, ids)
        return self._replay(batch, *shape, ids)

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, step: StepContext, rows: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model.model(input_ids=ids, position_ids=positions, use_cache=False,
                                  **{STEP_KWARG: step}).last_hidden_state[0]
        weight = self.model.lm_head.weight  # (the head of every supported family is a plain projection)
        return torch.matmul(hidden[rows], weight.t(), out=out)

    def _eager(self, batch: Batch, ids: torch.Tensor | None) -> torch.Tensor:
        device = self.device
        longs = torch.tensor([batch.tokens, batch.positions, batch.slots], dtype=torch.long).to(device, non_blocking=True)
        if ids is not None:
            longs[0].copy_(ids)
        q_lens = torch.tensor(batch.q_lens, dtype=torch.int32)
        cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        torch.cumsum(q_lens, 0, out=cu_q[1:])
        ints = torch.stack([cu_q, torch.tensor([*batch.kv_starts, self.cache.tokens], dtype=torch.int32),
                            torch.tensor([*batch.kv_lens, 0], dtype=torch.int32)]).to(device, non_blocking=True)
        max_q, max_k = max(batch.q_lens), max(batch.kv_lens)
        gather = None
        if self.backend == "gather":
            gather = GatherIndex.build(ints[0, :-1].long(), ints[0].diff().long(), ints[1, :-1].long(),
                                       ints[2, :-1].long(), max_q, max_k)
        step = StepContext(self.cache, self.backend, longs[2], ints[0], ints[1], ints[2, :-1], max_q, max_k, gather)
        return self._logits(longs[0].view(1, -1), longs[1].view(1, -1), step, ints[0, 1:].long() - 1)

    # -- graphs -----------------------------------------------------------------------------------------------
    def _graph_shape(self, batch: Batch) -> tuple[int, int, bool] | None:
        """(token bucket, sequence bucket, decode) of the graph that runs `batch`, None when none would."""
        t, s = len(batch.tokens), len(batch.q_lens)
        if t == s:  # decode: every sequence feeds one token; padding rows are one-token sequences
            size = _fit(self.seq_sizes, s)
            return (size, size, True) if size else None
        tokens = _fit(self.token_sizes, t)
        seqs = tokens and _fit(self.seq_sizes, s + (tokens > t))  # room for the sequence of padding tokens
        return (tokens, seqs, False) if seqs else None

    def _replay(self, batch: Batch, tokens: int, seqs: int, decode: bool, ids: torch.Tensor | None) -> torch.Tensor:
        static = self._static or self._make_static()
        graph = self._graphs.get((tokens, seqs, decode))
        if graph is None:
            try:
                graph = self._capture(tokens, seqs, decode)
            except Exception:  # noqa: BLE001 - e.g. no device memory for the graph: this shape runs eagerly
                log.exception("capturing the graph of %d tokens in %d sequences failed; that shape runs eagerly",
                              tokens, seqs)
                self._uncapturable.add((tokens, seqs, decode))
                return self._eager(batch, ids)
        static.fill(batch, tokens, seqs, decode, ids)
        graph.replay()
        self.replays += 1
        return static.logits[: len(batch.q_lens)]

    def _padded(self, batch: Batch, tokens: int, seqs: int, decode: bool, ids: torch.Tensor | None) -> torch.Tensor:
        """What the graph of (tokens, seqs, decode) runs, launched eagerly over the same static inputs."""
        static = self._static or self._make_static()
        static.fill(batch, tokens, seqs, decode, ids)
        self._static_forward(tokens, seqs, decode)
        return static.logits[: len(batch.q_lens)]

    def _static_forward(self, tokens: int, seqs: int, decode: bool) -> None:
        """The kernels of the graph of (tokens, seqs, decode), over the static inputs: what a capture records and
        what a padded eager step launches."""
        static = self._static
        static.convert(tokens, seqs)
        self._logits(*static.graph_args(self.cache, tokens, seqs, decode), out=static.logits[:seqs])

    def _make_static(self) -> _StaticInputs:
        self._static = _StaticInputs(self.token_sizes[-1], self.seq_sizes[-1], self.device,
                                     int(self.model.lm_head.weight.shape[0]), self.model.lm_head.weight.dtype,
                                     self.cache.tokens)
        # made once and distinct: a warm-up on the capture stream would allocate that stream's cuBLAS workspace
        # outside the graphs' pool, where a sleep's workspace clean-up would free it under the graphs
        self._warm_stream = torch.cuda.Stream(self.device)
        self._capture_stream = torch.cuda.Stream(self.device)
        return self._static

    def _capture(self, tokens: int, seqs: int, decode: bool) -> torch.cuda.CUDAGraph:
        static = self._static
        static.pad_all(tokens, seqs)  # the warm-up and the capture only ever write the cache's pad position
        current = torch.cuda.current_stream(self.device)
        self._warm_stream.wait_stream(current)
        with torch.cuda.stream(self._warm_stream):  # lazy initialisation must not happen inside the capture
            self._static_forward(tokens, seqs, decode)
        current.wait_stream(self._warm_stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._capture_stream.wait_stream(current)
        with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream, capture_error_mode="thread_local"):
            self._static_forward(tokens, seqs, decode)
        current.wait_stream(self._capture_stream)
        self._graphs[(tokens, seqs, decode)] = graph
        self.captures += 1
        log.info("captured the graph of %d tokens in %d sequences", tokens, seqs)
        return graph

    def forget_graphs(self) -> None:
        """Drop every graph (the weights or the cache are about to move: an arena without stable addresses)."""
        self._graphs.clear()
        self._pool = None

    @property
    def graph_shapes(self) -> list[tuple[int, int, bool]]:
        return sorted(self._graphs)


def _fit(sizes: tuple[int, ...], n: int) -> int:
    return next((s for s in sizes if s >= n), 0)


class _StaticInputs:
    """The fixed device buffers every graph reads (and the pinned host buffers they are filled from): per token
    [id, position, slot] and per sequence [cumulative query length, extent start, cache length, logits row]."""

    def __init__(self, max_tokens: int, max_seqs: int, device: torch.device, vocab: int, dtype: torch.dtype,
                 cache_tokens: int):
        self.cache_tokens = cache_tokens
        # two sets of pinned buffers, used in turn: a step may be filled while the copy of the one before it is
        # still queued behind the step in flight (each set is rewritten only once its own copy has run)
        self.pinned = [(torch.zeros(3, max_tokens, dtype=torch.long, pin_memory=True),
                        torch.zeros(4, max_seqs + 1, dtype=torch.long, pin_memory=True)) for _ in range(2)]
        self.copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        self.tokens = torch.zeros(3, max_tokens, dtype=torch.long, device=device)
        self.seqs = torch.zeros(4, max_seqs + 1, dtype=torch.long, device=device)
        self.ints = torch.zeros(3, max_seqs + 1, dtype=torch.int32, device=device)  # what the kernel reads
        self.logits = torch.empty(max_seqs, vocab, dtype=dtype, device=device)

    def fill(self, batch: Batch, tokens: int, seqs: int, decode: bool, ids: torch.Tensor | None = None) -> None:
        turn, self._turn = self._turn, self._turn ^ 1
        self.copied[turn].synchronize()  # (long done: it was queued two steps ago)
        pinned_tokens, pinned_seqs = self.pinned[turn]
        ht, hs = pinned_tokens.numpy(), pinned_seqs.numpy()
        t, s = len(batch.tokens), len(batch.q_lens)
        ht[0, :t], ht[1, :t], ht[2, :t] = batch.tokens, batch.positions, batch.slots
        ht[:, t:tokens] = 0  # padding tokens: id 0 at position 0, written to the pad position
        cu = np.cumsum(batch.q_lens)
        hs[0, 0] = 0
        hs[0, 1: s + 1] = cu
        hs[1, :s], hs[2, :s] = batch.kv_starts, batch.kv_lens
        hs[3, :s] = cu - 1
        if decode:  # padding rows: one token each, attending over the pad position alone
            hs[0, s + 1: seqs + 1] = np.arange(s + 1, seqs + 1)
            hs[1, s:seqs], hs[2, s:seqs], hs[3, s:seqs] = 0, 1, np.arange(s, seqs)
        else:  # one sequence of all padding tokens, then sequences that feed nothing
            hs[0, s + 1: seqs + 1] = tokens
            hs[1, s:seqs], hs[2, s:seqs], hs[3, s:seqs] = 0, 1, tokens - 1
            if tokens > t:  # (never longer than the cache it reads from position 0 on)
                hs[2, s] = min(tokens - t, self.cache_tokens)
        self.tokens[:, :tokens].copy_(pinned_tokens[:, :tokens], non_blocking=True)
        self.seqs[:, : seqs + 1].copy_(pinned_seqs[:, : seqs + 1], non_blocking=True)
        self.copied[turn].record()
        if ids is not None:
            self.tokens[0, :t].copy_(ids)  # queued after the copy above: these win

    def pad_all(self, tokens: int, seqs: int) -> None:
        self.tokens[:, :tokens] = 0
        self.seqs[0, : seqs + 1] = torch.arange(seqs + 1, device=self.seqs.device).clamp(max=tokens)
        self.seqs[1, :seqs], self.seqs[2, :seqs] = 0, 1
        self.seqs[3, :seqs] = torch.arange(seqs, device=self.seqs.device).clamp(max=tokens - 1)

    def convert(self, tokens: int, seqs: int) -> None:
        """The int32 copies of the per-sequence tensors (captured: part of each graph)."""
        self.ints[:, : seqs + 1].copy_(self.seqs[:3, : seqs + 1])

    def graph_args(self, cache: KVCache, tokens: int, seqs: int, decode: bool):
        step = StepContext(cache, "flash", self.tokens[2, :tokens], self.ints[0, : seqs + 1],
                           self.ints[1, : seqs + 1], self.ints[2, :seqs], 1 if decode else tokens, cache.tokens)
        return self.tokens[0, :tokens].view(1, -1), self.tokens[1, :tokens].view(1, -1), step, self.seqs[3, :seqs]
