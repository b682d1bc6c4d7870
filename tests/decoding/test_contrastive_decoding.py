"""Contrastive decoding (truncated amateur) and context-aware decoding: choices follow the formulas."""
from __future__ import annotations

import math

import pytest
import torch

from tachy import GenerationConfig, InvalidArgumentError
from tachy.decoding import truncated_model
from tachy.models import build_model
from tests.conftest import hf_twin, tiny_config
from tests.decoding.helpers import tiny_engine


@torch.no_grad()
def last_logits(model, ids):
    return model(torch.tensor([ids]), torch.arange(len(ids)), model.new_cache(capacity=64))[0, -1]


def test_truncated_model_is_the_first_layers():
    """Equal to a model built with 2 layers from the same weights (the 3-layer original untouched)."""
    engine, _ = tiny_engine(seed=0)
    full = engine.model
    amateur = truncated_model(full, 2)
    cfg = tiny_config("llama", num_layers=2)
    _, sd3 = hf_twin(tiny_config("llama"), 0)
    sd2 = {k: v for k, v in sd3.items() if not k.startswith("model.layers.2.")}
    two = build_model(cfg)
    two.load_hf_state_dict(sd2)
    ids = [5, 17, 33, 8]
    assert torch.allclose(last_logits(amateur, ids), last_logits(two.eval(), ids), atol=1e-5)
    assert len(full.layers) == 3 and full.config.num_layers == 3
    with pytest.raises(InvalidArgumentError, match="amateur_layers"):
        truncated_model(full, 9)


def test_contrastive_decoding_choice():
    engine, _ = tiny_engine(seed=2)
    prompt = [5, 17, 33, 8]
    cfg = GenerationConfig(max_new_tokens=6, strategy="contrastive_decoding", ignore_eos=True,
                           strategy_options=dict(alpha=0.1, amateur_layers=1, amateur_temperature=0.5))
    ours = [t for s in engine.generate_tokens(prompt, cfg) for t in s.tokens]
    amateur = truncated_model(engine.model, 1)
    ids = list(prompt)
    for token in ours:
        expert = torch.log_softmax(last_logits(engine.model, ids), -1)
        ama = torch.log_softmax(last_logits(amateur, ids) / 0.5, -1)
        head = expert >= expert.max() + math.log(0.1)
        score = torch.where(head, expert - ama, torch.tensor(float("-inf")))
        assert token == int(score.argmax())
        ids.append(token)
    greedy = [t for s in engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=6, drafter=None,
                                                                         ignore_eos=True)) for t in s.tokens]
    assert ours != greedy


def test_context_aware_decoding_choice():
    engine, _ = tiny_engine(seed=2)
    prompt = [5, 17, 33, 8, 60]   # the stand-in tokenizer spells ids as text: context "17 33" is ids [17, 33]
    cfg = GenerationConfig(max_new_tokens=5, strategy="context_aware", ignore_eos=True,
                           strategy_options={"context": "17 33", "alpha": 1.0})
    ours = [t for s in engine.generate_tokens(prompt, cfg) for t in s.tokens]
    with_ctx, without = list(prompt), [5, 8, 60]
    for token in ours:
        mixed = 2.0 * last_logits(engine.model, with_ctx) - 1.0 * last_logits(engine.model, without)
        assert token == int(mixed.argmax())
        with_ctx.append(token)
        without.append(token)


def test_context_aware_needs_the_context_in_the_prompt():
    engine, _ = tiny_engine(seed=2)
    with pytest.raises(InvalidArgumentError, match="context"):
        GenerationConfig(strategy="context_aware")
    cfg = GenerationConfig(strategy="context_aware", strategy_options={"context": "99 98"})
    with pytest.raises(InvalidArgumentError, match="does not contain"):
        list(engine.generate_tokens([5, 17, 33], cfg))
