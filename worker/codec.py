"""A lossless code for bfloat16 weights, in the manner of DFloat11: each value's 8-bit exponent is entropy-coded
(a weight matrix's exponents carry ~2.5 bits of information), its sign and 7 mantissa bits are kept as one byte.

One `PackedChunk` holds `count` values:
  sign_mantissa  uint8[count]            sign << 7 | mantissa, as they were
  words          int32[n_words]          the exponents' codes, MSB first within each 32-bit word (two zero words
                                         of padding at the end, so a decoder may always read a pair)
  lane_bits      int32[lanes + 1]        bit offset where each lane's codes start (the last: the stream's end),
                                         read as unsigned (a chunk's stream is under 4 Gbit)
  lengths        uint8[256]              code length of each exponent value (0: does not occur)
A lane is LANE_SYMBOLS values whose codes a decoder reads independently of every other lane, so that a GPU
decodes thousands of lanes at once. The lanes are interleaved: the values are cut into groups of LANES x
LANE_SYMBOLS, and lane j of a group holds its values j, j + LANES, j + 2 LANES, ...: when the LANES lanes of a
group each decode their k-th code, they write LANES consecutive values (coalesced stores, without staging in
shared memory). The last group is padded with the most frequent exponent. Codes are canonical Huffman codes
limited to MAX_CODE_BITS, so that one table of 2**MAX_CODE_BITS entries decodes a code in one lookup.

Encoding and the reference decoder are plain torch, on any device (on a GPU the encoder runs at the device's
speed; on CPU it is the fallback and what the tests use). The GPU decoder lives in codec_triton.py.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

MAX_CODE_BITS = 12
LANE_SYMBOLS = 512  # values per lane: its 32-bit offset costs 0.0625 bits per value
LANES = 128  # lanes per group (one GPU program decodes a group)
GROUP = LANES * LANE_SYMBOLS
MAX_VALUES = 1 << 27  # values per chunk: its stream (at most MAX_CODE_BITS a value) stays under 2 Gbit
_MASK32 = 0xFFFFFFFF


@dataclass(slots=True)
class PackedChunk:
    count: int
    lengths: torch.Tensor
    lane_bits: torch.Tensor
    words: torch.Tensor
    sign_mantissa: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes this chunk takes, all of its arrays counted."""
        return sum(t.numel() * t.element_size() for t in (self.lengths, self.lane_bits, self.words, self.sign_mantissa))

    @property
    def lanes(self) -> int:
        return self.lane_bits.numel() - 1


