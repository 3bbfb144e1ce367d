"""Continuous batching on CPU: many requests share each step's forward; each gets the tokens it would alone."""
import threading
import time

import pytest
import torch

from ksleep.worker import SamplingParams
from ksleep.worker.attention import GatherIndex, _gather_attention
from ksleep.worker.errors import BusyError, ClosedError, DeviceMemoryError, QueueFullError, SleepAbortError
from ksleep.worker.kvcache import CacheSize, ExtentAllocator, KVCache
from ksleep.worker.runner import Batch, ModelRunner

from .conftest import PROMPT

PROMPTS = [PROMPT, "Hello", "Sleep mode frees the GPU between requests", "a", "Ein Satz auf Deutsch.", "1 2 3 4 5"]


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the engine did not get there in time"
        time.sleep(0.005)


def solo(engine, prompt, params):
    return engine.complete(prompt, params).token_ids


def together(engine, jobs):
    """Submit every (prompt, params) at once, then read them all: one batch."""
    streams = [engine.generate(p, params) for p, params in jobs]
    return [[e.token_id for e in s] for s in streams]


def test_requests_submitted_together_share_steps_and_each_gets_its_solo_tokens(open_engine):
    engine = open_engine(dtype="float32")
    jobs = [(p, SamplingParams(max_tokens=12 + 3 * i)) for i, p in enumerate(PROMPTS)]
    alone = [solo(engine, p, params) for p, params in jobs]
    steps = engine.stats().steps
    got = together(engine, jobs)
    assert got == alone
    used = engine.stats().steps - steps
    assert used < sum(len(t) for t in got) / 3, f"{used} steps for {sum(map(len, got))} tokens: not batched"


def test_seeded_sampling_draws_the_same_tokens_in_a_batch_as_alone(open_engine):
    engine = open_engine(dtype="float32")
    jobs = [(p, SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=i)) for i, p in enumerate(PROMPTS)]
    jobs.append((PROMPT, SamplingParams(max_tokens=10)))  # a greedy row among sampling ones
    alone = [solo(engine, p, params) for p, params in jobs]
    assert together(engine, jobs) == alone
    assert alone[0] != alone[1] or alone[1] != alone[2]  # the seeds do draw different tokens


def test_the_same_set_of_requests_gives_the_same_tokens_before_and_after_a_sleep(open_engine):
    engine = open_engine()  # bfloat16: the guarantee for a fixed set of requests holds in any dtype
    jobs = [(p, SamplingParams(max_tokens=16)) for p in PROMPTS]
    before = together(engine, jobs)
    for _ in range(2):
        engine.sleep(1)
        engine.wake(overlap=True)
        assert together(engine, jobs) == before


def test_decode_steps_are_queued_ahead_and_a_stop_found_late_drops_the_extra_token(open_engine):
    engine = open_engine(dtype="float32")
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    text = engine.complete(PROMPT, params).text
    stop = text[10:13]  # a stop string the output reaches mid-way
    jobs = [(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])), ("Hello", params)]
    queued = engine.stats().queued_ahead
    events = [list(s) for s in [engine.generate(p, q) for p, q in jobs]]
    assert engine.stats().queued_ahead - queued > 20  # the decode steps were queued ahead
    engine._pipeline = False  # every step accounted before the next is planned
    serial = [list(s) for s in [engine.generate(p, q) for p, q in jobs]]
    assert [[(e.token_id, e.text, e.finish_reason) for e in run] for run in events] == \
           [[(e.token_id, e.text, e.finish_reason) for e in run] for run in serial]
    assert events[0][-1].finish_reason == "stop" and "".join(e.text for e in events[0]) == text[: text.index(stop)]
    assert len(events[1]) == 30 and engine.kv_cache.extents.used == 0


def test_requests_join_and_leave_mid_batch(open_engine):
    engine = open_engine(dtype="float32")
    long, short = SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=6)
    want_long, want_short = solo(engine, PROMPT, long), solo(engine, "Hello", short)
    first = engine.generate(PROMPT, long)
    head = [next(first).token_id for _ in range(10)]  # running alone for 10 steps
    joined = engine.generate("Hello", short)  # joins the running batch
    cancelled = engine.generate("a", SamplingParams(max_tokens=40))
    next(cancelled)
    cancelled.close()  # leaves at the next step
    assert [e.token_id for e in joined] == want_short
    assert head + [e.token_id for e in first] == want_long
    assert engine.streams == 0 and engine.kv_cache.extents.used == 0  # every extent came back


