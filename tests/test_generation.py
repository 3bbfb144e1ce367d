"""The token loop on a scripted model: exact control over which ids come out."""
import time

import pytest
import torch

from ksleep.worker import SamplingParams
from ksleep.worker.generation import stream_tokens
from ksleep.worker.synthetic import build_tokenizer

TOKENIZER = build_tokenizer("tiny")  # ids 0-255 are bytes, 511 is <eos>
EOS = frozenset({511})


def scripted(ids):
    """A forward() that makes greedy decoding emit `ids` in order."""
    queue = list(ids)

    def forward(input_ids, prefill):
        logits = torch.zeros(1, 512)
        logits[0, queue.pop(0)] = 1.0
        return logits

    return forward


def run(ids, **params):
    events = list(stream_tokens(scripted(ids), TOKENIZER, [510, 65], SamplingParams(**params), EOS,
                                torch.device("cpu"), time.perf_counter()))
    return events, "".join(e.text for e in events)


def test_multibyte_characters_are_never_split():
    smile = list("😀".encode())  # four bytes, four tokens
    events, text = run([72] + smile + [33], max_tokens=6)
    assert text == "H😀!"
    assert [e.text for e in events] == ["H", "", "", "", "😀", "!"]
    assert events[-1].finish_reason == "length"


def test_eos_ends_the_stream_without_text():
    events, text = run([72, 105, 511, 72], max_tokens=10)
    assert text == "Hi" and len(events) == 3
    assert events[-1].finish_reason == "eos" and events[-1].token_id == 511


def test_ignore_eos_keeps_going():
    events, _ = run([72, 511, 105], max_tokens=3, ignore_eos=True)
    assert [e.token_id for e in events] == [72, 511, 105]


def test_stop_string_cuts_the_text_and_is_not_emitted_in_pieces():
    events, text = run(list(b"ab END cd"), max_tokens=9, stop=("END",))
    assert text == "ab " and events[-1].finish_reason == "stop"
    assert all("E" not in e.text for e in events)


def test_text_held_for_a_possible_stop_is_flushed_at_the_end():
    _, text = run(list(b"xyEN"), max_tokens=4, stop=["END"])
    assert text == "xyEN"


def test_elapsed_times_are_increasing():
    events, _ = run([65, 66, 67], max_tokens=3)
    assert all(a.elapsed <= b.elapsed for a, b in zip(events, events[1:]))


def test_seeded_sampling_is_reproducible():
    def uniform(input_ids, prefill):
        return torch.zeros(1, 512)

    def draw(seed):
        return [e.token_id for e in stream_tokens(uniform, TOKENIZER, [65], SamplingParams(
            max_tokens=8, temperature=1.0, top_k=50, seed=seed, ignore_eos=True), EOS, torch.device("cpu"), 0.0)]

    assert draw(7) == draw(7) and draw(7) != draw(8)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=True),
                                 dict(temperature=float("nan")), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-1), dict(seed=-1), dict(stop=[""])])
def test_bad_sampling_params_are_value_errors(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
