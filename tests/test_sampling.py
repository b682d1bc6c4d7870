"""SamplingConfig validation, penalties (HF / OpenAI semantics), the sampling distribution, seeded sampling."""
from __future__ import annotations

import math

import pytest
import torch

from tachy.errors import InvalidArgumentError
from tachy.sampling import (SamplingConfig, apply_penalties_tree, make_generator, make_logits_processor,
                            make_probs_fn, sample)
from tachy.speculative.tree import DraftTree


def probs_of(values: list[float], **cfg) -> list[float]:
    """Run make_probs_fn on logits = log(values) at temperature 1."""
    logits = torch.tensor([values]).log()
    return make_probs_fn(SamplingConfig(temperature=1.0, **cfg))(logits)[0].tolist()


# ------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("inf")), dict(temperature=float("nan")),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=1.0),
    dict(typical_p=0.0), dict(typical_p=1.2), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    dict(repetition_penalty=4.75e-221), dict(repetition_penalty=1e5),
    dict(presence_penalty=float("inf")), dict(frequency_penalty=float("nan")), dict(temperature="hot"),
    dict(seed=1.5), dict(logit_bias={3: 100.5}), dict(logit_bias={3: float("nan")}), dict(logit_bias={-1: 1.0}),
    dict(logit_bias={"3": 1.0}), dict(logit_bias={True: 1.0}), dict(logit_bias=[(3, 1.0)]),
])
def test_invalid_config_raises(kwargs):
    with pytest.raises(InvalidArgumentError) as err:
        SamplingConfig(**kwargs)
    assert next(iter(kwargs)) in str(err.value)


def test_config_defaults_and_greedy():
    cfg = SamplingConfig()
    assert cfg.greedy and not cfg.has_penalties
    assert not SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=3).greedy
    assert SamplingConfig(top_p=1, temperature=1).top_p == 1.0  # ints accepted, stored as floats


# ------------------------------------------------------------------------------------------ penalties

def test_no_penalties_means_no_processor():
    assert make_logits_processor(SamplingConfig(temperature=0.8, top_k=5)) is None


def test_logit_bias_moves_the_listed_tokens_after_the_penalties():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    process = make_logits_processor(SamplingConfig(logit_bias={0: 100, 3: -100, 1: 0.5}))
    out = process(logits, [[], []])
    assert out.tolist() == [[101.0, 2.5, 3.0, -96.0], [100.0, 0.5, 0.0, -100.0]] and logits[0, 0] == 1.0
    both = make_logits_processor(SamplingConfig(repetition_penalty=2.0, logit_bias={2: 1.0}))
    assert both(logits[:1], [2]).tolist() == [[1.0, 2.0, 2.5, 4.0]]   # 3 / 2 (penalty), then + 1 (bias)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        make_logits_processor(SamplingConfig(logit_bias={4: 1.0}))(logits, [[], []])


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    out = make_logits_processor(SamplingConfig(repetition_penalty=2.0))(logits, torch.tensor([0, 1, 1, 3]))
    # seen tokens 0, 1, 3: positive logits divided, negative ones multiplied; repeats count once
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 4.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, -3.0, 4.0]]  # input untouched


def test_repetition_penalty_matches_transformers():
    hf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 12))
    for penalty in (0.7, 1.3):
        expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        process = make_logits_processor(SamplingConfig(repetition_penalty=penalty))
        assert torch.allclose(process(logits, ids), expected)  # [N, L] tensor: one context per row
        assert torch.allclose(process(logits, list(ids)), expected)


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)
    out = make_logits_processor(cfg)(logits, [2, 2, 2, 0, 7])  # 7 is outside the vocabulary: ignored
    assert out.tolist() == [[-0.75, 0.0, -1.25, 0.0]]


def test_penalties_per_tree_node():
    tree = DraftTree([1, 2, 3], [-1, 0, -1])
    committed = torch.tensor([0, 0])
    logits = torch.ones(4, 5)
    cfg = SamplingConfig(repetition_penalty=2.0, frequency_penalty=0.1)
    out = make_logits_processor(cfg)(logits, tree.row_contexts(committed))
    for row, ctx in enumerate([[0, 0], [0, 0, 1], [0, 0, 1, 2], [0, 0, 3]]):
        expected = make_logits_processor(cfg)(logits[row: row + 1], torch.tensor(ctx))
        assert torch.allclose(out[row: row + 1], expected)
    assert torch.allclose(apply_penalties_tree(logits, tree.row_contexts(committed), cfg), out)
    # a shared context applies to every row
    shared = make_logits_processor(cfg)(logits, committed)
    assert torch.allclose(shared, make_logits_processor(cfg)(logits, [committed] * 4))


# -------------------------------------------------------------------------------------- probabilities

def test_temperature():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    got = make_probs_fn(SamplingConfig(temperature=0.5))(logits)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.softmax(logits / 0.5, -1))


