"""Picking each row's next token: one argmax for the greedy rows, and each sampling row with its own warpers
(temperature, top-k, top-p: transformers' own) and its own seeded generator, so a request draws the same tokens
whichever batch it is in. A row whose sampling fails fails alone."""
from __future__ import annotations

import torch

from .sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._host: torch.Tensor | None = None  # pinned, so the copy back is one asynchronous DMA
        self._ready = torch.cuda.Event() if device.type == "cuda" else None
        self._no_ids = torch.empty(1, 0, dtype=torch.long, device=device)  # the warpers we use ignore the history

    def sample(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> list[int | BaseException]:
        """The next token of each `rows[j]` of `logits` ([S, vocab]; `seqs[j]` owns that row), on the host."""
        return self.collect(self.launch(logits, rows, seqs))

    def launch(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]):
        """Queue the draws and their copy to the host; `collect` waits for them."""
        if not rows:
            return None
        picked = logits[rows] if len(rows) != logits.shape[0] else logits
        tokens = picked.argmax(dim=-1)
        errors: dict[int, BaseException] = {}
        for j, seq in enumerate(seqs):
            if seq.warpers is None:
                continue
            try:
                scores = seq.warpers(self._no_ids, picked[j: j + 1].float())
                probs = torch.softmax(scores, dim=-1)
                tokens[j] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
            except Exception as exc:  # noqa: BLE001 - e.g. logits that are not finite: this request alone fails
                errors[j] = exc
        if self._ready is None:
            return tokens, errors
        n = tokens.numel()
        if self._host is None or self._host.numel() < n:
            self._host = torch.empty(max(n, 256), dtype=torch.long, pin_memory=True)
        self._host[:n].copy_(tokens, non_blocking=True)
        self._ready.record()
        return self._host[:n], errors

    def collect(self, drawn) -> list[int | BaseException]:
        if drawn is None:
            return []
        tokens, errors = drawn
        if self._ready is not None:
            self._ready.synchronize()  # releases the GIL while the step finishes: the gRPC thread keeps serving
        return [errors.get(j, value) for j, value in enumerate(tokens.tolist())]
