"""Watermark: transformers' green lists, and a detector that separates marked from plain text."""
from __future__ import annotations

import pytest
import torch

from tachy import GenerationConfig, InvalidArgumentError
from tachy.decoding import WatermarkConfig, detect
from tachy.decoding.watermark import GreenLists
from tests.decoding.helpers import tiny_engine


def test_green_lists_match_transformers():
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    hf = WatermarkLogitsProcessor(vocab_size=101, device="cpu", greenlist_ratio=0.25, bias=2.0)
    ours = GreenLists(101, WatermarkConfig(gamma=0.25, delta=2.0))
    for prev in (0, 1, 7, 55, 100):
        assert sorted(ours.ids(prev).tolist()) == sorted(hf._get_greenlist_ids(torch.tensor([3, prev])).tolist())
    scores = torch.randn(2, 101)
    ids = torch.tensor([[4, 9], [4, 77]])
    from tachy.decoding.watermark import make_watermark_processor
    assert torch.allclose(make_watermark_processor(True)(scores, ids), hf(ids, scores.clone()))


def test_detector_separates_watermarked_from_plain_text():
    engine, _ = tiny_engine(seed=5, max_seq_len=512)
    prompt = [5, 17, 33, 8]
    marked, plain = [], []
    for seed in range(3):
        common = dict(max_new_tokens=100, temperature=1.0, seed=seed, ignore_eos=True)
        marked.append(detect([prompt[-1]] + _tokens(engine, prompt, watermark=True, **common), 101).z)
        plain.append(detect([prompt[-1]] + _tokens(engine, prompt, **common), 101).z)
    print('z marked', marked, 'plain', plain)
    assert min(marked) > 4.0, marked
    assert max(abs(z) for z in plain) < 3.0, plain


def test_z_score_formula():
    cfg = WatermarkConfig(gamma=0.5)
    lists = GreenLists(101, cfg)
    ids = [7]
    for _ in range(40):   # always pick a green token: G = T
        ids.append(int(lists.ids(ids[-1])[0]))
    score = detect(ids, 101, cfg)
    assert score.green == score.scored == 40
    assert score.z == pytest.approx((40 - 0.5 * 40) / (40 * 0.25) ** 0.5)


def test_watermark_with_drafts_is_still_greedy_exact():
    engine, _ = tiny_engine(seed=5, max_seq_len=512)
    prompt = [5, 17, 33, 8] * 3
    a = _tokens(engine, prompt, max_new_tokens=30, watermark=True, drafter=None)
    b = _tokens(engine, prompt, max_new_tokens=30, watermark=True, drafter="pld")
    assert a == b


def _tokens(engine, prompt, **kw):
    return [t for s in engine.generate_tokens(prompt, GenerationConfig(**kw)) for t in s.tokens]


def test_bad_watermark_options():
    with pytest.raises(InvalidArgumentError, match="gamma"):
        GenerationConfig(watermark={"gamma": 1.5})
    with pytest.raises(InvalidArgumentError, match="gamma, delta, key"):
        GenerationConfig(watermark={"strength": 2})
    with pytest.raises(InvalidArgumentError, match="two tokens"):
        detect([1], 101)


@pytest.mark.parametrize("options, match", [
    ({"key": "abc"}, "key must be an integer"), ({"key": 1.5}, "key must be an integer"),
    ({"delta": 1e308}, "delta must be in"), ({"delta": float("nan")}, "finite"), ({"gamma": "x"}, "finite"),
    ({"gamma": float("inf")}, "finite"), ({"delta": True}, "finite"),
])
def test_watermark_options_from_json_are_checked(options, match):
    """Request JSON reaches these options: each used to fail (or give NaN logits) at the first token."""
    with pytest.raises(InvalidArgumentError, match=match):
        GenerationConfig(watermark=options)