def test_a_long_prompt_is_fed_in_chunks_while_others_decode(open_engine):
    engine = open_engine(dtype="float32", prefill_chunk=16)
    long_prompt = list(range(1, 121))  # 120 prompt tokens: 8 chunks of 16 minus the decode rows
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    want = [solo(engine, PROMPT, params), solo(engine, long_prompt, SamplingParams(max_tokens=5))]
    decoding = engine.generate(PROMPT, params)
    next(decoding)
    steps = engine.stats().steps
    late = engine.generate(long_prompt, SamplingParams(max_tokens=5))
    assert [e.token_id for e in late] == want[1]
    assert engine.stats().steps - steps >= 120 // 16  # it took several steps: chunks, not one long forward
    assert [want[0][0]] + [e.token_id for e in decoding] == want[0]


def test_a_full_cache_queues_requests_and_serves_them_in_order(open_engine):
    engine = open_engine(kv_cache="40KiB")  # 512 bytes a position: 80 positions, 64 usable: one request at a time
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    want = solo(engine, PROMPT, params)
    streams = [engine.generate(PROMPT, params) for _ in range(5)]
    wait_until(lambda: engine.stats().waiting + engine.stats().running == 5)
    stats = engine.stats()
    assert stats.waiting >= 1 and stats.running < 5
    assert [[e.token_id for e in s] for s in streams] == [want] * 5


def test_no_device_memory_for_a_requests_extent_fails_that_request_alone(open_engine):
    engine = open_engine()
    want = solo(engine, PROMPT, SamplingParams(max_tokens=6))
    mapped = []

    def no_room(lo: int, hi: int) -> None:
        mapped.append((lo, hi))
        raise DeviceMemoryError(f"no room on the device for KV cache bytes {lo:,}-{hi:,}")

    backing, engine.kv_cache.backing = engine.kv_cache.backing, no_room
    try:
        refused = engine.generate(PROMPT, SamplingParams(max_tokens=6))
        with pytest.raises(DeviceMemoryError, match="KV cache bytes"):
            list(refused)
    finally:
        engine.kv_cache.backing = backing
    lo, hi = mapped[0]
    assert hi - lo >= (len(engine.encode(PROMPT, 1)) + 7) * engine.kv_cache.position_bytes
    assert engine.kv_cache.extents.used == 0 and engine.streams == 0  # nothing half-reserved
    assert solo(engine, PROMPT, SamplingParams(max_tokens=6)) == want  # and the engine keeps serving


def test_a_sleep_reports_where_its_time_went(open_engine):
    engine = open_engine()
    result = engine.sleep(1)
    assert {"settle", "release_kv_cache", "release_weights"} <= set(result.phases)
    assert sum(result.phases.values()) <= result.seconds + 1e-6
    assert result.to_pb().phases["release_weights"] == pytest.approx(result.phases["release_weights"])
    engine.wake()


def test_the_cache_is_position_major_so_an_extent_is_one_byte_range():
    cache = KVCache(3, 2, 4, 64, torch.float32)
    block = torch.zeros(cache.nbytes, dtype=torch.uint8)
    cache.bind(block)
    for layer in range(3):
        for t in (cache.keys[layer], cache.values[layer]):
            assert t.shape == (64, 2, 4)
            t[20:30].fill_(1.0)  # positions 20..29 of every layer, keys and values
    touched = (block.view(torch.float32) != 0).nonzero().flatten()
    per = cache.position_bytes // 4
    assert (touched.min().item(), touched.max().item()) == (20 * per, 30 * per - 1)
    assert len(touched) == 10 * per  # exactly those positions' bytes: one range


def test_a_request_that_can_never_fit_is_refused_at_once_with_its_size_and_the_limit(open_engine):
    engine = open_engine(kv_cache="40KiB")
    limit = engine.kv_cache.usable_tokens
    with pytest.raises(ValueError, match=rf"needs {len(engine.encode(PROMPT, 1)) + limit + 1} KV cache positions .* holds at most {limit}"):
        engine.generate(PROMPT, SamplingParams(max_tokens=limit))
    assert engine.streams == 0 and len(solo(engine, PROMPT, SamplingParams(max_tokens=4))) == 4


def test_beyond_the_queue_bound_requests_are_refused(open_engine):
    engine = open_engine(max_batch=1, max_queue=2)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    running = engine.generate(PROMPT, params)
    next(running)  # admitted: the batch (of one) is full
    queued = [engine.generate(PROMPT, params) for _ in range(2)]
    wait_until(lambda: engine.stats().waiting == 2)
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.generate(PROMPT, params)
    for stream in [running, *queued]:
        assert list(stream)[-1].finish_reason == "length"


