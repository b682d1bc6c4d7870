"""Beam search: exhaustive optimality on an enumerable model, transformers parity, patience, diversity."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from tachy import GenerationConfig, InvalidArgumentError
from tachy.decoding import make_strategy
from tests.decoding.helpers import tiny_engine


def beam_tokens(engine, prompt, max_new, **options):
    cfg = GenerationConfig(max_new_tokens=max_new, strategy=options.pop("strategy", "beam"),
                           strategy_options=options, ignore_eos=options.pop("ignore_eos", False))
    steps = list(engine.generate_tokens(prompt, cfg))
    assert len(steps) == 1
    return steps[0].tokens, cfg.decoding


@torch.no_grad()
def sequence_logprob(model, prompt, tokens) -> float:
    ids = torch.tensor([prompt + tokens])
    logits = model(ids, torch.arange(ids.shape[1]), model.new_cache(capacity=64))[0]
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def test_beam_search_finds_the_best_sequence_among_all():
    """Vocabulary 6, 3 new tokens: 216 sequences. With beams >= 6^2 no prefix is ever dropped, so the answer is
    the argmax of the summed log-probability over all 216 (length_penalty 0, no EOS)."""
    engine, _ = tiny_engine(seed=3, vocab_size=6)
    prompt = [1, 4, 2]
    best = max(itertools.product(range(6), repeat=3), key=lambda s: sequence_logprob(engine.model, prompt, list(s)))
    ours, strategy = beam_tokens(engine, prompt, 3, num_beams=36, length_penalty=0.0, ignore_eos=True)
    assert ours == list(best)
    top_score = strategy.last_hypotheses[0][0]
    assert math.isclose(top_score, sequence_logprob(engine.model, prompt, ours), abs_tol=1e-4)
    # a narrow beam is allowed to miss it, but never scores above the true optimum
    narrow, _ = beam_tokens(engine, prompt, 3, num_beams=2, length_penalty=0.0, ignore_eos=True)
    assert sequence_logprob(engine.model, prompt, narrow) <= sequence_logprob(engine.model, prompt, ours) + 1e-6


CASES = [dict(num_beams=4), dict(num_beams=3, length_penalty=0.0, early_stopping=True),
         dict(num_beams=4, early_stopping="never", length_penalty=2.0), dict(num_beams=2, length_penalty=-1.0)]


@pytest.mark.parametrize("eos", [(43,), (66, 43), (7,)])
def test_beam_search_matches_transformers(eos):
    """Token-identical to transformers' beam search on tiny random models, with EOS tokens the model does
    emit (43, 66), so finished hypotheses, length penalties and every early-stopping rule are exercised."""
    ended = 0
    for seed in range(3):
        engine, hf = tiny_engine(seed=seed, eos=eos)
        for prompt in ([5, 17, 33, 8], [90, 2, 2, 61, 11, 40]):
            for opts in CASES:
                ours, _ = beam_tokens(engine, prompt, 10, **dict(opts))
                ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=list(eos),
                                  pad_token_id=0, **opts)[0, len(prompt):].tolist()
                assert ours == ref[:len(ours)] and all(t == 0 for t in ref[len(ours):]), (seed, prompt, opts)
                ended += ours[-1] in eos
    if eos != (7,):
        assert ended > 0   # the EOS paths really ran


def test_patience_waits_for_more_finished_hypotheses():
    """patience p keeps round(p * num_beams) finished hypotheses: with early stopping the search runs until
    that many ended, so p > 1 explores at least as long and can only find a better-or-equal best score."""
    engine, _ = tiny_engine(seed=0, eos=(8,))    # 8 is this model's favourite token: beams end often
    prompt = [5, 17, 33, 8]
    base, s1 = beam_tokens(engine, prompt, 16, num_beams=2, early_stopping=True)
    more, s2 = beam_tokens(engine, prompt, 16, num_beams=2, early_stopping=True, patience=3.0)
    assert len(s1.last_hypotheses) <= 2 and len(s2.last_hypotheses) <= 6
    assert len(s2.last_hypotheses) > len(s1.last_hypotheses)
    assert s2.last_hypotheses[0][0] >= s1.last_hypotheses[0][0]


def test_diverse_beam_penalty_follows_the_definition():
    """Two groups of one beam, one step: group 0 takes the argmax; group 1 takes the argmax of
    log p - diversity_penalty * [token chosen by group 0]. A huge penalty forces different first tokens."""
    engine, _ = tiny_engine(seed=1)
    prompt = [5, 17, 33, 8]
    model = engine.model
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(4), model.new_cache())[0, -1]
    logp = torch.log_softmax(logits, -1)
    first = int(logp.argmax())
    for penalty in (0.0, 0.5, 1e4):
        strategy = make_strategy("diverse_beam", num_beams=2, num_beam_groups=2, diversity_penalty=penalty,
                                 length_penalty=0.0)
        cfg = GenerationConfig(max_new_tokens=1, strategy=strategy, ignore_eos=True)
        list(engine.generate_tokens(prompt, cfg))
        firsts = sorted((h[1][0], h[0]) for h in strategy.last_hypotheses)
        adjusted = logp - penalty * torch.nn.functional.one_hot(torch.tensor(first), logp.shape[0])
        second = int(adjusted.argmax())
        expected = sorted([(first, float(logp[first])), (second, float(adjusted[second]))])
        assert [t for t, _ in firsts] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(firsts, expected):
            assert math.isclose(a, b, abs_tol=1e-5)
        if penalty > 100:
            assert first != second


def test_diverse_beam_outputs_differ_across_groups():
    engine, _ = tiny_engine(seed=1)
    strategy = make_strategy("diverse_beam", num_beams=4, num_beam_groups=4, diversity_penalty=5.0)
    list(engine.generate_tokens([5, 17, 33, 8], GenerationConfig(max_new_tokens=6, strategy=strategy)))
    firsts = [h[1][0] for h in strategy.last_hypotheses]
    assert len(set(firsts)) == len(firsts) == 4


def test_beam_streaming_gives_the_answer_in_one_piece():
    engine, _ = tiny_engine(seed=1, eos=(43,))
    cfg = GenerationConfig(max_new_tokens=8, strategy="beam", strategy_options={"num_beams": 3})
    tokens, _ = beam_tokens(engine, [5, 17, 33, 8], 8, num_beams=3)
    assert len(list(engine.generate_tokens([5, 17, 33, 8], cfg))) == 1
    assert tokens


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=0), "num_beams"), (dict(num_beams=4, num_beam_groups=3), "divide"),
    (dict(early_stopping="sometimes"), "early_stopping"), (dict(patience=0), "patience"),
    (dict(beams=4), "no option beams"),
])
def test_bad_beam_options(options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GenerationConfig(strategy="beam", strategy_options=options)


def test_beam_search_wider_than_memory_is_refused_before_allocating():
    engine, _ = tiny_engine(seed=1)
    cfg = GenerationConfig(max_new_tokens=8, strategy="beam", strategy_options={"num_beams": 10**12})
    with pytest.raises(InvalidArgumentError, match=r"num_beams=1000000000000 needs about .* GiB"):
        list(engine.generate_tokens([5, 17, 33, 8], cfg))
    cfg = GenerationConfig(max_new_tokens=4, strategy="beam", strategy_options={"num_beams": 64})
    assert len(list(engine.generate_tokens([5, 17, 33, 8], cfg))) == 1   # a wide search that fits still runs


def test_beam_rejects_sampling_and_explicit_drafters():
    with pytest.raises(InvalidArgumentError, match="temperature"):
        GenerationConfig(strategy="beam", temperature=0.8)
    with pytest.raises(InvalidArgumentError, match="drafter"):
        GenerationConfig(strategy="beam", drafter="pld")
    assert GenerationConfig(strategy="beam").drafter is None   # the default drafter is simply not used


def test_beam_search_matches_transformers_on_gemma3_past_its_sliding_window():
    """Gemma 3's local layers (window 8) with a 12-token prompt: beams batch through the sliding-window masks."""
    for seed in range(2):
        engine, hf = tiny_engine(seed=seed, eos=(12,), arch="gemma3")
        prompt = list(range(5, 17))
        for opts in CASES[:2]:
            ours, _ = beam_tokens(engine, prompt, 8, **dict(opts))
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[12],
                              pad_token_id=0, **opts)[0, len(prompt):].tolist()
            assert ours == ref[:len(ours)] and all(t == 0 for t in ref[len(ours):]), (seed, opts, ours, ref)
