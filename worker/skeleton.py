"""The model without its weights: parameters on the meta device, re-pointed at arena views on demand."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from .errors import UnsupportedModelError

# Decoder-only families whose blocks live in `model.layers` and whose checkpoint names match the modules.
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")


class ModelSkeleton:
    """A transformers model whose tensors are swapped between arena views and meta placeholders.

    Every module attribute that holds a tensor is an *owner*; a weight shared by two modules (tied embeddings)
    has two owners and one canonical name, so it is laid out once and bound once.
    """

    def __init__(self, model: nn.Module, config: PretrainedConfig):
        self.model = model
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self._owners: dict[str, list[tuple[nn.Module, str]]] = {}
        self._kinds: dict[str, str] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._placeholders: dict[str, torch.Tensor] | None = None
        canonical: dict[int, str] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                for attr, tensor in table.items():
                    if tensor is None:
                        continue
                    name = canonical.setdefault(id(tensor), f"{prefix}.{attr}" if prefix else attr)
                    self._owners.setdefault(name, []).append((module, attr))
                    self._kinds[name] = kind
                    self._initial.setdefault(name, tensor)

    @classmethod
    def build(cls, config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> ModelSkeleton:
        arch = (getattr(config, "architectures", None) or ["<none>"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # Parameters on meta (no memory), buffers real: rotary tables are computed here, not in checkpoints.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.tie_weights()  # not done under init_empty_weights; tied modules must share one Parameter
        model.eval().requires_grad_(False)
        return cls(model, config)

    def tensors(self) -> list[tuple[str, str, torch.Tensor]]:
        """(canonical name, kind, initial tensor) in registration order; parameters are on meta."""
        return [(name, self._kinds[name], self._initial[name]) for name in self._owners]

    def buffer_values(self) -> dict[str, torch.Tensor]:
        """The buffers as the model computed them at construction (they go into the mirror)."""
        return {n: t for n, t in self._initial.items() if self._kinds[n] == "buffer"}

    def bind(self, views: Mapping[str, torch.Tensor]) -> None:
        """Point every owner at its view; a missing name is a programming error, so it raises KeyError."""
        self._assign({n: nn.Parameter(views[n], requires_grad=False) if self._kinds[n] == "param" else views[n]
                      for n in self._owners})

    def unbind(self) -> None:
        """Point every owner at a meta tensor: a forward on a sleeping model fails instead of reading freed memory."""
        if self._placeholders is None:  # made once: sleep is on the hot path
            self._placeholders = {n: nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
                                  if self._kinds[n] == "param" else torch.empty_like(t, device="meta")
                                  for n, t in self._initial.items()}
        self._assign(self._placeholders)

    def _assign(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, owners in self._owners.items():
            for module, attr in owners:
                table = module._parameters if self._kinds[name] == "param" else module._buffers
                table[attr] = values[name]

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device