def split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent, sign_mantissa) of bf16 `values` (or of any 16-bit pattern), as int64 0..255 and uint8."""
    if values.dtype != torch.bfloat16:
        raise TypeError(f"only bfloat16 is coded, got {values.dtype}")
    bits = values.reshape(-1).view(torch.int16)
    exponent = (bits >> 7).to(torch.int64) & 0xFF
    return exponent, (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)


def join(exponent: torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor:
    """The bf16 values of (exponent, sign_mantissa): the inverse of split()."""
    sm = sign_mantissa.to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exponent.to(torch.int32) << 7) | (sm & 0x7F)
    return bits.to(torch.int16).view(torch.bfloat16)  # (the int32 -> int16 cast keeps the low 16 bits)


def code_lengths(histogram: list[int], limit: int = MAX_CODE_BITS) -> list[int]:
    """Huffman code lengths for the 256 exponent values, none longer than `limit`: where Huffman's tree is
    deeper, the counts are flattened (halved, keeping every symbol that occurs) until it is not."""
    counts = list(histogram)
    while True:
        lengths = _huffman(counts)
        if max(lengths) <= limit:
            return lengths
        counts = [(c + 1) // 2 if c else 0 for c in counts]


def _huffman(counts: list[int]) -> list[int]:
    lengths = [0] * len(counts)
    heap = [(c, i, [i]) for i, c in enumerate(counts) if c]
    if len(heap) == 1:  # one value only: it still needs a one-bit code
        lengths[heap[0][1]] = 1
        return lengths
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: list[int]) -> list[int]:
    """The canonical code of each symbol (shorter codes first, then by symbol value)."""
    codes, code, previous = [0] * len(lengths), 0, 0
    for length, symbol in sorted((n, s) for s, n in enumerate(lengths) if n):
        code <<= length - previous
        codes[symbol], previous = code, length
        code += 1
    return codes


def decode_table(lengths: torch.Tensor) -> torch.Tensor:
    """int32[2**MAX_CODE_BITS]: for every window of the next MAX_CODE_BITS bits, symbol << 8 | code length."""
    lengths = [int(n) for n in lengths.tolist()]
    table = torch.zeros(1 << MAX_CODE_BITS, dtype=torch.int32)
    for symbol, code in enumerate(canonical_codes(lengths)):
        n = lengths[symbol]
        if n:
            shift = MAX_CODE_BITS - n
            table[code << shift:(code + 1) << shift] = symbol << 8 | n
    return table


ENCODE_SLICE = 64 * GROUP  # values coded at a time: bounds the encoder's temporaries (~0.4 GB on a GPU)


def encode(values: torch.Tensor) -> PackedChunk:
    """Pack bf16 `values` (any shape, any device; the chunk's arrays stay on that device)."""
    exponent, sm = split(values)
    count = exponent.numel()
    if count > MAX_VALUES:
        raise ValueError(f"a chunk holds at most {MAX_VALUES:,} values, got {count:,}")
    histogram = torch.bincount(exponent, minlength=256)
    lengths = code_lengths(histogram.tolist())
    device = exponent.device
    groups = max(1, -(-count // GROUP))
    padded = torch.full((groups * GROUP,), int(histogram.argmax()), dtype=torch.int64, device=device)
    padded[:count] = exponent
    del exponent
    # one table lookup per value (torch.take: far cheaper than advanced indexing on CPU): code << 4 | length
    table = torch.tensor([c << 4 | n for c, n in zip(canonical_codes(lengths), lengths)], dtype=torch.int64, device=device)
    total = int((torch.bincount(padded, minlength=256) * table.bitwise_and(0xF)).sum())  # the stream's bits
    words = torch.zeros(total // 32 + 3, dtype=torch.int64, device=device)
    lane_bits = torch.empty(groups * LANES + 1, dtype=torch.int64, device=device)
    lane_bits[-1] = total
    offset = 0
    for lo in range(0, groups * GROUP, ENCODE_SLICE):  # whole groups at a time, each slice's bits after the last's
        piece = padded[lo:lo + ENCODE_SLICE]
        # lane order: lane j of a group takes the group's values j, j + LANES, ...
        in_lanes = piece.view(-1, LANE_SYMBOLS, LANES).transpose(1, 2).reshape(-1)
        entry = torch.take(table, in_lanes)
        del in_lanes
        n, code = entry & 0xF, entry >> 4
        del entry
        starts = torch.cumsum(n, 0) - n + offset
        offset += int(n.sum())
        lane_bits[lo // LANE_SYMBOLS:(lo + piece.numel()) // LANE_SYMBOLS] = starts[::LANE_SYMBOLS]
        # Each code lands in its word, and the bits that do not fit there in the next one; codes never overlap, so
        # adding the pieces into the words sets exactly their bits.
        word = starts >> 5
        room = 32 - (starts & 31) - n  # bits left in the word after the code; negative: it spills into the next word
        del starts, n
        words.index_add_(0, word, torch.where(room >= 0, code << room.clamp(min=0), code >> (-room).clamp(min=0)))
        spill = (room < 0).nonzero().squeeze(1)
        words.index_add_(0, word[spill] + 1, (code[spill] << (32 + room[spill])) & _MASK32)
        del word, room, code, spill
    return PackedChunk(count, torch.tensor(lengths, dtype=torch.uint8), _as_int32(lane_bits), _as_int32(words), sm)


def _as_int32(unsigned: torch.Tensor) -> torch.Tensor:
    return ((unsigned ^ 0x80000000) - 0x80000000).to(torch.int32)


def decode_exponents(chunk: PackedChunk, table: torch.Tensor | None = None) -> torch.Tensor:
    """The reference decoder: every lane one code at a time, all lanes at once (int64[count]). Word indexes are
    clamped to the stream, as in the GPU decoder: a damaged chunk decodes to wrong values, never out of bounds."""
    device = chunk.words.device
    table = (decode_table(chunk.lengths) if table is None else table).to(device=device, dtype=torch.int64)
    words = chunk.words.to(torch.int64) & _MASK32
    last = words.numel() - 2
    position = chunk.lane_bits[:-1].to(torch.int64) & _MASK32
    out = torch.empty(LANE_SYMBOLS, chunk.lanes, dtype=torch.int64, device=device)
    for k in range(LANE_SYMBOLS):
        word = (position >> 5).clamp_(max=last)
        pair = (torch.take(words, word) << 32) | torch.take(words, word + 1)  # < 2**64: fits as unsigned bits
        window = (pair >> (64 - MAX_CODE_BITS - (position & 31))) & ((1 << MAX_CODE_BITS) - 1)
        entry = torch.take(table, window)
        out[k] = (entry >> 8) & 0xFF
        position += entry & 0xFF
    groups = chunk.lanes // LANES
    return out.view(LANE_SYMBOLS, groups, LANES).transpose(0, 1).reshape(-1)[:chunk.count]


def decode(chunk: PackedChunk, table: torch.Tensor | None = None) -> torch.Tensor:
    """bf16[count], bit for bit the values encode() was given."""
    return join(decode_exponents(chunk, table), chunk.sign_mantissa)
