"""Contrastive search and diverse (group) beam search against transformers' own implementations.

transformers 4.50-4.55 ships both in the library; from 4.56 they live in Hub ``custom_generate`` repositories
(not reachable offline), so with a newer transformers these tests skip; `make test` runs them
against 4.55 installed beside the venv (`make test-legacy-parity`). By hand:

    pip install --target /tmp/tf455 --no-deps transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.34.4
    PYTHONPATH=/tmp/tf455:src:. python -m pytest tests/decoding/test_parity_legacy.py
"""
from __future__ import annotations

import os

import pytest
import torch

from tachy import GenerationConfig
from tests.decoding.helpers import tiny_engine

transformers = pytest.importorskip("transformers")
_version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
if os.environ.get("TACHY_REQUIRE_LEGACY_PARITY") and _version >= (4, 56):   # `make test` must not skip these
    raise RuntimeError(f"expected transformers 4.55 on PYTHONPATH, got {transformers.__version__}")
pytestmark = pytest.mark.skipif(_version >= (4, 56), reason=f"transformers {transformers.__version__} has no "
                                "built-in contrastive search / group beam search (moved to the Hub)")


def hf_generate(hf, prompt, **kwargs):
    try:
        out = hf.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=0, **kwargs)
    except ValueError as e:
        if "custom_generate" in str(e) or "trust_remote_code" in str(e):
            pytest.skip(f"transformers {transformers.__version__} has no built-in version of this method")
        raise
    return out[0, len(prompt):].tolist()


def ours(engine, prompt, max_new, strategy, **options):
    cfg = GenerationConfig(max_new_tokens=max_new, strategy=strategy, strategy_options=options)
    return [t for s in engine.generate_tokens(prompt, cfg) for t in s.tokens]


@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.3, 6)])
def test_contrastive_search_matches_transformers(alpha, k):
    for seed in range(3):
        engine, hf = tiny_engine(seed=seed, eos=(43,))
        for prompt in ([5, 17, 33, 8], [90, 2, 2, 61, 11, 40]):
            a = ours(engine, prompt, 12, "contrastive_search", penalty_alpha=alpha, top_k=k)
            b = hf_generate(hf, prompt, max_new_tokens=12, penalty_alpha=alpha, top_k=k, eos_token_id=[43])
            assert a == b[:len(a)] and all(t == 0 for t in b[len(a):]), (seed, prompt, a, b)


@pytest.mark.parametrize("opts", [dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
                                  dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, length_penalty=0.0),
                                  dict(num_beams=4, num_beam_groups=4, diversity_penalty=2.0, early_stopping=True)])
def test_diverse_beam_search_matches_transformers(opts):
    for seed in range(3):
        for eos in [(43,), (66, 43)]:
            engine, hf = tiny_engine(seed=seed, eos=eos)
            for prompt in ([5, 17, 33, 8], [90, 2, 2, 61, 11, 40]):
                a = ours(engine, prompt, 10, "diverse_beam", **opts)
                b = hf_generate(hf, prompt, max_new_tokens=10, eos_token_id=list(eos), **opts)
                assert a == b[:len(a)] and all(t == 0 for t in b[len(a):]), (seed, eos, prompt, opts, a, b)


# ---- the embedded model, fp32 ------------------------------------------------------------------------------------
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Give me one tip for sleeping well."}]]


@pytest.fixture(scope="module")
def smollm_pair(one_torch_thread):
    """Our fp32 engine and a transformers model loaded from the very same state dict."""
    from tachy.engine import Engine
    from tachy.models import build_model
    from tachy.models.load import load_checkpoint
    from tachy.registry import resolve_model
    from tachy.tokenizer import Tokenizer

    cfg, sd, tok_dir = load_checkpoint(resolve_model("smollm2-135m"), progress=False)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    hf.eval()
    ours = build_model(cfg)
    ours.load_hf_state_dict(sd)
    engine = Engine(ours.eval(), Tokenizer.from_path(tok_dir), name="smollm2-135m-fp32")
    torch.set_grad_enabled(False)
    yield engine, hf
    torch.set_grad_enabled(True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, options", [
    ("contrastive_search", dict(penalty_alpha=0.6, top_k=4)),
    ("diverse_beam", dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0)),
])
def test_smollm_matches_transformers(smollm_pair, strategy, options):
    engine, hf = smollm_pair
    eos = list(engine.tokenizer.eos_token_ids)
    for messages in CHATS:
        prompt = engine.chat_prompt(messages)
        a = ours(engine, prompt, 16, strategy, **options)
        b = hf_generate(hf, prompt, max_new_tokens=16, eos_token_id=eos, **options)
        assert a == b[:len(a)] and all(t == 0 for t in b[len(a):]), (engine.tokenizer.decode(a),
                                                                      engine.tokenizer.decode(b))
