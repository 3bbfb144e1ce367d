"""Turning sampled ids into text and picking them: exact control over which ids come out."""
import time

import pytest
import torch

from ksleep.worker import SamplingParams
from ksleep.worker.generation import TokenWriter
from ksleep.worker.sampler import Sampler
from ksleep.worker.sequence import RequestStream, Sequence
from ksleep.worker.synthetic import build_tokenizer

TOKENIZER = build_tokenizer("tiny")  # ids 0-255 are bytes, 511 is <eos>
EOS = frozenset({511})


def run(ids, **params):
    """The events a request gets when its sampled ids are `ids` (it stops where its writer says it ends)."""
    writer = TokenWriter(TOKENIZER, SamplingParams(**params), EOS, time.perf_counter())
    events = []
    for token in ids:
        events.append(writer.push(token))
        if events[-1].finish_reason:
            break
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


def test_eos_and_max_tokens_are_known_from_the_id_alone():
    writer = TokenWriter(TOKENIZER, SamplingParams(max_tokens=3), EOS, 0.0)
    assert writer.ends(72, 1) is None and writer.ends(511, 1) == "eos" and writer.ends(72, 3) == "length"
    assert TokenWriter(TOKENIZER, SamplingParams(max_tokens=3, ignore_eos=True), EOS, 0.0).ends(511, 2) is None


def test_elapsed_times_are_increasing():
    events, _ = run([65, 66, 67], max_tokens=3)
    assert all(a.elapsed <= b.elapsed for a, b in zip(events, events[1:]))


def sequence(**params):
    return Sequence([65], SamplingParams(**params), None, RequestStream(), torch.device("cpu"))


def test_seeded_sampling_is_reproducible_and_each_row_draws_alone():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.zeros(3, 512)

    def draw(*seeds, steps=8):
        seqs = [sequence(max_tokens=8, temperature=1.0, top_k=50, seed=s) for s in seeds]
        return [sampler.sample(logits[: len(seqs)], list(range(len(seqs))), seqs) for _ in range(steps)]

    alone = draw(7)
    assert alone == draw(7) and alone != draw(8)
    assert [row[1] for row in draw(8, 7)] == [row[0] for row in alone]  # the same draws in another row


def test_greedy_rows_take_the_argmax_and_a_failing_row_fails_alone():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.zeros(3, 512)
    logits[0, 5] = logits[2, 9] = 1.0
    broken = sequence(max_tokens=4, temperature=1.0, seed=1)
    logits[1, 0] = float("nan")
    out = sampler.sample(logits, [0, 1, 2], [sequence(max_tokens=4), broken, sequence(max_tokens=4)])
    assert out[0] == 5 and out[2] == 9 and isinstance(out[1], RuntimeError)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=True),
                                 dict(temperature=float("nan")), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-1), dict(seed=-1), dict(stop=[""])])
def test_bad_sampling_params_are_value_errors(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