def test_tiny_temperature_gives_the_argmax_not_nan():
    """logits / 1e-300 overflows to inf - inf = NaN unless the logits are shifted by their max first."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [-5.0, 7.5, 7.0]])
    for temperature in (1e-300, 1e-40):
        got = make_probs_fn(SamplingConfig(temperature=temperature, top_p=0.9, min_p=0.1))(logits)
        assert not got.isnan().any()
        assert torch.equal(got, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_greedy_probs_are_one_hot():
    got = make_probs_fn(SamplingConfig())(torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 1.0]]))
    assert got.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_top_k():
    assert probs_of([0.1, 0.2, 0.3, 0.4], top_k=2) == pytest.approx([0, 0, 3 / 7, 4 / 7])
    assert probs_of([0.1, 0.2, 0.3, 0.4], top_k=4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert probs_of([0.1, 0.2, 0.3, 0.4], top_k=10) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_top_p():
    p = [0.15, 0.5, 0.05, 0.3]
    assert probs_of(p, top_p=0.7) == pytest.approx([0, 0.625, 0, 0.375])  # 0.5 < 0.7 <= 0.8
    assert probs_of(p, top_p=0.9) == pytest.approx([0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95])
    assert probs_of(p, top_p=0.01) == pytest.approx([0, 1, 0, 0])  # always keeps the top token
    assert probs_of(p, top_p=1e-300) == pytest.approx([0, 1, 0, 0])  # 0 in float32: still the top token
    assert probs_of([0.001] * 300 + [0.7], top_p=1e-300)[-1] == pytest.approx(1.0)   # the 256-candidate path
    # top-p acts on the top-k renormalized distribution: [.5 .3 .15] / .95, mass before .15 is .842
    assert probs_of(p, top_k=3, top_p=0.8) == pytest.approx([0, 0.625, 0, 0.375])
    assert probs_of(p, top_k=3, top_p=0.85) == pytest.approx([0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95])


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])  # flat rows: nucleus > 256 tokens (full sort); peaked: not
def test_top_p_large_vocab(scale):
    torch.manual_seed(0)
    logits = torch.randn(3, 2000) * scale
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < 0.9
    expected = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep_sorted)
    expected /= expected.sum(-1, keepdim=True)
    assert torch.allclose(make_probs_fn(SamplingConfig(temperature=1.0, top_p=0.9))(logits), expected, atol=1e-6)


def test_min_p():
    p = [0.15, 0.5, 0.05, 0.3]
    assert probs_of(p, min_p=0.35) == pytest.approx([0, 0.625, 0, 0.375])  # threshold 0.175
    assert probs_of(p, min_p=0.2) == pytest.approx([0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95])  # 0.1


def test_typical_p():
    # entropy H = 1.142 nats; |-log p - H| ranks the tokens .3 (0.06), .5 (0.45), .15 (0.75), .05 (1.85)
    p = [0.15, 0.5, 0.05, 0.3]
    h = -sum(x * math.log(x) for x in p)
    assert sorted(range(4), key=lambda i: abs(-math.log(p[i]) - h)) == [3, 1, 0, 2]
    assert probs_of(p, typical_p=0.2) == pytest.approx([0, 0, 0, 1])  # .3 alone reaches .2
    assert probs_of(p, typical_p=0.5) == pytest.approx([0, 0.625, 0, 0.375])  # .3 + .5
    assert probs_of(p, typical_p=0.9) == pytest.approx([0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95])


def test_warpers_match_transformers():
    hf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(2, 600) * 2, torch.randn(2, 600) * 0.2])
    cases = [
        (dict(temperature=0.7, top_k=10), [hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(10)]),
        (dict(temperature=1.3, top_p=0.8), [hf.TemperatureLogitsWarper(1.3), hf.TopPLogitsWarper(0.8)]),
        (dict(temperature=1.0, min_p=0.1), [hf.MinPLogitsWarper(0.1)]),
        (dict(temperature=1.0, typical_p=0.7), [hf.TypicalLogitsWarper(0.7)]),
        (dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95),
         [hf.TemperatureLogitsWarper(0.9), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.9),
          hf.MinPLogitsWarper(0.05), hf.TypicalLogitsWarper(0.95)]),
    ]
    for kwargs, warpers in cases:
        scores = logits.clone()
        for w in warpers:
            scores = w(None, scores)
        assert torch.allclose(make_probs_fn(SamplingConfig(**kwargs))(logits), torch.softmax(scores, -1),
                              atol=1e-6), kwargs


# ---------------------------------------------------------------------------------------------- sample

def test_sample_is_seeded_and_follows_probs():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    a = sample(probs, make_generator(1))
    assert torch.equal(a, sample(probs, make_generator(1)))
    assert a.dtype == torch.long and a.shape == (20000,)
    freq = torch.bincount(a, minlength=4) / a.numel()
    assert freq[1] == 0 and torch.allclose(freq, probs[0], atol=0.015)
    assert sample(torch.tensor([0.0, 1.0]), make_generator(0)).item() == 1  # 1-D probs -> scalar
    make_generator(None)  # unseeded works


def test_every_integer_is_a_seed():
    """torch takes seeds in [-2**63, 2**64); 2**80 (a Python int, as a user may pass) raised ValueError deep in
    the generation. Seeds in range keep their streams; one outside is taken modulo 2**64."""
    draw = lambda seed: torch.rand(4, generator=make_generator(seed))   # noqa: E731
    for seed in (0, -5, 2**63, 2**64 - 1, -2**63):
        assert torch.equal(draw(seed), torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(draw(2**80 + 7), draw(7)) and torch.equal(draw(-2**64 + 3), draw(3))
