"""Double Sparsity: int8 labels on every channel score within their rounding of the exact q.k; the C decoder's
label scores are the PyTorch ones, bit for bit; a budget covering every key is dense attention bit for bit; verify rows keep one-token decoding's bits;
the C decoder agrees with the PyTorch oracle; the calibration is cached per model and refuses another model's
file; greedy speculative == plain decoding on smollm2-135m; bad options are clear errors."""
from __future__ import annotations

import ctypes

import pytest
import torch

from tachy import GenerationConfig, kernels
from tachy.errors import InvalidArgumentError
from tachy.sparse import DoubleSparsityAttention, make_attention
from tachy.sparse import calibration
from tachy.sparse.calibration import channel_importance, load_or_calibrate
from tachy.sparse.double_sparsity import LABEL_BLOCK, label_scores, label_stride, quantize_labels, top_channels
from tests.conftest import needs_data, tiny_gguf_model, tiny_model
from tests.sparse.test_quest import decode, tokens, verify

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="kernels unavailable")
SMALL = "double_sparsity:channels=8,sinks=4,window=20,budget=40"   # 60-token prompts: 36 candidates, 16 chosen


def calibrated(model, attention: str = SMALL):
    """``model`` with a calibration (on random tokens) registered for ``attention``'s options."""
    make_attention(attention).use_calibration(model, channel_importance(model, tokens(model, 96, 9), progress=False))
    return model


def test_channels_come_in_whole_rope_pairs():
    importance = torch.tensor([[5.0, 0, 0, 1, 0, 4, 0, 0]])       # D 8: pairs (0,4) 5, (1,5) 4, (3,7) 1
    assert top_channels(importance, 4).tolist() == [[0, 1, 4, 5]]
    assert top_channels(importance, 2).tolist() == [[0, 4]]
    assert top_channels(importance, 8).tolist() == [list(range(8))]


