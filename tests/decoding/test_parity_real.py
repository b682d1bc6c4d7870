"""Beam search on the embedded model (fp32) against transformers' beam search built from the same weights.

Contrastive search and diverse beam search are compared in test_parity_legacy.py, against transformers
versions that still ship them (<= 4.55); they also have definition tests on tiny models.
"""
from __future__ import annotations

import pytest
import torch

from tachy import GenerationConfig
from tachy.engine import Engine

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
]
OPTIONS = [dict(num_beams=4), dict(num_beams=3, length_penalty=0.0, early_stopping=True),
           dict(num_beams=2, length_penalty=2.0, early_stopping="never")]


@pytest.fixture(scope="module")
def pair(one_torch_thread):
    from tests.models.test_parity_real import build_pair

    torch.set_grad_enabled(False)
    try:
        p = build_pair("smollm2-135m")
        yield Engine(p.ours, p.tok, name="smollm2-135m-fp32"), p.hf, p.tok
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("opts", OPTIONS, ids=["4beams", "3beams-lp0-early", "2beams-lp2-never"])
def test_beam_search_matches_transformers_on_smollm(pair, opts):
    engine, hf, tok = pair
    eos = list(tok.eos_token_ids)
    for messages in PROMPTS:
        prompt = engine.chat_prompt(messages)
        cfg = GenerationConfig(max_new_tokens=16, strategy="beam", strategy_options=dict(opts))
        ours = [t for s in engine.generate_tokens(prompt, cfg) for t in s.tokens]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0], **opts)[0, len(prompt):].tolist()
        assert ours == ref[:len(ours)] and all(t == eos[0] for t in ref[len(ours):]), (tok.decode(ours), tok.decode(ref))
