"""Layer-streamed wake: chunk order, the modules that wait for their group, and fidelity (CPU)."""
import pytest

from ksleep.worker import SamplingParams
from ksleep.worker.fill import plan_chunks
from ksleep.worker.gate import LayerGate, group_owners

from .conftest import PROMPT
from .test_engine import corrupt

GREEDY = SamplingParams(max_tokens=24)


def execution_order(layout):
    return ["embed", *(f"layer.{i}" for i in range(layout.num_layers)), "head"]


def test_chunks_follow_execution_order_and_cover_exactly_the_spans(open_engine):
    layout = open_engine().layout
    size = 1 << 21
    chunks = plan_chunks(layout, [(0, layout.total_bytes)], size)
    order = execution_order(layout)
    ranks = [order.index(c.group) for c in chunks]
    assert ranks == sorted(ranks) and chunks[0].group == "embed" and chunks[-1].group == "head"
    assert all(c.start // size == (c.end - 1) // size for c in chunks), "a chunk crosses a chunk boundary"
    assert all(any(s.start <= c.start and c.end <= s.end and s.group == c.group for s in layout.segments)
               for c in chunks)
    assert sum(c.end - c.start for c in chunks) == sum(s.nbytes for s in layout.segments)
    kept = layout.resident_segments(1)[0]
    partial = plan_chunks(layout, [(0, kept.start), (kept.end, layout.total_bytes)], size)
    assert all(not (c.start < kept.end and kept.start < c.end) for c in partial)


@pytest.mark.parametrize("model", ["synthetic:tiny", "synthetic:tiny-tied"])
def test_each_group_has_owners_and_every_weight_is_behind_one(open_engine, model):
    engine = open_engine(model)
    owners = group_owners(engine.model, engine.layout)
    groups = {g for _, g in owners}
    assert groups == {s.group for s in engine.layout.slots}
    layers = engine.model.model.layers
    assert [(m, g) for m, g in owners if m in list(layers)] == [(layer, f"layer.{i}") for i, layer in enumerate(layers)]


class RecordingFill:
    """Stands in for an ArenaFill: records the order in which the forward asks for each group."""

    def __init__(self, groups):
        self.groups, self.asked = list(groups), []

    def wait_group(self, group):
        self.asked.append(group)


def test_the_forward_waits_for_each_group_in_order_then_the_hooks_are_gone(open_engine):
    engine = open_engine()
    fill = RecordingFill(execution_order(engine.layout))
    gate = LayerGate(engine.model, engine.layout)
    gate.arm(fill)
    engine.complete(PROMPT, SamplingParams(max_tokens=2))
    asked = list(dict.fromkeys(fill.asked))
    assert asked == execution_order(engine.layout)
    assert not gate.armed and all(not m._forward_pre_hooks for m in engine.model.modules())


def test_overlapped_wakes_give_identical_tokens_with_and_without_kept_layers(open_engine):
    for keep in (0, 1):
        engine = open_engine(keep_layers=keep)
        baseline = engine.complete(PROMPT, GREEDY).token_ids
        for _ in range(3):
            engine.sleep(1)
            woke = engine.wake(overlap=True)
            assert woke.overlapped and woke.source == "mirror"
            assert engine.complete(PROMPT, GREEDY).token_ids == baseline
        engine.close(remove_pool=True)


def test_a_corrupt_mirror_found_behind_the_first_forward_is_rebuilt_and_the_prompt_rerun(open_engine):
    engine = open_engine()
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    offset = engine.layout.slots[3].offset
    with open(engine.weights.pool.path, "rb") as f:
        f.seek(offset)
        original = f.read(1)
    engine.sleep(1)
    corrupt(engine.weights.pool.path, offset)
    engine.wake(overlap=True)
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline  # first forward found it, rebuilt, re-ran
    with open(engine.weights.pool.path, "rb") as f:  # the pool was rebuilt from the source
        f.seek(offset)
        assert f.read(1) == original
    engine.sleep(1)
    assert engine.wake(overlap=True).source == "mirror"
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_sleep_right_after_an_overlapped_wake_settles_it_first(open_engine):
    engine = open_engine()
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    engine.sleep(1)
    corrupt(engine.weights.pool.path, engine.layout.slots[3].offset)
    engine.wake(overlap=True)
    engine.sleep(1)  # the pending check fails here: the bad pool is dropped and rebuilt, never served
    engine.wake(overlap=True)
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_a_rebuild_that_fails_behind_the_first_forward_leaves_the_engine_asleep(open_engine, monkeypatch):
    engine = open_engine()
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    engine.sleep(1)
    corrupt(engine.weights.pool.path, engine.layout.slots[3].offset)
    engine.wake(overlap=True)
    with monkeypatch.context() as m:
        m.setattr(engine.weights, "_build_pool", lambda: (_ for _ in ()).throw(OSError("the source is unreachable")))
        with pytest.raises(OSError):
            engine.complete(PROMPT, GREEDY)
    assert engine.state.value == "asleep" and engine.sleep_level == 2 and engine.streams == 0
    assert engine.wake().source == "source"  # never served the corrupt copy
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline
