"""Quest: the page bound is an upper bound (PyTorch and C), the C decoder's sparse rows keep one-token
decoding's bits in verify forwards, a budget covering every page is dense attention bit for bit, and the C
decoder agrees with the PyTorch implementation."""
from __future__ import annotations

import ctypes
import random

import pytest
import torch

from tachy import kernels
from tachy.sparse import make_attention
from tachy.sparse.quest import page_bounds, page_scores
from tests.conftest import tiny_gguf_model, tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="kernels unavailable")
SMALL = "quest:page_size=4,sinks=4,window=20,budget=40,dense_layers=0"   # 60-token prompts: 9 candidate pages, 4 chosen
TIDAL_SMALL = "tidal:selection=0,sinks=4,window=20,budget=40"


@pytest.mark.parametrize("page", [1, 4, 16])
def test_a_page_bound_is_never_below_the_true_max_score(page):
    torch.manual_seed(page)
    k = (torch.randn(3, 256, 64) * torch.rand(1, 1, 64) * 4).to(torch.bfloat16)   # bf16 keys, uneven channels
    q = torch.randn(3, 5, 64)
    lo, hi = page_bounds(k, page)
    bound = page_scores(q, lo, hi).double()                                         # [3, 5, pages]
    true = (q.double() @ k.double().transpose(-1, -2)).unflatten(-1, (-1, page)).amax(-1)
    assert (bound >= true - 1e-4 * true.abs().clamp(min=1)).all()
    if page == 1:    # one key a page: the bound is the score
        assert torch.allclose(bound, true, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_the_c_decoders_bound_is_an_upper_bound_too():
    torch.manual_seed(0)
    k = (torch.randn(512, 64) * 3).to(torch.bfloat16)
    lo, hi = page_bounds(k, 16)
    bounds = torch.stack([lo, hi], 1).contiguous()                                   # [pages, 2, D]
    lib = kernels.library()
    for _ in range(4):
        q = torch.randn(64)
        out = torch.empty(32)
        lib.tq_page_bounds(ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(bounds.data_ptr()), 32, 64,
                           ctypes.c_void_p(out.data_ptr()))
        true = (q.double() @ k.double().T).view(32, 16).amax(-1)
        assert (out.double() >= true - 1e-4).all()
        assert torch.allclose(out, page_scores(q[None], lo, hi)[0], rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("n, k", [(1, 1), (17, 5), (1000, 1), (1000, 999), (8192, 944)])
def test_the_c_decoders_top_k_is_exact_with_ties_to_the_lower_index(n, k):
    torch.manual_seed(n + k)
    lib = kernels.library()
    cases = [torch.randn(n), torch.randint(-3, 4, (n,)).float(), (torch.randn(n) * 1e-30),
             torch.randint(-1, 2, (n,)).float() * torch.tensor([0.0, -0.0]).repeat(n)[:n]]   # +-0 ties
    for score in cases:
        flags = torch.zeros(n, dtype=torch.uint8)
        lib.tq_mark_top(ctypes.c_void_p(score.data_ptr()), n, k, ctypes.c_void_p(flags.data_ptr()))
        # the k largest, equal values taken from the lowest index up (a stable sort on -score)
        want = torch.zeros(n, dtype=torch.uint8)
        want[torch.sort(-score, stable=True).indices[:k]] = 1
        assert torch.equal(flags, want)


def forward(model, tokens, cache, positions=None, mask=None):
    positions = torch.arange(cache.length, cache.length + len(tokens)) if positions is None else positions
    with torch.inference_mode():
        return model(torch.tensor([tokens]), positions, cache, mask)[0]


def decode(model, prompt, path, attention):
    """Logits of each token of ``path`` decoded one at a time after ``prompt``, reading ``attention``."""
    cache = model.new_cache(128, fixed=True)
    forward(model, prompt, cache)
    if attention is not None:
        make_attention(attention).attach(model, cache)
    return torch.stack([forward(model, [t], cache)[0] for t in path])


def verify(model, prompt, chain, attention):
    cache = model.new_cache(128, fixed=True)
    forward(model, prompt, cache)
    make_attention(attention).attach(model, cache)
    n = len(chain)
    mask = torch.cat([torch.ones(n, len(prompt), dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
    return forward(model, chain, cache, mask=mask)


def tokens(model, n, seed):
    rng = random.Random(seed)
    return [rng.randrange(model.config.vocab_size) for _ in range(n)]


@needs_kernels
@pytest.mark.parametrize("arch, attention", [
    ("llama", SMALL), ("qwen2", SMALL), ("gemma3", SMALL),    # gemma3: sliding layers dense, its full layer sparse
    ("llama", TIDAL_SMALL),
    ("qwen2", TIDAL_SMALL)])
def test_c_verify_rows_keep_one_token_decodings_bits(arch, attention):
    model = tiny_gguf_model(arch, seed=4)
    prompt, chain = tokens(model, 60, 1), tokens(model, 17, 2)
    sparse = decode(model, prompt, chain, attention)
    assert torch.equal(verify(model, prompt, chain, attention), sparse)
    assert not torch.equal(sparse, decode(model, prompt, chain, None))   # it did read fewer keys


@pytest.mark.parametrize("c_forward", [True, False])
def test_a_budget_covering_every_page_is_dense_attention_bit_for_bit(c_forward):
    if c_forward and not kernels.available():
        pytest.skip("kernels unavailable")
    model = tiny_gguf_model("llama", seed=5) if c_forward else tiny_model("llama", seed=5)
    prompt, path = tokens(model, 70, 3), tokens(model, 8, 4)
    dense = decode(model, prompt, path, None)
    for attention in ("quest:page_size=4,sinks=4,window=20,budget=128", "tidal:sinks=4,window=20,budget=128"):
        assert torch.equal(decode(model, prompt, path, attention), dense)


@needs_kernels
@pytest.mark.parametrize("attention", [SMALL, "tidal:sinks=4,window=20,budget=40,selection=0"])
@pytest.mark.parametrize("seed", [6, 7])
def test_the_c_decoder_agrees_with_the_pytorch_implementation(attention, seed):
    """The two differ by rounding (C keeps q in float32, PyTorch rounds it to bf16 first), about as much as
    their dense forwards do, and far less than sparse differs from dense."""
    model = tiny_gguf_model("llama", seed=seed)
    prompt, path = tokens(model, 60, 5), tokens(model, 6, 6)
    c = decode(model, prompt, path, attention)
    saved, model.cpu_forward = model.cpu_forward, None       # the PyTorch forward over the same blocks
    reference = decode(model, prompt, path, attention)
    dense = decode(model, prompt, path, None)
    model.cpu_forward = saved
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())   # noqa: E731
    assert rel(c, reference) < 6e-2 and rel(c, reference) < rel(dense, reference) / 4
    assert (c.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
