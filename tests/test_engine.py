"""Engine behaviour on the tiny synthetic model (fast): sleep/wake fidelity, pool sharing, integrity, errors."""
import os
import threading

import pytest

from ksleep.worker import AsleepError, BusyError, Engine, PoolCapacityError, SamplingParams
from ksleep.worker import pool as pool_module
from ksleep.worker.attention import ATTENTION_NAME
from ksleep.worker.errors import PoolOwnershipError

from .conftest import PROMPT, SHM, pool_files, run_in_new_process

GREEDY = SamplingParams(max_tokens=24)


def ids(engine, params=GREEDY):
    return engine.complete(PROMPT, params).token_ids


def test_level1_cycles_release_memory_and_give_identical_tokens(open_engine):
    engine = open_engine()
    baseline = ids(engine)
    assert len(set(baseline)) > 3, "the tiny model should not repeat one token"
    for _ in range(3):
        result = engine.sleep(1)
        assert result.bytes_freed == engine.layout.total_bytes + engine.arena.scratch_bytes_planned  # and the KV cache
        assert engine.memory().resident_bytes == 0 and engine.memory().mirror_bytes == engine.layout.total_bytes
        with pytest.raises(AsleepError):
            engine.generate(PROMPT)
        woke = engine.wake()
        assert woke.source == "mirror" and woke.verified and woke.bytes_restored == engine.layout.total_bytes
        assert ids(engine) == baseline


def test_level2_drops_the_mirror_and_reloads_from_the_source(open_engine, prefix):
    engine = open_engine()
    baseline = ids(engine)
    engine.sleep(2)
    assert pool_files(prefix) == [] and engine.memory().mirror_bytes == 0
    assert engine.wake().source == "source"
    assert len(pool_files(prefix)) == 2
    assert ids(engine) == baseline


def test_keep_layers_stay_resident(open_engine):
    engine = open_engine(keep_layers=2)
    baseline = ids(engine)
    kept = sum(s.nbytes for s in engine.layout.resident_segments(2))
    result = engine.sleep(1)
    assert engine.memory().resident_bytes == kept > 0
    assert result.bytes_freed == engine.layout.total_bytes - kept + engine.arena.scratch_bytes_planned
    assert engine.wake().bytes_restored == engine.layout.total_bytes - kept
    assert ids(engine) == baseline
    engine.sleep(2)
    engine.wake()
    assert ids(engine) == baseline


def test_keep_layers_larger_than_the_model_is_refused(make_config):
    with pytest.raises(ValueError, match="keep_layers=9 but the model has 4 layers"):
        Engine.load(make_config(keep_layers=9))


def test_sleep_waits_for_no_stream_and_state_errors_are_clear(open_engine):
    engine = open_engine()
    stream = engine.generate(PROMPT, SamplingParams(max_tokens=5))
    next(stream)
    with pytest.raises(BusyError, match="1 generation"):
        engine.sleep(1)
    list(stream)
    engine.sleep(1)
    engine.sleep(1)  # sleeping twice is harmless
    assert engine.wake().source == "mirror"
    assert engine.wake().source == "none"  # already awake
    with pytest.raises(ValueError, match="sleep level must be 1 or 2"):
        engine.sleep(3)


def test_abandoned_stream_releases_its_claim(open_engine):
    engine = open_engine()
    stream = engine.generate(PROMPT, SamplingParams(max_tokens=5))
    next(stream)
    stream.close()
    engine.sleep(1)


