"""APE (tachy.context.ape): the grouped attention is the paper's formula, one passage at temperature and scale
1 is sequential encoding, encoded passages are reused, bad input is refused."""
from __future__ import annotations

import math

import pytest
import torch

from tachy import GenerationConfig
from tachy.context import APEConfig, PassageStore, ape_generate
from tachy.context.ape import APEContext
from tachy.errors import ContextLengthError, InvalidArgumentError
from tachy.models.llama import merge_attention


def test_attend_is_the_three_group_formula():
    """Each group's softmax output, weighted by exp(lse_prefix), S * exp(T * lse_passages(s / T)) and (from the
    tail, merged by the model) exp(lse_tail): checked against the groups' weights written out."""
    torch.manual_seed(0)
    L, H, D, P, M = 1, 2, 8, 5, 3
    prefix = (torch.randn(L, H, P, D), torch.randn(L, H, P, D))
    passages = [(torch.randn(L, H, 7, D), torch.randn(L, H, 7, D)), (torch.randn(L, H, 5, D), torch.randn(L, H, 5, D))]
    t, s, scale = 0.7, 0.8, 1 / math.sqrt(D)
    ctx = APEContext(prefix, passages, APEConfig(t, s))
    q = torch.randn(H, M, D)
    out, lse = ctx.attend(0, q, None, scale)
    kd, vd = torch.cat([p[0] for p in passages], 2)[0], torch.cat([p[1] for p in passages], 2)[0]
    sp = q @ prefix[0][0].transpose(-1, -2) * scale
    sd = q @ kd.transpose(-1, -2) * scale
    w_prefix = sp.exp()                                            # unnormalised weights of each key
    w_docs = s * torch.logsumexp(sd / t, -1, keepdim=True).mul(t - 1).exp() * (sd / t).exp()
    total = w_prefix.sum(-1) + w_docs.sum(-1)
    expected = (w_prefix @ prefix[1][0] + w_docs @ vd) / total[..., None]
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(lse, total.log(), atol=1e-5)
    # and the tail merges in as a third group with its plain log-sum-exp
    tail_out, tail_lse = torch.randn(H, M, D), torch.randn(H, M)
    merged = merge_attention(out, lse, tail_out, tail_lse)
    assert torch.allclose(merged, (expected * total[..., None] + tail_out * tail_lse.exp()[..., None])
                          / (total + tail_lse.exp())[..., None], atol=1e-5)


def chat_parts(engine, passages: list[str], question: str):
    tok = engine.tokenizer
    enc = lambda text: tok.encode(text, add_special_tokens=False)   # noqa: E731
    return (enc("<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n"),
            [enc(p) for p in passages], enc(f"{question}<|im_end|>\n<|im_start|>assistant\n"))


def test_one_passage_at_temperature_and_scale_one_is_sequential_encoding(smollm):
    prefix, passages, question = chat_parts(
        smollm, ["The secret code of the Paris office is 4821. Paris is mild in spring. " * 3],
        "What is the secret code of the Paris office?")
    sequential = [t for p in smollm.stream(prefix + passages[0] + question,
                                           GenerationConfig(max_new_tokens=12, drafter="none", prefix_cache=False))
                  for t in p.token_ids]
    assert ape_generate(smollm, prefix, passages, question, 12, APEConfig(1.0, 1.0)) == sequential


def test_encoded_passages_are_reused(smollm):
    prefix, passages, question = chat_parts(smollm, ["Alice keeps the red key.", "Bob keeps the blue key.",
                                                     "Carol keeps the green key."], "Who keeps the blue key?")
    store = PassageStore()
    first = ape_generate(smollm, prefix, passages, question, 6, store=store)
    assert store.misses == 4 and store.hits == 0            # the prefix and three passages encoded
    assert ape_generate(smollm, prefix, passages[::-1], question, 6, store=store)[:1]
    assert store.hits == 4                                  # all reused, in another order
    assert ape_generate(smollm, prefix, passages, question, 6, store=store) == first


def test_bad_input_is_refused(smollm):
    prefix, passages, question = chat_parts(smollm, ["A short passage."], "Why?")
    with pytest.raises(ContextLengthError, match="overflow the context"):
        ape_generate(smollm, prefix, passages + [[5] * smollm.max_context], question, 4)
    with pytest.raises(InvalidArgumentError, match="non-empty list of non-empty token-id lists"):
        ape_generate(smollm, prefix, [], question, 4)
    with pytest.raises(InvalidArgumentError, match="needs a question"):
        ape_generate(smollm, prefix, passages, [], 4)
    with pytest.raises(InvalidArgumentError, match="temperature and scale"):
        APEConfig(temperature=0.0)
    with pytest.raises(InvalidArgumentError, match=r"passage token ids must be in \[0, 49152\)"):
        ape_generate(smollm, prefix, [[1, 49152]], question, 4)   # the C forward had failed with "code -2"


@pytest.mark.parametrize("kwargs, message", [
    (dict(passages=["A short passage."]), "token-id lists, e.g."),   # text where token ids go
    (dict(passages=[[1, 2]]), "passages_at must be"),                 # no prefix: was "APE needs a non-empty prefix"
    (dict(passages=[[1, 2]], passages_at=-1), "passages_at must be"),
    (dict(passages=[[]], passages_at=2), "non-empty token-id lists"),
])
def test_generation_config_says_what_apes_inputs_are(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GenerationConfig(**kwargs)


def test_sliding_window_models_are_refused():
    from tachy.engine import Engine
    from tests.conftest import tiny_model
    from tests.decoding.helpers import IdsTokenizer

    engine = Engine(tiny_model("gemma3"), IdsTokenizer([3]), name="tiny-gemma3")
    with pytest.raises(InvalidArgumentError, match="sliding-window"):
        ape_generate(engine, [5, 6], [[7, 8]], [9], 2)


def test_the_engine_streams_ape_through_generation_config(smollm):
    prefix, passages, question = chat_parts(smollm, ["Alice keeps the red key.\n\n", "Bob keeps the blue key.\n\n"],
                                            "Who keeps the blue key?")
    config = GenerationConfig(max_new_tokens=8, passages=passages, passages_at=len(prefix))
    pieces = list(smollm.stream(prefix + question, config))
    eos = set(smollm.tokenizer.eos_token_ids)   # the stream does not send the EOS token itself
    expected = [t for t in ape_generate(smollm, prefix, passages, question, 8) if t not in eos]
    assert [t for p in pieces for t in p.token_ids] == expected
    assert pieces[-1].stats.prompt_tokens == len(prefix) + len(question) + sum(map(len, passages))
    with pytest.raises(InvalidArgumentError, match="cannot be combined"):
        GenerationConfig(passages=passages, press="snapkv", compression_ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="ape_temperature"):
        GenerationConfig(passages=passages, ape_scale=1.5)
