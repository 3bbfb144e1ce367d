import json

import pytest
import torch
from safetensors.torch import save_file

from ksleep.worker import ModelNotFoundError, UnsupportedModelError, WorkerConfig
from ksleep.worker.skeleton import ModelSkeleton
from ksleep.worker.source import CheckpointSource, SyntheticSource, resolve_source

CPU = torch.device("cpu")


def fake_checkpoint(path, architectures=("Qwen2ForCausalLM",)):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": list(architectures)}))
    save_file({"x": torch.zeros(2)}, str(path / "model.safetensors"))
    return path


@pytest.fixture
def config(tmp_path):
    return WorkerConfig(model="x", device="cpu", cache_dir=tmp_path / "cache", model_dir=tmp_path / "ms")


def test_synthetic_names_resolve_and_unknown_presets_are_listed(config):
    assert isinstance(resolve_source("synthetic:tiny", config, CPU), SyntheticSource)
    with pytest.raises(ModelNotFoundError, match="no synthetic preset 'nope'.*deepseek-r1-distill-qwen-7b"):
        resolve_source("synthetic:nope", config, CPU)


def test_unknown_names_say_what_was_looked_for(config):
    with pytest.raises(ModelNotFoundError, match="not a directory, a ModelScope id.*smollm2-135m.*synthetic"):
        resolve_source("no such model", config, CPU)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source("/nonexistent/model/dir", config, CPU)


def test_local_directory_needs_config_and_safetensors(config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="needs config.json and \\*.safetensors"):
        resolve_source(str(tmp_path / "empty"), config, CPU)
    source = resolve_source(str(fake_checkpoint(tmp_path / "m")), config, CPU)
    assert isinstance(source, CheckpointSource) and source.identity.startswith("checkpoint:")


def test_modelscope_id_uses_the_cached_snapshot_without_downloading(config):
    fake_checkpoint(config.model_dir / "deepseek-ai" / "DeepSeek-R1-Distill-Qwen-7B")

    def no_download(*args):
        raise AssertionError("must not download a cached model")

    source = resolve_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", config, CPU, download=no_download)
    assert source.directory == config.model_dir / "deepseek-ai" / "DeepSeek-R1-Distill-Qwen-7B"


def test_modelscope_id_downloads_into_the_model_dir(config):
    calls = []

    def download(model_id, model_dir):
        calls.append((model_id, model_dir))
        return fake_checkpoint(model_dir / model_id)

    source = resolve_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", config, CPU, download=download)
    assert calls == [("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", config.model_dir)]
    assert source.name == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def test_model_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KSLEEP_MODEL_DIR", str(tmp_path / "models"))
    assert WorkerConfig(model="x").model_dir == tmp_path / "models"


def test_missing_modelscope_package_is_a_clear_error(config, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "modelscope":
            raise ImportError("no modelscope")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelNotFoundError, match="pip install 'ksleep\\[modelscope\\]'"):
        resolve_source("org/model", config, CPU)


def test_unsupported_architecture_is_named(config, tmp_path):
    source = resolve_source(str(fake_checkpoint(tmp_path / "gpt2", ["GPT2LMHeadModel"])), config, CPU)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is not supported; supported: Qwen2ForCausalLM"):
        ModelSkeleton.build(source.config(), torch.bfloat16)


@pytest.mark.parametrize("bad", [dict(device="tpu"), dict(dtype="int8"), dict(keep_layers=-1), dict(vmm="maybe"),
                                 dict(model=" "), dict(pool_prefix="a/b")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        WorkerConfig(**{"model": "synthetic:tiny", **bad})
