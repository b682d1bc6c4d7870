"""int4kv: 4-bit KV attended in place by the int4 kernel. Checks the packed layout against a plain float
reference, the byte count, the log-sum-exp merge and bad input (exact speculative decoding over it:
test_kivi.py's test_speculative_greedy_equals_plain_greedy_over_quantized_kv)."""
from __future__ import annotations

import pytest
import torch

from tachy import InvalidArgumentError
from tachy.models.llama import attention_with_lse, merge_attention
from tachy.presses import make_press
from tachy.presses.int4kv import Int4KVPrefix
from tests.conftest import tiny_model
from tests.presses.test_presses import prefilled, prompt_ids


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channel_ranges = torch.linspace(0.1, 8, 64)            # key outliers live in a few channels
    k = torch.randn(2, 1, 3, tokens, 64, generator=g) * channel_ranges
    v = torch.randn(2, 1, 3, tokens, 64, generator=g)
    return k.bfloat16(), v.bfloat16()


def test_keys_are_channel_scaled_then_per_token_and_values_per_token():
    k, v = kv(96)
    prefix = Int4KVPrefix(k, v, key_group=64)
    rk, rv = prefix.read(1)
    kf, vf = k[1].float(), v[1].float()
    c = kf.abs().amax(dim=-2, keepdim=True)
    # each entry within half a step of its token's range (keys: in channel-normalized units), plus bf16 rounding
    k_step = ((kf / c).amax(-1, keepdim=True) - (kf / c).amin(-1, keepdim=True)) / 15
    assert ((rk.float() - kf).abs() <= (k_step / 2 + 0.01) * c + 1e-3).all()
    v_step = (vf.amax(-1, keepdim=True) - vf.amin(-1, keepdim=True)) / 15
    assert ((rv.float() - vf).abs() <= v_step / 2 + 0.02 * vf.abs().amax(-1, keepdim=True)).all()


def test_attend_is_softmax_attention_over_the_dequantized_prefix():
    k, v = kv(128, seed=1)
    prefix = Int4KVPrefix(k, v)
    rk, rv = (x[0].float() for x in prefix.read(0))
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(6, 128, generator=torch.Generator().manual_seed(3)) > 0.3
    out, lse = prefix.attend(0, q, mask, 0.125)
    scores = (q @ rk.transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ rv
    # the kernel rounds scores and weighted probabilities to bf16 (relative precision 2**-8), and read()
    # rounds the reference keys to bf16: differences of that order, nothing more
    ref_lse = torch.logsumexp(scores, -1)
    assert ((lse - ref_lse).abs() <= 0.01 * ref_lse.abs() + 0.01).all()
    assert (out - ref).abs().max() < 0.05 * rv.abs().max()


def test_merging_two_key_sets_by_log_sum_exp_is_attention_over_their_union():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g), \
        torch.randn(1, 2, 30, 16, generator=g)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    a, la = attention_with_lse(q, k[:, :, :12], v[:, :, :12], None, 0.25)
    b, lb = attention_with_lse(q, k[:, :, 12:], v[:, :, 12:], None, 0.25)
    assert torch.allclose(merge_attention(a, la, b, lb), whole, atol=1e-5)


@pytest.mark.parametrize("key_group,per_token", [(32, 76), (64, 72)])
def test_int4kv_byte_count(key_group, per_token):
    k, v = (torch.randn(30, 1, 3, 2048, 64).bfloat16() for _ in range(2))      # SmolLM2's KV shape at 2k
    prefix = Int4KVPrefix(k, v, key_group)
    # per token and kv head: codes 2 x 32, keys' scale+zero per group 4 each, values' scale+zero 4;
    # plus the fp32 channel scales and the shared unit scales of the value kernel
    assert prefix.nbytes == 30 * 3 * 2048 * per_token + 30 * 3 * 64 * 4 + prefix.unit.numel() * 2
    assert 2 * 30 * 3 * 2048 * 64 * 2 / prefix.nbytes > 0.99 * 256 / per_token


def test_int4kv_rejects_a_ratio_and_an_unsupported_head_dim():
    with pytest.raises(InvalidArgumentError):
        make_press("int4kv", 0.5)
    model = tiny_model("llama").float()               # head_dim 16: not a group size of the kernel
    press = make_press("int4kv", 0.0, residual=8)
    cache, _ = prefilled(model, press, prompt_ids(60))
    with pytest.raises(InvalidArgumentError, match="head dimension"):
        press.apply(cache)


@torch.inference_mode()
def test_int4kv_cache_keeps_a_multiple_of_32_tokens_packed_and_decodes_close_to_full():
    model = tiny_model("llama", head_dim=32).float()
    press = make_press("int4kv", 0.0, residual=8)
    cache, _ = prefilled(model, press, prompt_ids(80))
    full = cache.clone()
    press.apply(cache)
    assert cache.prefix.length == 64 and cache.length == 80 and cache.position == 80
    for step, token in enumerate([5, 9, 2]):
        a = model(torch.tensor([[token]]), torch.tensor([80 + step]), cache)[0, -1]
        b = model(torch.tensor([[token]]), torch.tensor([80 + step]), full)[0, -1]
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
