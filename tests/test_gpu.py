"""GPU-only behaviour (run on the device machine: `pytest -m gpu`); skipped where no CUDA/ROCm device is."""
import pytest
import torch

from ksleep.worker import Engine, SamplingParams, WorkerConfig
from ksleep.worker.pool import block_sums
from ksleep.worker.vmm import vmm_unavailable_reason

from .conftest import PROMPT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture
def gpu_engine(prefix):
    engines = []

    def load(**kw):
        engine = Engine.load(WorkerConfig(model="synthetic:tiny", device="cuda", pool_prefix=prefix,
                                          **{"kv_cache": "1GiB", **kw}))
        engines.append(engine)
        return engine

    yield load
    for engine in engines:
        engine.close(remove_pool=True)


def used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


@pytest.mark.parametrize("vmm", ["auto", "off"])
def test_sleep_frees_device_memory_and_wake_restores_identical_output(gpu_engine, vmm):
    engine = gpu_engine(vmm=vmm)
    assert engine.load_report.pinned
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    awake, kv_mapped = used(), engine.arena.scratch_bytes
    engine.sleep(1)
    assert awake - used() >= (engine.layout.total_bytes + kv_mapped) * 0.9  # weights and the KV cache mapped
    assert engine.memory().resident_bytes == 0
    for _ in range(3):
        engine.wake()
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline
        engine.sleep(1)
    engine.wake()


