"""The bf16 exponent code (worker/codec.py) and its Triton decoder (run by Triton's CPU interpreter)."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ksleep.worker import codec

SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-40, 9.2e-41,  # subnormals in bf16
            3.3895e38, -3.3895e38, 1.1755e-38]


def bits(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1).view(torch.int16)


def round_trip(values: torch.Tensor) -> codec.PackedChunk:
    chunk = codec.encode(values)
    assert torch.equal(bits(codec.decode(chunk)), bits(values))  # bit for bit: NaN payloads and -0.0 included
    return chunk


def from_bits(pattern: torch.Tensor) -> torch.Tensor:
    return pattern.to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("count", [1, 511, codec.GROUP, codec.GROUP + 3, 3 * codec.GROUP - 1])
def test_gaussian_weights_round_trip_and_shrink_to_two_thirds(count):
    values = (torch.randn(count, generator=torch.Generator().manual_seed(count)) * 0.02).to(torch.bfloat16)
    chunk = round_trip(values)
    if count in (codec.GROUP, 3 * codec.GROUP - 1):  # (a part-filled last group is padded)
        assert chunk.nbytes / (2 * count) < 0.68


def test_every_16_bit_pattern_and_the_special_values_round_trip():
    every = from_bits(torch.arange(-(1 << 15), 1 << 15))  # uniform exponents: no gain, still exact
    round_trip(every)
    specials = torch.tensor(SPECIALS, dtype=torch.float32).to(torch.bfloat16)
    round_trip(specials.repeat(1000))
    assert torch.isnan(codec.decode(codec.encode(specials))).sum() == 1


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, float("nan"), float("-inf")])
def test_a_single_exponent_gets_a_one_bit_code(value):
    chunk = round_trip(torch.full((codec.GROUP,), value, dtype=torch.bfloat16))
    assert int(chunk.lengths.max()) == 1 and chunk.words.numel() * 4 <= codec.GROUP // 8 + 16


def test_a_skewed_histogram_is_length_limited_and_still_exact():
    # exponents with counts 2**k: plain Huffman would give codes up to 255 bits long
    exponent = torch.cat([torch.full((1 << min(k, 20),), k, dtype=torch.int64) for k in range(24)])
    values = codec.join(exponent, torch.randint(0, 256, exponent.shape, dtype=torch.uint8))
    chunk = round_trip(values)
    assert int(chunk.lengths.max()) <= codec.MAX_CODE_BITS


def test_real_weights_of_the_embedded_model_round_trip(open_engine):
    engine = open_engine("smollm2-135m", pool_format="raw")
    views = engine.arena.views()
    total = coded = 0
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        values = views[name].reshape(-1)[: 4 * codec.GROUP]  # (a slice: the CPU codec is slow)
        chunk = round_trip(values)
        total, coded = total + 2 * values.numel(), coded + chunk.nbytes
    assert coded / total < 0.72, coded / total


def test_a_damaged_stream_decodes_wrong_values_but_never_out_of_bounds():
    values = (torch.randn(codec.GROUP) * 0.02).to(torch.bfloat16)
    chunk = codec.encode(values)
    chunk.lane_bits[5] = 0x7FFFFFF0  # a lane that starts far past the stream
    chunk.words[:10] = -1
    assert not torch.equal(bits(codec.decode(chunk)), bits(values))


def test_non_bf16_input_is_refused():
    with pytest.raises(TypeError, match="bfloat16"):
        codec.encode(torch.zeros(8))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_kernel_decodes_bit_for_bit_in_the_interpreter():
    script = textwrap.dedent("""
        import torch
        from ksleep.worker import codec, codec_triton
        torch.manual_seed(1)
        cases = [(torch.randn(codec.GROUP + 999) * 0.02).to(torch.bfloat16),
                 torch.arange(-(1 << 15), 1 << 15).to(torch.int16).view(torch.bfloat16)[:codec.GROUP]]
        for values in cases:
            chunk = codec.encode(values)
            out = torch.empty(values.numel(), dtype=torch.int16)
            codec_triton.decode_into(out, chunk.words, chunk.lane_bits, codec.decode_table(chunk.lengths),
                                     chunk.sign_mantissa)
            assert torch.equal(out, values.view(torch.int16))
        damaged = codec.encode(cases[0])
        damaged.lane_bits[3] = 0x7FFFFFF0
        out = torch.empty(cases[0].numel(), dtype=torch.int16)
        codec_triton.decode_into(out, damaged.words, damaged.lane_bits, codec.decode_table(damaged.lengths),
                                 damaged.sign_mantissa)
        assert not torch.equal(out, cases[0].view(torch.int16))
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_chunk_coded_in_several_slices_is_the_same_chunk(monkeypatch):
    values = (torch.randn(5 * codec.GROUP - 7, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    whole = codec.encode(values)
    monkeypatch.setattr(codec, "ENCODE_SLICE", 2 * codec.GROUP)  # three slices, the last one short
    sliced = round_trip(values)
    assert torch.equal(sliced.words, whole.words) and torch.equal(sliced.lane_bits, whole.lane_bits)
