"""Turning a `--model` name into something that gives a config, a tokenizer and weights.

  /path/to/dir                      a local Hugging Face directory with safetensors
  org/name                          a ModelScope id, downloaded once into model_dir (needs `modelscope`)
  smollm2-135m                      the embedded default (see embedded.py)
  synthetic:<preset>                exact architecture, seeded random weights (see synthetic.py)
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from . import embedded, synthetic
from .checkpoint import SafetensorsCheckpoint
from .config import WorkerConfig
from .errors import ModelNotFoundError

log = logging.getLogger(__name__)

MODELSCOPE_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SYNTHETIC_PREFIX = "synthetic:"


class CheckpointSource:
    """A Hugging Face directory: config.json, tokenizer files and *.safetensors."""

    def __init__(self, name: str, directory: Path, trust_remote_code: bool = False):
        self.name = name
        self.directory = Path(directory)
        self.trust_remote_code = trust_remote_code
        missing = [f for f in ("config.json",) if not (self.directory / f).is_file()]
        if missing or not any(self.directory.glob("*.safetensors")):
            raise ModelNotFoundError(
                f"{self.directory} is not a Hugging Face checkpoint: it needs config.json and *.safetensors files"
            )

    @property
    def identity(self) -> str:
        """Path plus the size and modification time of every file that defines the weights."""
        files = sorted(self.directory.glob("*.safetensors")) + [self.directory / "config.json"]
        fingerprint = hashlib.sha256(
            "".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files).encode()
        ).hexdigest()[:16]
        return f"checkpoint:{self.directory.resolve()}:{fingerprint}"

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.directory, trust_remote_code=self.trust_remote_code)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.directory, trust_remote_code=self.trust_remote_code)

    def write_weights(self, slots, host: torch.Tensor, device: torch.device, threads: int) -> int:
        return SafetensorsCheckpoint(self.directory).read_into(slots, host, threads)


class SyntheticSource:
    """`synthetic:<preset>`: weights drawn on the device, so the identity names the device type."""

    def __init__(self, preset: str, seed: int, device: torch.device):
        try:
            synthetic.preset_spec(preset)
        except KeyError as exc:
            raise ModelNotFoundError(exc.args[0]) from None
        self.name = SYNTHETIC_PREFIX + preset
        self.preset, self.seed, self.device = preset, seed, device

    @property
    def identity(self) -> str:
        return f"synthetic:{self.preset}:seed={self.seed}:drawn-on={self.device.type}"

    def config(self) -> PretrainedConfig:
        return synthetic.build_config(self.preset)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return synthetic.build_tokenizer(self.preset)

    def write_weights(self, slots, host: torch.Tensor, device: torch.device, threads: int) -> int:
        std = float(self.config().initializer_range)
        synthetic.fill_weights(slots, host, device, self.seed, std)
        return sum(s.nbytes for s in slots)


def modelscope_dir(model_id: str, model_dir: Path) -> Path:
    return Path(model_dir) / model_id


def download_modelscope(model_id: str, model_dir: Path) -> Path:
    """Fetch a ModelScope snapshot (weights, config, tokenizer) into model_dir/<org>/<name>."""
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{model_id} looks like a ModelScope id, but modelscope is not installed: pip install 'ksleep[modelscope]'"
        ) from exc
    target = modelscope_dir(model_id, model_dir)
    log.info("downloading %s from ModelScope into %s", model_id, target)
    path = snapshot_download(model_id, local_dir=str(target),
                             allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"])
    return Path(path)


def resolve_source(name: str, config: WorkerConfig, device: torch.device, download=download_modelscope):
    """The source behind a model name; raises ModelNotFoundError naming what was looked for."""
    if name.startswith(SYNTHETIC_PREFIX):
        return SyntheticSource(name[len(SYNTHETIC_PREFIX):], config.seed, device)
    if name in embedded.EMBEDDED_MODELS:
        return CheckpointSource(name, embedded.converted_dir(name, config.cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return CheckpointSource(name, path, config.trust_remote_code)
    if name.startswith(("/", ".", "~")) or path.exists():
        raise ModelNotFoundError(f"model directory {path} does not exist")
    if MODELSCOPE_ID.match(name):
        cached = modelscope_dir(name, config.model_dir)
        if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
            return CheckpointSource(name, cached, config.trust_remote_code)
        return CheckpointSource(name, download(name, config.model_dir), config.trust_remote_code)
    raise ModelNotFoundError(
        f"model {name!r} is not a directory, a ModelScope id (org/name), an embedded model "
        f"({', '.join(embedded.EMBEDDED_MODELS)}) or synthetic:<preset> ({', '.join(sorted(synthetic.PRESETS))})"
    )
