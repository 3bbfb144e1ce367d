"""The reference approach that ksleep is compared with: an ordinary transformers model put to sleep with
`model.to("cpu")` and woken with `model.to(device)` (what the reference implementation and most scripts do).
"""
from __future__ import annotations

import copy
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from .engine import Engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _used(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


class ReferenceModel:
    """A plain transformers model with the engine's weights (copied: the engine can then be closed)."""

    def __init__(self, engine: Engine):
        self.device = engine.device
        self.tokenizer, self.eos_ids, self.encode = engine.tokenizer, engine.eos_ids, engine.encode
        state = {k: v.clone() for k, v in engine.model.state_dict().items()}
        config = copy.deepcopy(engine.skeleton.config)  # the engine's own attends through its batch KV cache
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=engine.config.torch_dtype)
        model.load_state_dict(state, assign=True, strict=False)
        model.tie_weights()
        for name, buf in engine.skeleton.buffer_values().items():
            owner, attr = name.rsplit(".", 1)
            model.get_submodule(owner)._buffers[attr] = buf.to(self.device)
        self.model = model.eval()

    @torch.inference_mode()
    def generate(self, prompt: str, tokens: int) -> list[int]:
        """Greedy ids, one forward per token over a DynamicCache, stopping at EOS like the engine."""
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([self.encode(prompt, tokens)], device=self.device)
        out: list[int] = []
        while len(out) < tokens:
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in self.eos_ids:
                break
            ids = torch.tensor([[out[-1]]], device=self.device)
        return out

    def measure(self, prompt: str, tokens: int, baseline: list[int]) -> dict:
        """Sleep (.to('cpu')), then wake (.to(device)) + first token, like a user of the reference would."""
        device = self.device
        self.generate(prompt, 1)  # warm
        awake = _used(device)
        t = time.perf_counter()
        self.model.to("cpu")
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        sleep_s = time.perf_counter() - t
        asleep = _used(device)
        t = time.perf_counter()
        self.model.to(device)
        self.generate(prompt, 1)
        _sync(device)
        ttft = time.perf_counter() - t
        identical = self.generate(prompt, tokens) == baseline
        return {"sleep_s": sleep_s, "ttft_after_sleep_s": ttft, "device_used_awake": awake,
                "device_used_asleep": asleep, "output_identical": identical}

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
