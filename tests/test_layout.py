import pytest
import torch

from ksleep.worker import synthetic
from ksleep.worker.arena import plan_blocks
from ksleep.worker.layout import SEGMENT_ALIGN, SLOT_ALIGN, ArenaLayout
from ksleep.worker.skeleton import ModelSkeleton


def layout_of(preset: str) -> ArenaLayout:
    skeleton = ModelSkeleton.build(synthetic.build_config(preset), torch.bfloat16)
    return ArenaLayout.plan(skeleton.tensors(), skeleton.num_layers)


def test_deepseek_7b_preset_has_the_real_weight_bytes():
    layout = layout_of("deepseek-r1-distill-qwen-7b")
    params = sum(s.nbytes for s in layout.slots if s.kind == "param")
    assert params == 15_231_233_024
    assert layout.num_layers == 28
    # Padding to 2 MiB per group costs well under one percent of the copy.
    assert layout.total_bytes < params * 1.005


def test_execution_order_alignment_and_one_region_per_dtype():
    layout = layout_of("tiny")
    groups = [s.group for s in layout.slots if s.dtype == "bfloat16"]
    expected = ["embed"] + [f"layer.{i}" for i in range(4)] + ["head"]
    assert list(dict.fromkeys(groups)) == expected
    assert [s.name for s in layout.slots if s.group == "head"] == ["model.norm.weight", "lm_head.weight"]
    assert all(s.offset % SLOT_ALIGN == 0 for s in layout.slots)
    assert all(seg.start % SEGMENT_ALIGN == 0 and seg.end % SEGMENT_ALIGN == 0 for seg in layout.segments)
    # one contiguous region per dtype: the float32 rotary tables after all bfloat16 weights
    bf16_end = max(s.offset + s.nbytes for s in layout.slots if s.dtype == "bfloat16")
    assert all(s.offset >= bf16_end for s in layout.slots if s.dtype == "float32")
    spans = sorted((s.offset, s.offset + s.nbytes) for s in layout.slots)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "slots overlap"


def test_tied_weights_are_laid_out_once_and_bound_to_both_modules():
    skeleton = ModelSkeleton.build(synthetic.build_config("tiny-tied"), torch.bfloat16)
    layout = ArenaLayout.plan(skeleton.tensors(), skeleton.num_layers)
    names = [s.name for s in layout.slots]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    arena = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    skeleton.bind({s.name: s.view(arena) for s in layout.slots})
    assert skeleton.model.lm_head.weight is skeleton.model.model.embed_tokens.weight
    assert skeleton.model.lm_head.weight.data_ptr() == arena.data_ptr()


def test_layout_round_trips_through_json_and_signature_is_stable():
    layout = layout_of("tiny")
    again = ArenaLayout.from_json(layout.to_json())
    assert again == layout and again.signature() == layout.signature()
    assert layout_of("tiny-tied").signature() != layout.signature()


@pytest.mark.parametrize("keep", [0, 1, 4])
def test_blocks_tile_the_arena_and_keep_the_last_layers(keep):
    layout = layout_of("tiny")
    blocks = plan_blocks(layout, keep)
    assert blocks[0].start == 0 and blocks[-1].end == layout.total_bytes
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))
    kept = sum(b.nbytes for b in blocks if b.resident)
    assert kept == sum(s.nbytes for s in layout.resident_segments(keep))
    assert (kept == 0) == (keep == 0)