@pytest.mark.skipif(vmm_unavailable_reason(torch.device("cuda", 0)) is not None, reason="no CUDA VMM")
def test_vmm_keeps_addresses_so_a_captured_cuda_graph_survives_sleep(gpu_engine):
    engine = gpu_engine(vmm="on")
    assert engine.load_report.stable_addresses
    address = engine.arena.address
    weight_ptr = engine.model.lm_head.weight.data_ptr()
    model = engine.model
    model.config._attn_implementation = "sdpa"  # a plain forward, outside the engine's batch cache
    x = torch.tensor([engine.tokenizer(PROMPT).input_ids], device="cuda")
    with torch.inference_mode():
        expected = model(x).logits.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x).logits
    for _ in range(3):
        engine.sleep(1)
        engine.wake()
        assert engine.arena.address == address and engine.model.lm_head.weight.data_ptr() == weight_ptr
        with torch.inference_mode():
            out.zero_()
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def test_keep_layers_on_gpu(gpu_engine):
    engine = gpu_engine(keep_layers=2)
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    engine.sleep(1)
    assert engine.memory().resident_bytes == sum(s.nbytes for s in engine.layout.resident_segments(2))
    engine.wake()
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_corruption_is_caught_by_the_device_checksum(gpu_engine):
    engine = gpu_engine()
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    engine.sleep(1)
    with open(engine.weights.pool.path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    assert engine.wake().source == "source"
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_block_sums_agree_between_host_and_device():
    data = torch.randint(0, 256, (3 << 21,), dtype=torch.uint8)
    assert torch.equal(block_sums(data), block_sums(data.cuda()).cpu())


def test_an_attaching_worker_copies_through_staging_then_pins_in_the_background(gpu_engine):
    first = gpu_engine()
    baseline = first.complete(PROMPT, GREEDY).token_ids
    second = gpu_engine()  # same pool: attached, not yet pinned in this engine's mapping
    assert second.load_report.pool == "attached" and second.weights.staging is not None
    assert second.complete(PROMPT, GREEDY).token_ids == baseline
    second.weights.pool.wait_pinned()
    second.sleep(1)
    assert second.wake().source == "mirror" and second.weights.staging is None  # pinned now: straight DMA
    assert second.complete(PROMPT, GREEDY).token_ids == baseline


@pytest.mark.parametrize("vmm", ["auto", "off"])
@pytest.mark.parametrize("keep", [0, 1])
def test_overlapped_wake_streams_layers_behind_the_forward(gpu_engine, vmm, keep):
    engine = gpu_engine(vmm=vmm, keep_layers=keep)
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    for _ in range(3):
        engine.sleep(1)
        woke = engine.wake(overlap=True)
        assert woke.overlapped and woke.verified
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline
    engine.sleep(1)
    engine.wake(overlap=True)
    engine.sleep(1)  # a sleep before any forward settles the copy first
    assert engine.wake(overlap=True).overlapped
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_overlapped_wake_catches_a_corrupt_mirror_and_reruns_the_prompt(gpu_engine):
    engine = gpu_engine()
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    engine.sleep(1)
    engine.weights.pool.tensor[engine.layout.slots[5].offset] ^= 0xFF  # the mirror is shared memory: flip one byte
    engine.wake(overlap=True)
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline


PROMPTS = [PROMPT, "Hello", "Sleep mode frees the GPU between requests", "a", "1 2 3 4 5"]


def together(engine, prompts, params=GREEDY):
    streams = [engine.generate(p, params) for p in prompts]
    return [[e.token_id for e in s] for s in streams]


def test_steps_replay_cuda_graphs_captured_once_across_sleeps_and_match_eager_steps(gpu_engine):
    engine = gpu_engine()
    assert engine.attention == "flash" and engine.runner.graphs_enabled
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    batch = together(engine, PROMPTS)
    captures = engine.runner.captures
    assert captures >= 2 and engine.runner.replays >= len(baseline)  # a prefill shape and decode shapes
    for _ in range(10):
        engine.sleep(1)
        assert engine.arena.scratch() is None and not engine.kv_cache.bound
        engine.wake(overlap=True)
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline
        assert together(engine, PROMPTS) == batch
    # stable addresses: no graph was captured twice (arrival timing may bring a new step shape, captured once)
    assert engine.runner.captures == len(engine.runner.graph_shapes) >= captures
    engine.runner.graphs_enabled = False
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline and together(engine, PROMPTS) == batch


def test_with_vmm_the_kv_cache_is_mapped_as_requests_need_it_and_unmapped_at_sleep(gpu_engine):
    engine = gpu_engine(kv_cache="2GiB")
    arena = engine.arena
    assert arena.stable_addresses
    head = arena.scratch_bytes
    assert 0 < head < arena.scratch_bytes_planned // 4  # a load maps the head alone
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    cache = engine.kv_cache
    for _ in range(2):
        # an extent (on the engine's thread, as the scheduler takes them) over nearly the whole cache: mapped now
        start = engine._call(cache.reserve, cache.usable_tokens - 512)
        assert arena.scratch_bytes >= arena.scratch_bytes_planned - 2 * (256 << 20)
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline
        engine._call(cache.extents.release, start)
        before = used()
        engine.sleep(1)
        assert arena.scratch_bytes == 0 and before - used() >= engine.layout.total_bytes + engine.kv_cache.nbytes // 2
        engine.wake(overlap=True)
        assert arena.scratch_bytes == head
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline


def test_without_stable_addresses_the_graphs_are_captured_again_after_a_wake(gpu_engine):
    engine = gpu_engine(vmm="off")
    baseline = engine.complete(PROMPT, GREEDY).token_ids
    captures = engine.runner.captures
    engine.sleep(1)
    engine.wake(overlap=True)
    for _ in range(2):  # the first prefill runs eagerly behind the copy; the second replays its graph again
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline
    assert engine.runner.captures == 2 * captures


def test_flash_attention_agrees_with_the_gather_fallback_and_batches_equal_solo_runs(gpu_engine, monkeypatch):
    from ksleep.worker import attention

    flash = gpu_engine()
    alone = [flash.complete(p, GREEDY).token_ids for p in PROMPTS]
    assert together(flash, PROMPTS) == alone
    flash.close()
    monkeypatch.setattr(attention, "flash_unavailable_reason", lambda *a: "forced for the test")
    gather = gpu_engine(cuda_graphs="auto")
    assert gather.attention == "gather" and not gather.runner.graphs_enabled
    assert together(gather, PROMPTS) == alone


def test_a_long_prompt_is_chunked_beside_decodes_on_the_gpu(gpu_engine):
    engine = gpu_engine(prefill_chunk=32)
    long_prompt = list(range(1, 201))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [engine.complete(PROMPT, params).token_ids, engine.complete(long_prompt, GREEDY).token_ids]
    decoding = engine.generate(PROMPT, params)
    first = next(decoding).token_id
    assert engine.complete(long_prompt, GREEDY).token_ids == want[1]
    assert [first] + [e.token_id for e in decoding] == want[0]


def test_daemon_on_gpu_promotes_its_standby_and_level3_leaves_no_process_of_ours(tmp_path, prefix):
    import os
    import signal

    import psutil

    from ksleep.v1 import ksleep_pb2

    from .conftest import pool_files
    from .daemon import Daemon
    from .test_standby import gone, wait_for_standby

    daemon = Daemon(tmp_path, prefix, "synthetic:tiny", "--device", "cuda", "--standby", "--idle-timeout", "0",
                    "--kv-cache", "1GiB")
    try:
        daemon.wait_ready()
        baseline = daemon.ids()
        first, spare = daemon.status().worker_pid, wait_for_standby(daemon)
        os.kill(first, signal.SIGKILL)
        assert daemon.ids() == baseline
        status = daemon.status()
        assert status.worker_pid == spare and status.last_restart.source == "standby"
        second = wait_for_standby(daemon, not_in=(first, spare))
        daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=3))
        status = daemon.status()
        assert status.worker_pid == 0 and status.standby_pid == 0 and gone(spare) and gone(second)
        assert daemon.ids() == baseline
    finally:
        pids = [p.pid for p in daemon.processes()] if daemon.proc.poll() is None else []
        assert daemon.stop() == 0, daemon.output()
    assert pool_files(prefix) == [] and not any(psutil.pid_exists(p) and not gone(p) for p in pids)


def test_the_triton_decoder_passes_its_self_test_and_a_compressed_pool_wakes_to_the_raw_pools_tokens(gpu_engine):
    from ksleep.worker import codec_triton

    assert codec_triton.self_test(torch.device("cuda", torch.cuda.current_device()))
    raw = gpu_engine(pool_format="raw")
    baseline = raw.complete(PROMPT, GREEDY).token_ids
    raw.close(remove_pool=True)
    engine = gpu_engine(pool_format="auto", keep_layers=1)
    assert engine.weights.pool_format == "compressed"
    assert engine.weights.pool.nbytes < 0.7 * engine.layout.total_bytes
    assert engine.complete(PROMPT, GREEDY).token_ids == baseline
    for overlap in (True, False, True):
        engine.sleep(1)
        woke = engine.wake(overlap=overlap)
        assert engine.complete(PROMPT, GREEDY).token_ids == baseline
        assert woke.source == "mirror"
