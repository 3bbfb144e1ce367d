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


def test_logprobs_are_the_models_own_with_the_most_likely_alternatives(open_engine):
    import math

    import torch

    engine = open_engine()
    events = list(engine.generate(PROMPT, SamplingParams(max_tokens=6, logprobs=3)))
    plain = greedy(engine, PROMPT, max_tokens=6, ignore_eos=False).token_ids
    assert [e.token_id for e in events] == plain  # asking for logprobs changes no token
    for e in events:
        text, chosen = e.logprob
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][0] == e.token_id  # greedy: the most likely
        assert abs(e.top_logprobs[0][2] - chosen) < 1e-6 and chosen <= 0
        assert [p for _, _, p in e.top_logprobs] == sorted((p for _, _, p in e.top_logprobs), reverse=True)
        assert sum(math.exp(p) for _, _, p in e.top_logprobs) <= 1 + 1e-5
        assert text == engine.tokenizer.decode([e.token_id])
    # the first token's log-probability is the prompt's last position under the model
    ids = torch.tensor([engine.tokenizer(PROMPT).input_ids])
    config = engine.model.config
    batch_attention, config._attn_implementation = config._attn_implementation, "sdpa"  # a plain forward
    try:
        with torch.inference_mode():
            logits = engine.model(input_ids=ids).logits[0, -1].float()
    finally:
        config._attn_implementation = batch_attention
    want = torch.log_softmax(logits, -1)[events[0].token_id].item()
    assert abs(events[0].logprob[1] - want) < 0.05  # (bf16 forward, another attention path: close, not equal)
    assert list(engine.generate(PROMPT, SamplingParams(max_tokens=2)))[0].logprob is None