def test_int8_labels_round_each_vector_to_127_levels_of_its_absmax():
    x = torch.tensor([[2.54, -1.0, 0.01, 0.0], [0.0, 0.0, 0.0, 0.0], [float("inf"), 1.0, 0.0, 0.0]])
    values, scale = quantize_labels(x)
    assert values.tolist() == [[127, -50, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert scale[:, 0].tolist() == [pytest.approx(0.02), 0.0, 0.0]


def test_labels_on_every_channel_score_the_query_key_product_within_their_rounding():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 32), torch.randn(2, 200, 32).to(torch.bfloat16)     # [Hkv, G, T, D], [Hkv, S, D]
    every = torch.arange(32).expand(2, 32)
    qs, kf = q.double().sum(1), k.double()
    exact = torch.einsum("htd,hsd->hts", qs, kf)                                   # q.k summed over the group
    # q and k each off by at most half a step (absmax / 254) per channel; the query's scale ranks nothing
    q_step = qs.abs().amax(-1, keepdim=True) / 127
    k_step = kf.abs().amax(-1, keepdim=True).transpose(-1, -2) / 127
    bound = (qs.abs().sum(-1, keepdim=True) * k_step + q_step * kf.abs().sum(-1)[:, None, :] + 32 * q_step * k_step) / 2
    score = label_scores(q, k, every).double() * q_step
    assert ((score - exact).abs() <= bound * 1.001).all()
    assert not torch.equal(score, exact)
    method = make_attention("double_sparsity:channels=32,sinks=0,window=1,budget=41")   # 40 chosen of 199
    candidate = torch.ones(2, 5, 200, dtype=torch.bool)
    candidate[..., -1] = False
    chosen, best = method.top(label_scores(q, k, every), candidate), method.top(exact, candidate)
    assert (chosen & best).sum() >= 0.9 * best.sum()                                # the same keys, nearly all
    # fewer channels: the label score approximates the product on those channels only
    some = torch.tensor([[0, 3, 16, 19]] * 2)
    on_some = torch.einsum("hgtd,hsd->hts", q[..., [0, 3, 16, 19]].double(), k[..., [0, 3, 16, 19]].double())
    q_on_some = qs[..., [0, 3, 16, 19]].abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(label_scores(q, k, some).double() * q_on_some, on_some, rtol=0.05, atol=0.1)


@needs_kernels
@pytest.mark.parametrize("channels", [4, 6, 16, 64])
def test_the_c_decoders_label_scores_are_the_pytorch_ones(channels):
    torch.manual_seed(channels)
    k = (torch.randn(100, channels) * 3).to(torch.bfloat16).float()                    # 100 keys' labels
    k[7] = 0                                                                          # a zero label
    labels = torch.zeros(-(-100 // LABEL_BLOCK), label_stride(channels), dtype=torch.uint8)
    kernels.library().tq_write_labels(ctypes.c_void_p(k.data_ptr()), 100, channels, ctypes.c_void_p(labels.data_ptr()))
    qs = torch.randn(channels)
    out = torch.empty(100)
    kernels.library().tq_label_scores(ctypes.c_void_p(qs.data_ptr()), ctypes.c_void_p(labels.data_ptr()), 100,
                                      channels, ctypes.c_void_p(out.data_ptr()))
    every = torch.arange(channels)[None]
    assert torch.equal(out, label_scores(qs.view(1, 1, 1, -1), k[None], every)[0, 0])
    # the decoder's choice: the top 30 of those scores, ties to the lower slot, ascending
    chosen = torch.empty(100, dtype=torch.int64)
    n = kernels.library().tq_label_top(ctypes.c_void_p(qs.data_ptr()), ctypes.c_void_p(labels.data_ptr()), 100,
                                       channels, 30, ctypes.c_void_p(chosen.data_ptr()))
    assert n == 30 and chosen[:n].tolist() == sorted(torch.sort(-out, stable=True).indices[:30].tolist())


@needs_kernels
@pytest.mark.parametrize("k", [1, 20, 45, 70, 99])
def test_the_c_decoders_choice_breaks_ties_to_the_lower_slot(k):
    """Keys with equal labels across 16-key blocks: the k-th largest score is shared, and the first of the
    equal slots are taken (the vectorised selection and the scalar tail agree with a stable sort)."""
    torch.manual_seed(k)
    keys = torch.randn(5, 8)[torch.randint(0, 5, (150,))].to(torch.bfloat16).float()   # 5 distinct labels
    labels = torch.zeros(-(-150 // LABEL_BLOCK), label_stride(8), dtype=torch.uint8)
    kernels.library().tq_write_labels(ctypes.c_void_p(keys.data_ptr()), 150, 8, ctypes.c_void_p(labels.data_ptr()))
    qs, out, chosen = torch.randn(8), torch.empty(150), torch.empty(150, dtype=torch.int64)
    kernels.library().tq_label_scores(ctypes.c_void_p(qs.data_ptr()), ctypes.c_void_p(labels.data_ptr()), 150, 8,
                                      ctypes.c_void_p(out.data_ptr()))
    n = kernels.library().tq_label_top(ctypes.c_void_p(qs.data_ptr()), ctypes.c_void_p(labels.data_ptr()), 150, 8,
                                       k, ctypes.c_void_p(chosen.data_ptr()))
    assert n == k and chosen[:n].tolist() == sorted(torch.sort(-out, stable=True).indices[:k].tolist())


@pytest.mark.parametrize("c_forward", [True, False])
def test_a_budget_covering_every_key_is_dense_attention_bit_for_bit(c_forward):
    if c_forward and not kernels.available():
        pytest.skip("kernels unavailable")
    model = tiny_gguf_model("llama", seed=5) if c_forward else tiny_model("llama", seed=5)
    attention = "double_sparsity:channels=8,sinks=4,window=20,budget=128"
    calibrated(model, attention)
    prompt, path = tokens(model, 70, 3), tokens(model, 8, 4)
    assert torch.equal(decode(model, prompt, path, attention), decode(model, prompt, path, None))


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])     # gemma3: sliding layers dense, its full layer sparse
def test_c_verify_rows_keep_one_token_decodings_bits(arch):
    model = calibrated(tiny_gguf_model(arch, seed=4))
    prompt, chain = tokens(model, 60, 1), tokens(model, 17, 2)
    sparse = decode(model, prompt, chain, SMALL)
    assert torch.equal(verify(model, prompt, chain, SMALL), sparse)
    assert not torch.equal(sparse, decode(model, prompt, chain, None))   # it did read fewer keys


@needs_kernels
def test_rolled_back_slots_get_new_labels():
    """A rollback (rejected drafts) marks their labels stale: decoding other tokens into those slots reads
    labels of the new keys, as a fresh decode of the same path does."""
    model = calibrated(tiny_gguf_model("llama", seed=8))
    prompt, first, second = tokens(model, 60, 1), tokens(model, 30, 2), tokens(model, 30, 3)
    cache = model.new_cache(128, fixed=True)
    with torch.inference_mode():
        model(torch.tensor([prompt]), torch.arange(60), cache)
        make_attention(SMALL).attach(model, cache)
        for i, t in enumerate(first):
            model(torch.tensor([[t]]), torch.tensor([60 + i]), cache)
        cache.rollback(30)
        rolled = torch.stack([model(torch.tensor([[t]]), torch.tensor([60 + i]), cache)[0, 0]
                              for i, t in enumerate(second)])
    assert torch.equal(rolled, decode(model, prompt, second, SMALL))


@needs_kernels
@pytest.mark.parametrize("seed", [6, 7])
def test_the_c_decoder_agrees_with_the_pytorch_implementation(seed):
    """As for Quest, the two differ by rounding (C keeps q in float32, PyTorch rounds it to bf16), far less than
    sparse differs from dense; a bit more than Quest's (single keys near the top-k boundary flip with rounding
    more often than pages): 0.02-0.06 of the largest logit here, against 0.2-0.26 for sparse vs dense."""
    model = calibrated(tiny_gguf_model("llama", seed=seed))
    prompt, path = tokens(model, 60, 5), tokens(model, 6, 6)
    c = decode(model, prompt, path, SMALL)
    saved, model.cpu_forward = model.cpu_forward, None
    reference = decode(model, prompt, path, SMALL)
    dense = decode(model, prompt, path, None)
    model.cpu_forward = saved
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())   # noqa: E731
    assert rel(c, reference) < 8e-2 and rel(c, reference) < rel(dense, reference) / 3
    assert (c.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


class ByteTokenizer:
    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % self.vocab for b in text.encode()]


def test_the_calibration_is_cached_per_model_and_refuses_another_models_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("It was on a dreary night of November that I beheld the accomplishment of my toils. " * 4)
    model, other = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    tok = ByteTokenizer(model.config.vocab_size)
    first = load_or_calibrate(model, tok, text, tokens=200, progress=False)
    files = list((tmp_path / "cache" / "calibration").glob("*.pt"))
    assert len(files) == 1 and first.shape == (3, 2, 16)
    monkeypatch.setattr(calibration, "channel_importance", lambda *a, **k: pytest.fail("calibrated twice"))
    assert torch.equal(load_or_calibrate(model, tok, text, tokens=200), first)      # read back from the cache
    with pytest.raises(InvalidArgumentError, match="was made for another model"):
        load_or_calibrate(other, tok, text, tokens=200, path=files[0])
    with pytest.raises(InvalidArgumentError, match=r"\(layers, kv heads, head_dim\) = \(3, 2, 16\), this model "
                                                   r"has \(2, 1, 16\)"):
        load_or_calibrate(tiny_model("qwen2"), tok, text, tokens=200, path=files[0])
    (tmp_path / "junk.pt").write_bytes(b"not a file torch reads")
    with pytest.raises(InvalidArgumentError, match="unreadable"):
        load_or_calibrate(model, tok, text, path=tmp_path / "junk.pt")
    # an explicit file is written on first use, then read
    monkeypatch.undo()
    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path / "cache"))
    mine = tmp_path / "mine.pt"
    assert torch.equal(load_or_calibrate(model, tok, text, tokens=200, path=mine, progress=False), first)
    assert mine.is_file()