def test_a_bad_request_in_a_batch_fails_alone(open_engine, monkeypatch):
    engine = open_engine(dtype="float32")
    good = SamplingParams(max_tokens=12)
    want = solo(engine, PROMPT, good)
    with pytest.raises(ValueError):
        engine.generate(PROMPT, SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate("x" * 300, good)
    broken = engine.generate(PROMPT, SamplingParams(max_tokens=200, temperature=0.7, seed=3, ignore_eos=True))
    next(broken)
    (seq,) = [s for s in engine.scheduler.running if s.stream is broken]

    def failing_warpers(ids, scores):
        raise RuntimeError("this row's sampling broke")

    monkeypatch.setattr(seq, "warpers", failing_warpers)  # from its next step on, its row fails
    streams = [engine.generate(PROMPT, good), engine.generate(PROMPT, good)]
    with pytest.raises(RuntimeError, match="sampling broke"):
        list(broken)
    assert [[e.token_id for e in s] for s in streams] == [want, want]
    assert engine.streams == 0


def test_a_request_whose_text_fails_fails_alone_and_a_failing_step_fails_only_its_batch(open_engine, monkeypatch):
    engine = open_engine(dtype="float32")
    broken = engine.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    next(broken)
    (seq,) = engine.scheduler.running

    class FailingWriter:
        def ends(self, token, count):
            return None

        def push(self, token, now=None):
            raise ValueError("this request's text cannot be decoded")

    monkeypatch.setattr(seq, "writer", FailingWriter())
    short = engine.generate("Hello", SamplingParams(max_tokens=1))  # ends in the step where the other one fails
    with pytest.raises(ValueError, match="cannot be decoded"):
        list(broken)
    assert len(list(short)) == 1 and engine.streams == 0
    running = engine.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    next(running)
    collect = engine.sampler.collect
    monkeypatch.setattr(engine.sampler, "collect", lambda drawn: (_ for _ in ()).throw(RuntimeError("a step broke")))
    with pytest.raises(RuntimeError, match="a step broke"):
        list(running)
    monkeypatch.setattr(engine.sampler, "collect", collect)
    assert len(solo(engine, PROMPT, SamplingParams(max_tokens=5))) == 5  # the engine serves on
    assert engine.kv_cache.extents.used == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is made to die
def test_no_reader_is_left_waiting_when_a_stream_is_closed_or_the_engine_thread_ends(open_engine, monkeypatch):
    engine = open_engine(max_batch=1)  # one request at a time
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    first = engine.generate(PROMPT, params)
    next(first)
    queued = engine.generate(PROMPT, params)  # waits for the batch slot: no token comes
    ended = []
    reader = threading.Thread(target=lambda: ended.append(list(queued)))
    reader.start()
    time.sleep(0.1)
    queued.close()  # from another thread than the reader's
    reader.join(5)
    assert ended == [[]]
    list(first)

    def thread_dies():
        raise SystemExit("the engine thread ends")

    waiting = engine.generate(PROMPT, params)
    next(waiting)
    monkeypatch.setattr(engine, "_iterate", thread_dies)
    with pytest.raises(ClosedError):
        list(waiting)


def test_sleep_waits_for_the_batch_or_aborts_it(open_engine):
    engine = open_engine()
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    streams = [engine.generate(p, params) for p in PROMPTS[:3]]
    next(streams[0])
    with pytest.raises(BusyError, match="3 generation"):
        engine.sleep(1)  # WAIT: refused while the batch runs; the requests go on
    assert all(list(s)[-1].finish_reason == "length" for s in streams[1:])
    streams = [engine.generate(p, params) for p in PROMPTS[:3]]
    next(streams[0])
    result = engine.sleep(1, abort=True)  # ABORT: between two steps, every request ends
    assert result.bytes_freed > 0 and engine.state.value == "asleep"
    for stream in streams:
        with pytest.raises(SleepAbortError):
            list(stream)
    engine.wake()
    assert engine.streams == 0 and engine.kv_cache.extents.used == 0


def test_a_wake_holds_its_first_step_for_the_requests_on_their_way(open_engine):
    engine = open_engine(dtype="float32")
    params = SamplingParams(max_tokens=4)
    want = [solo(engine, p, params) for p in PROMPTS]
    engine.sleep(1)
    engine.wake(overlap=True, waiting=len(PROMPTS))
    steps = engine.stats().steps
    streams = []
    for p in PROMPTS:  # arriving one by one after the wake
        streams.append(engine.generate(p, params))
        time.sleep(0.002)
    assert [[e.token_id for e in s] for s in streams] == want
    assert engine.stats().steps - steps == 4  # the first step prefilled them all together


def test_concurrent_threads_and_the_embedded_model(open_engine):
    pytest.importorskip("gguf")
    engine = open_engine("smollm2-135m", dtype="float32")
    params = SamplingParams(max_tokens=20)
    want = [solo(engine, p, params) for p in PROMPTS]
    results = [None] * len(PROMPTS)

    def run(i):
        results[i] = solo(engine, PROMPTS[i], params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == want
    assert together(engine, [(p, params) for p in PROMPTS]) == want


# -- the parts --------------------------------------------------------------------------------------------------
def test_extents_are_first_fit_and_merge_when_released():
    extents = ExtentAllocator(256, reserved=16)
    a, b, c = extents.reserve(20), extents.reserve(40), extents.reserve(100)
    assert (a, b, c) == (16, 48, 96) and extents.reserve(100) is None  # 60 left, in one piece
    extents.release(b)
    assert extents.reserve(33) == 48 and extents.used == 32 + 48 + 112
    extents.release(a)
    extents.release(48)
    assert extents.largest_free == 80  # 16..96 merged
    extents.release(c)
    assert extents.free == 240 and extents.largest_free == 240 and extents.used == 0


@pytest.mark.parametrize(("text", "fraction", "nbytes"), [("auto", None, None), ("0.25", 0.25, None),
                                                          ("8GiB", None, 8 << 30), ("1000", None, 1000)])
def test_cache_sizes_parse(text, fraction, nbytes):
    assert CacheSize.parse(text) == CacheSize(fraction, nbytes)


@pytest.mark.parametrize("text", ["1.5", "-2", "lots", "0", "3 parsecs"])
def test_bad_cache_sizes_are_refused(text):
    with pytest.raises(ValueError, match="kv_cache"):
        CacheSize.parse(text)


def test_gather_attention_matches_dense_attention_per_sequence_with_a_sliding_window():
    torch.manual_seed(0)
    heads, kv, dim = 4, 2, 8
    cache = KVCache.standalone(1, kv, dim, 128, torch.float32, torch.device("cpu"))
    cache.keys[0].normal_()
    cache.values[0].normal_()
    q_lens, kv_lens, starts = [3, 1, 5], [10, 7, 5], [16, 40, 80]
    q = torch.randn(sum(q_lens), heads, dim)
    cu = torch.tensor([0, 3, 4, 9])
    index = GatherIndex.build(cu[:-1], torch.tensor(q_lens), torch.tensor(starts), torch.tensor(kv_lens), 5, 10)
    for window in (None, 4):
        out = _gather_attention(q, cache.keys[0], cache.values[0], index, dim**-0.5, window)
        for s, (n, length, start) in enumerate(zip(q_lens, kv_lens, starts)):
            k = cache.keys[0][start: start + length].repeat_interleave(heads // kv, 1).transpose(0, 1)
            v = cache.values[0][start: start + length].repeat_interleave(heads // kv, 1).transpose(0, 1)
            pos = torch.arange(length - n, length)[:, None]
            allowed = torch.arange(length)[None] <= pos
            if window:
                allowed &= torch.arange(length)[None] > pos - window
            want = torch.nn.functional.scaled_dot_product_attention(
                q[cu[s]: cu[s + 1]].transpose(0, 1), k, v, attn_mask=allowed, scale=dim**-0.5)
            torch.testing.assert_close(out[cu[s]: cu[s + 1]], want.transpose(0, 1))


def test_the_runner_picks_the_smallest_graph_that_holds_a_step():
    runner = ModelRunner.__new__(ModelRunner)
    runner.seq_sizes, runner.token_sizes = (1, 2, 4, 8, 9), (1, 2, 4, 8, 16, 32)  # what sizes_up_to gives
    decode = Batch([1] * 3, [0] * 3, [0] * 3, [1] * 3, [0] * 3, [1] * 3)
    assert runner._graph_shape(decode) == (4, 4, True)
    mixed = Batch([1] * 12, [0] * 12, [0] * 12, [10, 1, 1], [0] * 3, [1] * 3)
    assert runner._graph_shape(mixed) == (16, 4, False)  # 3 sequences and one of padding tokens
    exact = Batch([1] * 16, [0] * 16, [0] * 16, [8, 8], [0] * 2, [1] * 2)
    assert runner._graph_shape(exact) == (16, 2, False)  # no padding token: no padding sequence
    assert runner._graph_shape(Batch([1] * 40, [0] * 40, [0] * 40, [40], [0], [40])) is None  # too long: eager
    assert runner._graph_shape(Batch([1] * 10, [0] * 10, [0] * 10, [1] * 10, [0] * 10, [1] * 10)) is None

