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
    """(exponent, sign_mantissa) of bf16 `values`, both as int64 0..255."""
    if values.dtype != torch.bfloat16:
        raise TypeError(f"only bfloat16 is coded, got {values.dtype}")
    bits = values.reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF
    return (bits >> 7) & 0xFF, ((bits >> 8) & 0x80) | (bits & 0x7F)


def join(exponent: torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor:
    """The bf16 values of (exponent, sign_mantissa): the inverse of split()."""
    sm = sign_mantissa.to(torch.int64)
    bits = ((sm & 0x80) << 8) | (exponent.to(torch.int64) << 7) | (sm & 0x7F)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


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


def encode(values: torch.Tensor) -> PackedChunk:
    """Pack bf16 `values` (any shape, any device; the chunk's arrays stay on that device)."""
    exponent, sm = split(values)
    count = exponent.numel()
    histogram = torch.bincount(exponent, minlength=256)
    lengths = code_lengths(histogram.tolist())
    device = exponent.device
    groups = max(1, -(-count // GROUP))
    padded = torch.full((groups * GROUP,), int(histogram.argmax()), dtype=torch.int64, device=device)
    padded[:count] = exponent
    # lane order: lane j of a group takes the group's values j, j + LANES, ...
    in_lanes = padded.view(groups, LANE_SYMBOLS, LANES).transpose(1, 2).reshape(-1)
    length_of = torch.tensor(lengths, dtype=torch.int64, device=device)
    code_of = torch.tensor(canonical_codes(lengths), dtype=torch.int64, device=device)
    n = length_of[in_lanes]
    code = code_of[in_lanes]
    ends = torch.cumsum(n, 0)
    starts = ends - n
    total = int(ends[-1])
    if total >= 1 << 32:
        raise ValueError(f"a chunk's code stream must stay under 4 Gbit; {count} values make {total} bits")
    lane_bits = torch.cat([starts[::LANE_SYMBOLS], ends[-1:]])
    # Each code lands in its word, and the bits that do not fit there in the next one; codes never overlap, so
    # adding the pieces into the words sets exactly their bits.
    words = torch.zeros(total // 32 + 3, dtype=torch.int64, device=device)
    word, offset = starts >> 5, starts & 31
    room = 32 - offset - n  # bits left in the word after the code; negative: it spills into the next word
    fits = room >= 0
    words.index_add_(0, word, torch.where(fits, code << room.clamp(min=0), code >> (-room).clamp(min=0)))
    spill = ~fits
    words.index_add_(0, word[spill] + 1, (code[spill] << (32 + room[spill])) & _MASK32)
    return PackedChunk(count, torch.tensor(lengths, dtype=torch.uint8), _as_int32(lane_bits), _as_int32(words),
                       sm.to(torch.uint8))


def _as_int32(unsigned: torch.Tensor) -> torch.Tensor:
    return ((unsigned ^ 0x80000000) - 0x80000000).to(torch.int32)


def decode_exponents(chunk: PackedChunk) -> torch.Tensor:
    """The reference decoder: every lane one code at a time, all lanes at once (int64[count])."""
    device = chunk.words.device
    table = decode_table(chunk.lengths).to(device=device, dtype=torch.int64)
    words = chunk.words.to(torch.int64) & _MASK32
    position = chunk.lane_bits[:-1].to(torch.int64) & _MASK32
    out = torch.empty(LANE_SYMBOLS, chunk.lanes, dtype=torch.int64, device=device)
    for k in range(LANE_SYMBOLS):
        word, shift = position >> 5, position & 31
        window = ((words[word] << shift) & _MASK32) | (words[word + 1] >> (32 - shift))
        entry = table[window >> (32 - MAX_CODE_BITS)]
        out[k] = entry >> 8
        position += entry & 0xFF
    groups = chunk.lanes // LANES
    return out.view(LANE_SYMBOLS, groups, LANES).transpose(0, 1).reshape(-1)[:chunk.count]


def decode(chunk: PackedChunk) -> torch.Tensor:
    """bf16[count], bit for bit the values encode() was given."""
    return join(decode_exponents(chunk), chunk.sign_mantissa)
