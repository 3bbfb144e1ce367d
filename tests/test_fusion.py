"""Fused decoder pieces (worker/fusion.py): the same arithmetic as transformers' modules, replaced and put back
whole, and a compiler that fails gives way to transformers' modules unless fusion was required."""
import pytest
import torch

from ksleep.worker import SamplingParams, fusion
from ksleep.worker.config import WorkerConfig


def _qwen2(layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def test_the_pieces_compute_what_transformers_modules_compute():
    from transformers.models.qwen2 import modeling_qwen2 as m

    torch.manual_seed(1)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    norm = m.Qwen2RMSNorm(32, eps=1e-6)
    norm.weight.data = torch.randn(32, dtype=torch.bfloat16)
    assert torch.equal(fusion._rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for ours, theirs in zip(fusion._rotary(q, k, cos, sin), m.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, theirs)
    gate, up = torch.randn(4, 16), torch.randn(4, 16)
    assert torch.equal(fusion._silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_fusion_replaces_every_piece_and_revert_puts_transformers_back():
    from transformers.models.qwen2 import modeling_qwen2 as m

    model = _qwen2()
    original_rotary = m.apply_rotary_pos_emb
    record = fusion.Fusion(model)
    assert record.applied == ["rms_norm", "rotary", "silu_mul"]
    norms = [mod for mod in model.modules() if type(mod).__name__ == "Qwen2RMSNorm"]
    assert len(norms) == 2 * 2 + 1 and all("forward" in mod.__dict__ for mod in norms)
    assert m.apply_rotary_pos_emb is not original_rotary
    record.revert()
    assert m.apply_rotary_pos_emb is original_rotary and record.applied == []
    assert not any("forward" in mod.__dict__ for mod in model.modules())


def test_a_compiler_that_fails_gives_way_in_auto_and_fails_the_load_when_required(open_engine, monkeypatch):
    def broken(fn, **kw):
        def call(*args, **kwargs):
            raise RuntimeError("no compiler here (injected)")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="injected"):
        open_engine("synthetic:tiny", fused_kernels="on")
    from transformers.models.qwen2 import modeling_qwen2 as m

    assert m.apply_rotary_pos_emb.__module__ == m.__name__  # nothing of the failed load is left patched
    engine = open_engine("synthetic:tiny", fused_kernels="auto")  # on CPU auto does not fuse
    assert engine.runner.fused == [] and engine.complete("hi", SamplingParams(max_tokens=2)).token_ids


def test_fusion_is_wanted_on_gpus_only_unless_required():
    assert fusion.wanted("auto", torch.device("cuda", 0)) and not fusion.wanted("auto", torch.device("cpu"))
    assert fusion.wanted("on", torch.device("cpu")) and not fusion.wanted("off", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="fused_kernels"):
        WorkerConfig(model="synthetic:tiny", fused_kernels="sometimes")
