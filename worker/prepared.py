"""Everything about a model that can be built before the device is touched.

A forkserver builds it once (imports, tokenizer, meta skeleton, layout: ~1 s for a 7B) and every worker it
forks inherits it copy-on-write, so a restarted worker starts at the pool instead of at the config file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WorkerConfig
from .layout import ArenaLayout
from .skeleton import ModelSkeleton
from .source import resolve_source


@dataclass(slots=True)
class PreparedModel:
    source: object
    skeleton: ModelSkeleton
    layout: ArenaLayout
    tokenizer: object

    @classmethod
    def build(cls, config: WorkerConfig, device_type: str) -> PreparedModel:
        """`device_type` ("cpu" or "cuda") only decides the identity of synthetic weights; CUDA is not touched."""
        source = resolve_source(config.model, config, torch.device(device_type))
        skeleton = ModelSkeleton.build(source.config(), config.torch_dtype, config.trust_remote_code)
        if config.keep_layers > skeleton.num_layers:
            raise ValueError(f"keep_layers={config.keep_layers} but the model has {skeleton.num_layers} layers")
        layout = ArenaLayout.plan(skeleton.tensors(), skeleton.num_layers)
        return cls(source, skeleton, layout, source.tokenizer())
