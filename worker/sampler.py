"""Picking each row's next token: one argmax for the greedy rows, and each sampling row with its own warpers
(temperature, top-k, top-p: transformers' own) and its own seeded generator, so a request draws the same tokens
whichever batch it is in. A row whose sampling fails fails alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from .sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        # pinned, so that the copy back is one asynchronous DMA; two, used in turn, for the two steps in flight
        self._host = [torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)]
        self._turn = 0
        self._no_ids = torch.empty(1, 0, dtype=torch.long, device=device)  # the warpers we use ignore the history

    def sample(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> list[int | BaseException]:
        """The next token of each `rows[j]` of `logits` ([S, vocab]; `seqs[j]` owns that row), on the host."""
        return self.collect(self.launch(logits, rows, seqs))

    def launch(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence], ahead: int = 0) -> Draw | None:
        """Queue the draws and their copy to the host; `collect` waits for them. The draw's `tokens` stay on the
        device, in row order, for a step queued before they reach the host. `ahead`: tokens each sequence has
        drawn that are not in its output yet (a step queued behind the one in flight)."""
        if not rows:
            return None
        picked = logits[rows] if len(rows) != logits.shape[0] else logits
        raw = picked  # the model's own distribution, for logprobs (shaping below works on a copy)
        errors: dict[int, BaseException] = {}
        shaped = [j for j, seq in enumerate(seqs) if seq.params.needs_history]
        if shaped:
            picked = picked.clone()  # (the forward's logits are inference tensors: shaped on a copy)
        for j in shaped:
            try:
                self._shape(picked, j, seqs[j], ahead)
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                errors[j] = exc
        tokens = picked.argmax(dim=-1)
        for j, seq in enumerate(seqs):
            if seq.warpers is None:
                continue
            try:
                scores = seq.warpers(self._no_ids, picked[j: j + 1].float())
                probs = torch.softmax(scores, dim=-1)
                tokens[j] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
            except Exception as exc:  # noqa: BLE001 - e.g. logits that are not finite: this request alone fails
                errors[j] = exc
        logprobs = self._logprobs(raw, tokens, seqs)
        if not self._cuda:
            return Draw(tokens, tokens, None, errors, logprobs)
        n = tokens.numel()
        turn, self._turn = self._turn, self._turn ^ 1
        if self._host[turn].numel() < n:
            self._host[turn] = torch.empty(max(n, 256), dtype=torch.long, pin_memory=True)
        host = self._host[turn][:n]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Draw(tokens, host, ready, errors, logprobs)

    def _shape(self, picked: torch.Tensor, j: int, seq: Sequence, ahead: int) -> None:
        """vLLM's min_tokens (EOS and stop_token_ids masked until that many tokens are out) and repetition penalty
        (CTRL's, over the prompt and the output: transformers' processor), on row j, in place. Sequences that need
        a penalty are never queued ahead (scheduler.follow), so their output here is complete; a min_tokens mask is
        needed ahead only once it has ended (`ahead` counts the token in flight)."""
        params, vocab = seq.params, picked.shape[-1]
        row = picked[j: j + 1]
        if params.repetition_penalty != 1.0:
            history = torch.tensor([seq.prompt + seq.output], dtype=torch.long, device=picked.device)
            row.copy_(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))(history, row.float()))
        if len(seq.output) + ahead < params.min_tokens:
            banned = [t for t in (*(() if params.ignore_eos else seq.writer.eos_ids), *params.stop_token_ids) if t < vocab]
            if banned:
                row[0, banned] = float("-inf")

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]):
        """(rows, chosen, top values, top ids) on the device for the rows that asked for logprobs, else None."""
        rows = [j for j, seq in enumerate(seqs) if seq.params.logprobs is not None]
        if not rows:
            return None
        index = torch.tensor(rows, device=raw.device)
        lp = torch.log_softmax(raw.index_select(0, index).float(), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1)
        k = max(seqs[j].params.logprobs for j in rows)
        top = lp.topk(k, dim=-1) if k else None
        return rows, chosen, top

    @staticmethod
    def logprobs(drawn: Draw | None) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """After `collect`: sampled index -> (the drawn token's log-probability, [(id, log-probability)] of the
        most likely tokens, as many as its request asked for)."""
        if drawn is None or drawn.logprobs is None:
            return {}
        rows, chosen, top = drawn.logprobs
        values, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([[]] * len(rows), [[]] * len(rows))
        return {j: (c, list(zip(i, v))) for j, c, i, v in zip(rows, chosen.tolist(), ids, values)}

    def collect(self, drawn: Draw | None) -> list[int | BaseException]:
        if drawn is None:
            return []
        if drawn.ready is not None:
            drawn.ready.synchronize()  # releases the GIL while the step finishes: the gRPC thread keeps serving
        return [drawn.errors.get(j, value) for j, value in enumerate(drawn.host.tolist())]


@dataclass(slots=True)
class Draw:
    tokens: torch.Tensor  # on the device, one per sampled row
    host: torch.Tensor  # their copy on the host (valid once `ready`)
    ready: torch.cuda.Event | None
    errors: dict[int, BaseException]
    logprobs: tuple | None = None  # (rows, chosen, topk) on the device, for the rows that asked