def test_concurrent_streams_interleave_and_match_serial_output(open_engine):
    engine = open_engine()
    baseline = ids(engine)
    results = [None] * 4

    def worker(i):
        results[i] = ids(engine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [baseline] * 4


def test_second_process_attaches_to_the_pool_with_identical_output(open_engine, make_config):
    engine = open_engine()
    baseline = engine.complete(PROMPT, GREEDY)
    other = run_in_new_process(make_config(), PROMPT, GREEDY.max_tokens)
    assert other["pool"] == "attached"
    assert other["token_ids"] == baseline.token_ids and other["text"] == baseline.text


def corrupt(path, offset=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corruption_under_a_sleeping_engine_is_detected_and_rebuilt(open_engine):
    engine = open_engine()
    baseline = ids(engine)
    engine.sleep(1)
    corrupt(engine.weights.pool.path)
    woke = engine.wake()
    assert woke.source == "source"  # the mirror failed its checksum and was never used
    assert ids(engine) == baseline


def test_corrupted_pool_is_rebuilt_on_attach(open_engine, make_config, prefix):
    first = open_engine()
    baseline = ids(first)
    corrupt(first.weights.pool.path, offset=first.layout.slots[3].offset)
    second = open_engine()
    assert second.load_report.pool == "rebuilt"
    assert ids(second) == baseline


def test_truncated_pool_is_detected(open_engine):
    engine = open_engine()
    baseline = ids(engine)
    engine.sleep(1)
    os.truncate(engine.weights.pool.path, 4096)
    assert engine.wake().source == "source"
    assert ids(engine) == baseline


def test_pool_files_are_private_and_a_shared_pool_is_refused(open_engine, make_config):
    engine = open_engine()
    files = pool_files(engine.config.pool_prefix)
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    os.chmod(files[0], 0o644)
    with pytest.raises(PoolOwnershipError, match="mode 644"):
        Engine.load(make_config())


def test_a_pool_too_big_for_shm_is_refused_and_leaves_nothing(make_config, prefix, monkeypatch):
    monkeypatch.setattr(pool_module, "host_capacity", lambda shm_dir: (1 << 20, 1 << 40))
    with pytest.raises(PoolCapacityError, match=r"needs 14,680,064 bytes; /dev/shm has 1,048,576 bytes free"):
        Engine.load(make_config())
    assert pool_files(prefix) == []


def test_prompt_checks(open_engine):
    engine = open_engine()
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        engine.generate("x" * 300)
    with pytest.raises(ValueError, match="token ids must be integers in \\[0, 512\\)"):
        engine.generate([1, 512])
    assert ids(engine) == ids(engine)  # still serving


def test_greedy_loop_matches_transformers_generate(open_engine):
    engine = open_engine()
    prompt = engine.tokenizer(PROMPT, return_tensors="pt").input_ids
    engine.model.config._attn_implementation = "sdpa"  # transformers' own attention and DynamicCache
    try:
        reference = engine.model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
    finally:
        engine.model.config._attn_implementation = ATTENTION_NAME
    assert ids(engine, SamplingParams(max_tokens=24, ignore_eos=True)) == reference[0, prompt.shape[1]:].tolist()


def test_tied_model_survives_sleep_and_wake(open_engine):
    engine = open_engine("synthetic:tiny-tied")
    baseline = ids(engine)
    engine.sleep(1)
    engine.wake()
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert ids(engine) == baseline


def test_cpu_arena_is_rebound_and_vmm_on_is_refused(open_engine, make_config):
    engine = open_engine()
    assert not engine.load_report.stable_addresses
    engine.sleep(1)
    assert engine.model.lm_head.weight.device.type == "meta"  # nothing points at freed memory
    engine.wake()
    view = engine.arena.views()["lm_head.weight"]
    assert engine.model.lm_head.weight.data_ptr() == view.data_ptr()
    with pytest.raises(RuntimeError, match="vmm=on, but CUDA VMM cannot be used"):
        Engine.load(make_config(vmm="on"))


def test_stale_temporary_files_of_dead_builders_are_removed(make_config, prefix, open_engine):
    engine = open_engine()
    name = engine.pool_name
    engine.close(remove_pool=True)
    stale = SHM / f"{name}.pool.tmp-999999999"
    stale.write_bytes(b"x")
    open_engine()
    assert not stale.exists()


def test_a_worker_can_start_asleep_on_an_existing_pool(open_engine, make_config):
    first = open_engine()
    baseline = ids(first)
    second = Engine.load(make_config(), awake=False)
    try:
        assert second.state.value == "asleep" and second.memory().resident_bytes == 0
        assert second.load_report.pool == "attached"
        with pytest.raises(AsleepError):
            second.generate(PROMPT)
        woke = second.wake()
        assert woke.verified  # the first wake after an attach always checks the mirror
        assert ids(second) == baseline
    finally:
        second.close()


def test_a_worker_started_asleep_without_a_pool_builds_none_until_its_wake(make_config, prefix, open_engine):
    engine = Engine.load(make_config(), awake=False)
    try:
        assert (engine.state.value, engine.sleep_level, engine.load_report.pool) == ("asleep", 2, "none")
        assert pool_files(prefix) == [] and engine.memory().resident_bytes == 0
        assert engine.wake().source == "source" and pool_files(prefix) != []
        woken = ids(engine)
    finally:
        engine.close(remove_pool=True)
    assert woken == ids(open_engine())


def test_without_wake_checksums_only_the_first_wake_of_an_attached_pool_is_checked(open_engine, make_config):
    baseline = ids(open_engine())
    second = Engine.load(make_config(verify_on_wake=False), awake=False)
    try:
        assert second.wake().verified  # a pool this process never checked
        assert ids(second) == baseline
        second.sleep(1)
        woke = second.wake()
        assert not woke.verified and woke.source == "mirror" and ids(second) == baseline
    finally:
        second.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a pool to another user")
def test_a_pool_owned_by_another_user_is_refused(open_engine, make_config):
    engine = open_engine()
    for path in pool_files(engine.config.pool_prefix):
        os.chown(path, 65534, 65534)
    with pytest.raises(PoolOwnershipError, match="owned by uid 65534"):
        Engine.load(make_config())
