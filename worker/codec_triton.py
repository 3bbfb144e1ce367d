"""The GPU decoder of codec.py's chunks, in Triton (shipped with torch's CUDA and ROCm builds alike).

One program decodes one group: its LANES lanes walk their code streams side by side, one code per lane per
iteration, and the LANES values of an iteration are consecutive in the output, so every store is coalesced and
nothing is staged in shared memory. Each lane reads the 64 bits from its position (two 32-bit words, cached in L1:
a word serves ~10 codes) and looks the next MAX_CODE_BITS up in the chunk's decode table (16 KiB, cached too).

A damaged chunk never reads out of bounds: word indexes are clamped to the stream. Its values are then wrong,
which the arena's checksums of the decoded bytes catch (fill.py).

`TRITON_INTERPRET=1` runs the same kernel on CPU tensors (slowly): that is how CI tests it.
"""
from __future__ import annotations

import logging
import os

import torch

from .codec import GROUP as GROUP_VALUES
from .codec import LANE_SYMBOLS, LANES, MAX_CODE_BITS

log = logging.getLogger(__name__)
_WARPS = max(1, LANES // (64 if torch.version.hip else 32))  # one thread per lane (AMD wavefronts are 64 wide)

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the compressed pool decodes with codec.decode (or stays raw)
    triton = None


def available(device: torch.device) -> bool:
    """Whether decode() can run on `device`: Triton on a GPU, or its interpreter on CPU tensors."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # count and n_words vary from chunk to chunk: not specialized on, so that one compiled kernel (warmed up by
    # the self-test) serves every chunk
    @triton.jit(do_not_specialize=["n_words", "count"])
    def _decode_kernel(words, n_words, lane_bits, table, sign_mantissa, out, count,
                       LANES: tl.constexpr, LANE_SYMBOLS: tl.constexpr, CODE_BITS: tl.constexpr):
        group = tl.program_id(0)
        lane = tl.arange(0, LANES)
        position = tl.load(lane_bits + group * LANES + lane).to(tl.uint32, bitcast=True).to(tl.int64)
        base = group.to(tl.int64) * (LANES * LANE_SYMBOLS) + lane
        last = n_words - 2  # the last word pair a lane may read (the stream carries two words of padding)
        for k in range(LANE_SYMBOLS):
            word = tl.minimum(position >> 5, last)
            high = tl.load(words + word).to(tl.uint32, bitcast=True).to(tl.uint64)
            low = tl.load(words + word + 1).to(tl.uint32, bitcast=True).to(tl.uint64)
            shift = (position & 31).to(tl.uint64)
            window = (((high << 32) | low) >> (64 - CODE_BITS - shift)) & ((1 << CODE_BITS) - 1)
            entry = tl.load(table + window.to(tl.int32))
            index = base + k * LANES
            valid = index < count
            sm = tl.load(sign_mantissa + index, mask=valid, other=0).to(tl.int32)
            bits = ((sm & 0x80) << 8) | (((entry >> 8) & 0xFF) << 7) | (sm & 0x7F)
            tl.store(out + index, bits.to(tl.int16), mask=valid)
            position += (entry & 0xFF).to(tl.int64)


def decode_into(out: torch.Tensor, words: torch.Tensor, lane_bits: torch.Tensor, table: torch.Tensor,
                sign_mantissa: torch.Tensor) -> None:
    """Decode one chunk into `out` (int16 or bf16, `sign_mantissa.numel()` values), all arrays on one device;
    `table` is codec.decode_table(lengths) (int32). Queued on the current stream."""
    count = sign_mantissa.numel()
    if out.numel() != count:
        raise ValueError(f"out holds {out.numel()} values, the chunk {count}")
    groups = (lane_bits.numel() - 1) // LANES
    _decode_kernel[(groups,)](words, words.numel(), lane_bits, table, sign_mantissa, out.view(torch.int16), count,
                              LANES=LANES, LANE_SYMBOLS=LANE_SYMBOLS, CODE_BITS=MAX_CODE_BITS, num_warps=_WARPS)


_self_tests: dict[torch.device, bool] = {}


def self_test(device: torch.device) -> bool:
    """Whether the kernel decodes one coded group on `device` bit for bit (once per device; False, logged,
    where Triton is missing or fails): `auto` pools are compressed only where this holds."""
    if device not in _self_tests:
        _self_tests[device] = _run_self_test(device)
    return _self_tests[device]


def _run_self_test(device: torch.device) -> bool:
    if not available(device):
        return False
    from .codec import decode_table, encode

    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(2 * GROUP_VALUES, generator=generator) * 0.02).to(torch.bfloat16)
    try:
        chunk = encode(values.to(device))
        out = torch.empty(values.numel(), dtype=torch.int16, device=device)
        decode_into(out, chunk.words, chunk.lane_bits, decode_table(chunk.lengths).to(device), chunk.sign_mantissa)
        ok = torch.equal(out.cpu(), values.view(torch.int16))
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the raw format here
        log.warning("the Triton decoder does not run on %s (%s); pools stay raw", device, exc)
        return False
    if not ok:
        log.warning("the Triton decoder decoded a test chunk wrongly on %s; pools stay raw", device)
    return ok
