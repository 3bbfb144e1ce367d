"""The reference approach that ksleep is compared with: an ordinary transformers model put to sleep with
`model.to("cpu")` and woken with `model.to(device)` (what the reference implementation and most scripts do).
"""
from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from .engine import Engine
from .generation import SamplingParams, stream_tokens


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
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(engine.skeleton.config, dtype=engine.config.torch_dtype)
        model.load_state_dict(state, assign=True, strict=False)
        model.tie_weights()
        for name, buf in engine.skeleton.buffer_values().items():
            owner, attr = name.rsplit(".", 1)
            model.get_submodule(owner)._buffers[attr] = buf.to(self.device)
        self.model = model.eval()

    def generate(self, prompt: str, tokens: int) -> list[int]:
        cache = DynamicCache(config=self.model.config)

        def forward(ids, prefill):
            with torch.inference_mode():
                return self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]

        events = stream_tokens(forward, self.tokenizer, self.encode(prompt, tokens), SamplingParams(max_tokens=tokens),
                               self.eos_ids, self.device, time.perf_counter())
        return [e.token_id for e in events]

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
