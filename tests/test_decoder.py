"""The static-KV-cache decode path (on CPU it runs without graphs: same cache plumbing, eager steps)."""
import pytest

from ksleep.worker import SamplingParams, WorkerConfig
from ksleep.worker.decoder import cache_length, kv_bytes, static_cache_unsupported

from .conftest import PROMPT

GREEDY = SamplingParams(max_tokens=24)


def test_cache_lengths_are_powers_of_two_capped_by_the_static_cache():
    assert cache_length(1, 4096) == cache_length(256, 4096) == 256
    assert cache_length(257, 4096) == 512 and cache_length(3000, 2048) == 2048 and cache_length(60, 64) == 64


def test_decode_graph_settings_are_validated():
    with pytest.raises(ValueError, match="decode_graphs"):
        WorkerConfig(decode_graphs="maybe")
    with pytest.raises(ValueError, match="graph_tokens"):
        WorkerConfig(graph_tokens=0)


def test_static_cache_gives_the_eager_tokens_and_lives_in_the_arena(open_engine):
    eager = open_engine(decode_graphs="off")
    assert eager.decoder is None and eager.arena.scratch() is None
    baseline = eager.complete(PROMPT, GREEDY).token_ids
    sampled = eager.complete(PROMPT, SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=7)).token_ids
    eager.close(remove_pool=True)

    engine = open_engine(decode_graphs="on", graph_tokens=512)
    config = engine.skeleton.config
    assert 0 <= engine.arena.scratch_bytes - kv_bytes(config, engine.config.torch_dtype, 512) < 2 << 20  # 2 MiB-rounded
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline
    assert engine.complete(PROMPT, SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=7)).token_ids == sampled
    for _ in range(2):
        engine.sleep(1)
        assert engine.arena.scratch() is None and engine.memory().resident_bytes == 0  # KV released too
        engine.wake(overlap=True)
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_a_second_stream_and_a_request_too_long_for_the_cache_get_private_caches(open_engine):
    engine = open_engine(decode_graphs="on", graph_tokens=64)
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    first, second = engine.generate(PROMPT, GREEDY), engine.generate(PROMPT, GREEDY)
    pairs = list(zip(first, second))  # interleaved: the first holds the shared cache, the second a private one
    second.close()
    assert [a.token_id for a, _ in pairs] == [b.token_id for _, b in pairs] == baseline
    long = engine.complete(PROMPT, SamplingParams(max_tokens=60)).token_ids  # prompt + 60 > 64 positions
    assert len(long) == 60
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline  # the shared cache is free again


def test_real_model_gives_one_answer_whichever_cache_a_request_gets(open_engine):
    """On real weights in bf16 a near-tie can go either way with the cache length, so every request that fits
    uses the same length: the shared cache, a private one (concurrent), and after sleep/wake all agree."""
    pytest.importorskip("gguf")
    params = SamplingParams(max_tokens=30)
    engine = open_engine("smollm2-135m", decode_graphs="on", graph_tokens=256)
    want = engine.complete(PROMPT, params)
    first, second = engine.generate(PROMPT, params), engine.generate(PROMPT, params)
    pairs = list(zip(first, second))
    second.close()
    assert [a.token_id for a, _ in pairs] == [b.token_id for _, b in pairs] == want.token_ids
    engine.sleep(1)
    engine.wake(overlap=True)
    got = engine.complete(PROMPT, params)
    assert got.token_ids == want.token_ids and got.text == want.text


def test_models_the_static_cache_cannot_take_are_named():
    from transformers import MistralConfig, Qwen2Config

    sliding = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                            intermediate_size=128, vocab_size=100, sliding_window=32)
    assert "sliding-window" in static_cache_unsupported(sliding, 64)
    full = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=128, vocab_size=100)
    assert static_cache_unsupported(full, 64) is None


def test_a_failed_claim_and_a_stream_closed_before_it_started_leave_no_claim(open_engine, monkeypatch):
    engine = open_engine(decode_graphs="on", graph_tokens=256)
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    unstarted = engine.generate(PROMPT, GREEDY)
    unstarted.close()
    assert engine.streams == 0 and not engine.decoder.busy
    with monkeypatch.context() as m:
        m.setattr(engine.decoder, "acquire", lambda *a: (_ for _ in ()).throw(MemoryError("no room for the cache")))
        with pytest.raises(MemoryError):
            engine.generate(PROMPT, GREEDY)
    assert engine.streams == 0
    engine.sleep(1)  # nothing holds the engine awake
    engine.wake()
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline
