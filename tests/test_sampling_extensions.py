"""vLLM's sampling extensions: min_tokens, stop_token_ids, repetition_penalty, max_completion_tokens (CPU)."""
import pytest

from ksleep.worker import SamplingParams
from ksleep.worker.errors import ValidationError

from .conftest import PROMPT


def greedy(engine, prompt, **kw):
    return engine.complete(prompt, SamplingParams(**{"max_tokens": 12, "ignore_eos": True, **kw}))


def test_stop_token_ids_end_the_output_and_min_tokens_holds_them_back(open_engine):
    engine = open_engine()
    base = greedy(engine, PROMPT).token_ids
    stop = base[2]
    stopped = greedy(engine, PROMPT, stop_token_ids=[stop])
    first = base.index(stop)
    assert stopped.token_ids == base[:first + 1] and stopped.finish_reason == "stop"
    held = greedy(engine, PROMPT, stop_token_ids=[stop], min_tokens=6).token_ids
    assert stop not in held[:6] and held[:first] == base[:first]  # banned until 6 tokens are out
    # after min_tokens the draws are plain greedy again, pipelined steps included: the same continuation as a
    # request whose prompt already holds the first six tokens
    prompt_ids = engine.tokenizer(PROMPT).input_ids
    rest = greedy(engine, prompt_ids + held[:6], max_tokens=len(held) - 6, stop_token_ids=[stop]).token_ids
    assert held[6:] == rest[:len(held) - 6]


def test_repetition_penalty_pushes_towards_or_away_from_the_tokens_seen(open_engine):
    engine = open_engine()
    prompt_ids = set(engine.tokenizer(PROMPT).input_ids)
    towards = greedy(engine, PROMPT, repetition_penalty=0.01).token_ids
    assert all(t in prompt_ids or t in towards[:i] for i, t in enumerate(towards))
    away = greedy(engine, PROMPT, repetition_penalty=50.0).token_ids
    assert not prompt_ids & set(away) and len(set(away)) == len(away)
    assert greedy(engine, PROMPT, repetition_penalty=50.0).token_ids == away  # deterministic
    assert greedy(engine, PROMPT).token_ids != away


@pytest.mark.parametrize("bad", [dict(min_tokens=13), dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")),
                                 dict(stop_token_ids=[-1]), dict(stop_token_ids=list(range(65)))])
def test_bad_extension_values_are_validation_errors(bad):
    with pytest.raises(ValidationError):
        SamplingParams(max_tokens=12, **bad)
