"""Contrastive search: each choice equals the formula computed from full, uncached forwards."""
from __future__ import annotations

import pytest
import torch

from tachy import GenerationConfig, InvalidArgumentError
from tests.decoding.helpers import tiny_engine


@torch.no_grad()
def full_forward(model, ids):
    """Logits [L, V] and final hidden states [L, D] of a whole sequence, no cache reuse."""
    logits, hidden = model(torch.tensor([ids]), torch.arange(len(ids)), model.new_cache(capacity=64),
                           return_hidden=True)
    return logits[0], hidden[0]


def reference_choice(model, ids, alpha, k):
    """argmax over the top-k of (1 - alpha) p(v) - alpha max_j cos(h_v, h_j), every term from scratch."""
    logits, hidden = full_forward(model, ids)
    probs = torch.softmax(logits[-1], -1)
    top_p, top_ids = torch.topk(probs, k)
    scores = []
    for p, v in zip(top_p.tolist(), top_ids.tolist()):
        _, h = full_forward(model, ids + [v])
        cos = torch.nn.functional.cosine_similarity(h[-1][None], h[:-1], dim=-1)
        scores.append((1 - alpha) * p - alpha * float(cos.max()))
    return int(top_ids[max(range(k), key=lambda i: scores[i])]), sorted(scores, reverse=True)


@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.3, 3), (0.9, 5)])
def test_choice_matches_the_formula(alpha, k):
    engine, _ = tiny_engine(seed=2)
    prompt = [5, 17, 33, 8, 60]
    cfg = GenerationConfig(max_new_tokens=8, strategy="contrastive_search",
                           strategy_options=dict(penalty_alpha=alpha, top_k=k), ignore_eos=True)
    ours = [t for s in engine.generate_tokens(prompt, cfg) for t in s.tokens]
    ids, close_calls = list(prompt), 0
    for token in ours:
        expected, scores = reference_choice(engine.model, ids, alpha, k)
        if scores[0] - scores[1] < 1e-5:   # a tie within rounding could go either way
            close_calls += 1
        else:
            assert token == expected
        ids.append(token)
    assert close_calls <= 1


def test_alpha_zero_is_greedy():
    engine, _ = tiny_engine(seed=2)
    prompt = [5, 17, 33, 8, 60]
    greedy = engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=10, drafter=None, ignore_eos=True))
    cs = engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=10, strategy="contrastive_search",
                                                         strategy_options={"penalty_alpha": 0.0}, ignore_eos=True))
    assert [t for s in greedy for t in s.tokens] == [t for s in cs for t in s.tokens]


def test_degeneration_penalty_changes_the_output():
    """The tiny model loops on one token greedily; the penalty breaks the loop."""
    engine, _ = tiny_engine(seed=1)
    prompt = [5, 17, 33, 8]
    cfg = GenerationConfig(max_new_tokens=12, strategy="contrastive_search", ignore_eos=True)
    out = [t for s in engine.generate_tokens(prompt, cfg) for t in s.tokens]
    greedy = [t for s in engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=12, drafter=None,
                                                                         ignore_eos=True)) for t in s.tokens]
    assert len(set(greedy)) <= 2 < len(set(out))


def test_bad_options():
    with pytest.raises(InvalidArgumentError, match="penalty_alpha"):
        GenerationConfig(strategy="contrastive_search", strategy_options={"penalty_alpha": 1.5})
    with pytest.raises(InvalidArgumentError, match="temperature"):
        GenerationConfig(strategy="contrastive_search", temperature=0.7)