def test_options_and_errors():
    method = make_attention("double_sparsity:budget=512,channels=8")
    assert isinstance(method, DoubleSparsityAttention) and (method.budget, method.channels, method.unit) == (512, 8, 1)
    assert method.select == 512 - 16 - 64
    with pytest.raises(InvalidArgumentError, match="channels must be an even whole number >= 2"):
        make_attention("double_sparsity:channels=7")
    with pytest.raises(InvalidArgumentError, match="channels must be an even whole number >= 2"):
        make_attention("double_sparsity:channels=-2")
    with pytest.raises(InvalidArgumentError, match="budget 64 leaves nothing to choose"):
        make_attention("double_sparsity:budget=64")
    with pytest.raises(InvalidArgumentError, match="calibration_tokens must be a whole number >= 16"):
        make_attention("double_sparsity:calibration_tokens=3")
    model = tiny_model("llama")                                                        # head_dim 16
    assert make_attention("double_sparsity").channels_for(model.config) == 8               # default: half of it
    assert make_attention("double_sparsity:channels=4").channels_for(model.config) == 4
    with pytest.raises(InvalidArgumentError, match="channels 32 exceeds this model's head_dim 16"):
        make_attention("double_sparsity:channels=32").attach(model, model.new_cache(64, fixed=True))
    with pytest.raises(InvalidArgumentError, match="not calibrated yet"):
        make_attention("double_sparsity:channels=8").attach(model, model.new_cache(64, fixed=True))
    with pytest.raises(InvalidArgumentError, match="window 16 must exceed the verify forward's 17 tokens"):
        GenerationConfig(attention="double_sparsity:window=16")


@needs_data
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_speculative_equals_plain_greedy_on_smollm2(smollm):
    from tests.sparse.test_real import generate, prompt

    attention = "double_sparsity:budget=256"
    ids = prompt(smollm)
    plain = generate(smollm, ids, 48, drafter=None, attention=attention)
    for drafter in ("default", "pld"):
        assert generate(smollm, ids, 48, drafter=drafter, attention=attention) == plain, drafter
    assert len(plain) > 20 and plain != generate(smollm, ids, 48, drafter=None)
