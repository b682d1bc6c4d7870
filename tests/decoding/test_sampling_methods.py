"""Mirostat, FSD and MBR: each does what its definition says."""
from __future__ import annotations

import math

import pytest
import torch

from tachy import GenerationConfig, InvalidArgumentError, UnknownNameError
from tachy.decoding import anti_ngram_probs, make_strategy, ngram_f1
from tachy.decoding.mbr import mbr_select
from tachy.decoding.mirostat import MirostatProcessor
from tachy.sampling import SamplingConfig, make_probs_fn
from tests.decoding.helpers import tiny_engine


def tokens(engine, prompt, **kw):
    return [t for s in engine.generate_tokens(prompt, GenerationConfig(**kw)) for t in s.tokens]


# ---- mirostat ---------------------------------------------------------------------------------------------------
def test_mirostat_update_rule():
    """mu starts at 2 tau; tokens above mu bits are dropped; mu -= eta (observed surprise - tau)."""
    proc = MirostatProcessor(tau=1.5, eta=0.5, probs_fn=make_probs_fn(SamplingConfig(temperature=1.0)))
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))   # surprises 1, 2, 3, 4, 4 bits
    out = proc(logits, [9])                        # mu = 3: the 4-bit tokens go
    assert torch.isinf(out[0, 3:]).all() and not torch.isinf(out[0, :3]).any()
    proc(logits, [9, 2])                           # token 2 was drawn from the renormalized 3 tokens
    s = -math.log2(0.125 / 0.875)
    assert proc.surprises == [pytest.approx(s)]
    assert proc.mu == pytest.approx(3.0 - 0.5 * (s - 1.5))


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_mirostat_holds_the_target_surprise(tau):
    """Over a long sample the mean observed surprise settles near tau (the model's own entropy is ~6 bits)."""
    engine, _ = tiny_engine(seed=6, max_seq_len=512)
    strategy = make_strategy("mirostat", tau=tau, eta=0.2)
    cfg = GenerationConfig(max_new_tokens=300, temperature=1.0, seed=1, strategy=strategy, ignore_eos=True)
    list(engine.generate_tokens([5, 17, 33, 8], cfg))
    late = strategy.last_processor.surprises[50:]
    assert abs(sum(late) / len(late) - tau) < 0.35


def test_mirostat_bad_combinations():
    with pytest.raises(InvalidArgumentError, match="temperature"):
        GenerationConfig(strategy="mirostat")
    with pytest.raises(InvalidArgumentError, match="drafter"):
        GenerationConfig(strategy="mirostat", temperature=1.0, drafter="pld")
    assert GenerationConfig(strategy="mirostat", temperature=1.0).drafter is None


# ---- FSD --------------------------------------------------------------------------------------------------------
def test_anti_ngram_backoff():
    ctx = [1, 2, 3, 1, 2, 4, 1, 2]
    # trigram history (1, 2) was followed by 3 and 4 -> 1/2 each
    assert anti_ngram_probs(ctx, 3, 6).tolist() == [0, 0, 0, 0.5, 0.5, 0]
    # history (2, 9) never seen before, nor (9,): order 0, the unigram frequencies of the prefix
    uni = anti_ngram_probs([1, 2, 9], 3, 10)
    assert uni[[1, 2, 9]].tolist() == pytest.approx([1 / 3] * 3) and uni.sum() == pytest.approx(1.0)
    assert anti_ngram_probs([], 3, 4).sum() == 0


def test_fsd_score_formula():
    engine, _ = tiny_engine(seed=1)
    strategy = make_strategy("fsd", alpha=0.4, n=2, top_k=3)
    proc = strategy.processor(engine, GenerationConfig(strategy=strategy), [])
    logits = torch.randn(2, 101)
    contexts = [[5, 6, 5, 7, 5], [1, 2]]
    out = proc(logits, contexts)
    for r, ctx in enumerate(contexts):
        p = torch.softmax(logits[r], -1)
        top = torch.topk(p, 3).indices
        expected = 0.6 * p[top] - 0.4 * anti_ngram_probs(ctx, 2, 101)[top]
        assert torch.allclose(out[r, top], expected)
        assert torch.isinf(out[r]).sum() == 101 - 3


def test_fsd_breaks_loops_and_stays_exact_under_speculation():
    engine, _ = tiny_engine(seed=1)
    prompt = [5, 17, 33, 8]
    greedy = tokens(engine, prompt, max_new_tokens=20, drafter=None, ignore_eos=True)
    fsd = tokens(engine, prompt, max_new_tokens=20, drafter=None, strategy="fsd", ignore_eos=True)
    assert len(set(fsd)) > len(set(greedy))
    assert fsd == tokens(engine, prompt, max_new_tokens=20, drafter="pld", strategy="fsd", ignore_eos=True)
    zero = tokens(engine, prompt, max_new_tokens=20, drafter=None, strategy="fsd",
                  strategy_options={"alpha": 0.0}, ignore_eos=True)
    assert zero == greedy


# ---- MBR --------------------------------------------------------------------------------------------------------
def test_ngram_f1():
    assert ngram_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert ngram_f1([1, 2], [3, 4]) == 0.0
    # unigram F1 2*1/(2+2) = 0.5, bigram 0 -> mean 0.25 (orders 3, 4 exist on neither side)
    assert ngram_f1([1, 2], [1, 5]) == pytest.approx(0.25)


def test_mbr_select_by_hand():
    samples = [[1, 2, 3], [1, 2, 4], [7, 8, 9], [1, 2, 3]]
    u = lambda a, b: float(sum(x == y for x, y in zip(a, b)))   # noqa: E731
    best, means = mbr_select(samples, u)
    assert means == pytest.approx([(2 + 0 + 3) / 3, (2 + 0 + 2) / 3, 0.0, (3 + 2 + 0) / 3])
    assert best == 0   # tie with sample 3 goes to the earlier one


def test_mbr_strategy_returns_the_highest_expected_utility_sample():
    engine, _ = tiny_engine(seed=1, eos=(43,))
    strategy = make_strategy("mbr", num_samples=6)
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=3, strategy=strategy)
    out = [t for s in engine.generate_tokens([5, 17, 33, 8], cfg) for t in s.tokens]
    samples = strategy.last_samples
    assert len(samples) == 6 and len({tuple(s) for s in samples}) > 1
    expected = max(range(6), key=lambda i: (sum(ngram_f1(samples[i], samples[j]) for j in range(6) if j != i), -i))
    assert out == samples[expected]
    # the samples are exactly what plain sampling with seeds 3..8 gives (a sample ends at its EOS, which
    # generate_tokens does not stop at)
    for i, s in enumerate(samples):
        plain = tokens(engine, [5, 17, 33, 8], max_new_tokens=10, temperature=1.0, seed=3 + i)
        assert plain[:len(s)] == s and (len(s) == len(plain) or s[-1] == 43)


def test_mbr_custom_utility_and_bad_input():
    engine, _ = tiny_engine(seed=1)
    longest = make_strategy("mbr", num_samples=3, utility=lambda a, b: float(len(a)))
    list(engine.generate_tokens([5, 17], GenerationConfig(max_new_tokens=5, temperature=1.0, seed=0,
                                                          strategy=longest)))
    with pytest.raises(UnknownNameError, match="ngram_f1"):
        make_strategy("mbr", utility="bleurt")
    with pytest.raises(InvalidArgumentError, match="temperature"):
        GenerationConfig(strategy="mbr")
