"""The real embedded model (SmolLM2-135M-Instruct): real text, real tied weights, real memory figures."""
import os
import shutil

import psutil
import pytest

from ksleep.worker import SamplingParams

from .conftest import PROMPT, run_in_new_process

GREEDY = SamplingParams(max_tokens=16)


@pytest.fixture
def smol(open_engine):
    return open_engine("smollm2-135m")


def test_real_text_survives_every_kind_of_sleep(smol, open_engine):
    baseline = smol.complete(PROMPT, GREEDY)
    assert baseline.finish_reason == "length" and len(baseline.token_ids) == 16
    assert sum(ch.isalpha() for ch in baseline.text) > 20, baseline.text  # English, not noise
    for level in (1, 1, 2, 1):
        smol.sleep(level)
        smol.wake()
        again = smol.complete(PROMPT, GREEDY)
        assert (again.token_ids, again.text) == (baseline.token_ids, baseline.text)


def test_keep_layers_on_the_real_model(open_engine):
    engine = open_engine("smollm2-135m", keep_layers=3)
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    engine.sleep(1)
    assert 0 < engine.memory().resident_bytes < engine.layout.total_bytes / 5
    engine.wake()
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_rss_falls_by_about_the_arena_on_sleep(smol):
    smol.complete(PROMPT, SamplingParams(max_tokens=2))
    before = psutil.Process().memory_info().rss
    smol.sleep(1)
    after = psutil.Process().memory_info().rss
    arena = smol.layout.total_bytes
    assert 0.8 * arena <= before - after <= 1.3 * arena, (before - after, arena)


def test_second_process_attaches_without_reading_the_checkpoint(smol, open_engine, make_config, tmp_path):
    local = tmp_path / "smollm2"
    shutil.copytree(smol.source.directory, local)
    engine = open_engine(str(local))
    baseline = engine.complete(PROMPT, GREEDY)
    # Garble the checkpoint but keep its size and mtime (the model's identity): a worker that read it would
    # produce other tokens; one that attaches to the pool cannot tell.
    weights = local / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(os.urandom(st.st_size // 2))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    other = run_in_new_process(make_config(str(local)), PROMPT, GREEDY.max_tokens)
    assert other["pool"] == "attached"
    assert other["token_ids"] == baseline.token_ids and other["text"] == baseline.text
