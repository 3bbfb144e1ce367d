"""`synthetic:<preset>` models: an exact architecture with seeded random weights and a byte-level tokenizer.

They let the project time a 7B-shaped model on hardware that lacks the checkpoint, and give tests a model
of a few kilobytes. Weights are drawn on the target device (a 7B set takes a fraction of a second on a GPU
and minutes on a CPU) and copied once into the host mirror.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# DeepSeek-R1-Distill-Qwen-7B's config.json, minus the weights: 15,231,233,024 bytes in bfloat16.
_DEEPSEEK_7B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    use_sliding_window=False, max_window_layers=28, hidden_act="silu", initializer_range=0.02,
    bos_token_id=151646, eos_token_id=151643,
)
_SPECIAL_7B = {151643: "<｜end▁of▁sentence｜>", 151646: "<｜begin▁of▁sentence｜>"}

PRESETS: dict[str, tuple[dict, dict[int, str]]] = {
    "deepseek-r1-distill-qwen-7b": (_DEEPSEEK_7B, _SPECIAL_7B),
    # A few kilobytes of Qwen2 for tests: 4 layers so that keep_layers has something to keep; a wide init so
    # that greedy output varies from token to token (0.02 makes a tiny model repeat one token).
    "tiny": (
        dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=512, hidden_size=64,
             intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
             use_sliding_window=False, hidden_act="silu", initializer_range=0.3,
             bos_token_id=510, eos_token_id=511),
        {510: "<bos>", 511: "<eos>"},
    ),
    # The same size as Llama with tied embeddings, to exercise a weight shared by two modules.
    "tiny-tied": (
        dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
             hidden_act="silu", initializer_range=0.3, bos_token_id=510, eos_token_id=511),
        {510: "<bos>", 511: "<eos>"},
    ),
}


def preset_spec(preset: str) -> tuple[dict, dict[int, str]]:
    try:
        return PRESETS[preset]
    except KeyError:
        raise KeyError(f"no synthetic preset {preset!r}; presets: {', '.join(sorted(PRESETS))}") from None


def build_config(preset: str) -> PretrainedConfig:
    fields, _ = preset_spec(preset)
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_tokenizer(preset: str) -> PreTrainedTokenizerFast:
    """Ids 0-255 are bytes; every other id decodes to `<id>`; the preset's special tokens keep their ids."""
    fields, special = preset_spec(preset)
    vocab = {ch: byte for byte, ch in bytes_to_unicode().items()}  # GPT-2's printable stand-ins
    for i in range(256, fields["vocab_size"]):
        vocab[special.get(i, f"<{i}>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos = special[fields["bos_token_id"]], special[fields["eos_token_id"]]
    tok.add_special_tokens([bos, eos])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fields["bos_token_id"])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# A plain template so that chat endpoints work on synthetic models too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def fill_weights(slots: Iterable, host: torch.Tensor, device: torch.device, seed: int, std: float) -> None:
    """Draw each parameter on `device` from a generator seeded by (seed, name) and copy it into `host`.

    `slots` are the layout's parameter slots; `host` is the mirror as a uint8 tensor. Seeding per name makes
    the weights independent of layout order; norms start at one, as transformers initialises them.
    """
    gen = torch.Generator(device=device)
    for slot in slots:
        dtype = getattr(torch, slot.dtype)
        target = host[slot.offset : slot.offset + slot.nbytes].view(dtype).view(slot.shape)
        if _is_norm(slot.name):
            target.fill_(1)
            continue
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(slot.name.encode()))
        drawn = torch.empty(slot.shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
        target.copy_(drawn, non_blocking=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
