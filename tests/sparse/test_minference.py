"""MInference (prefill-time sparse attention): budgets covering every key are dense prefill bit for bit (C and
PyTorch); the C decoder's key lists agree with the PyTorch oracle; the estimation finds constructed columns,
diagonals and blocks; the calibration is cached per model and refuses another model's file; bad options fail."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tachy import GenerationConfig, kernels
from tachy.engine import Engine
from tachy.errors import InvalidArgumentError, UnknownNameError
from tachy.sparse import MInferenceAttention, make_attention
from tachy.sparse.minference import (PATTERNS, PrefillState, block_choice, calibrate, top_indices,
                                     vertical_slash_keys, vertical_slash_scores)
from tests.conftest import tiny_gguf_model, tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="kernels unavailable")
# 200-token prompts: most keys unread
SMALL = "sinks=4,window=8,vertical=16,slash=24,blocks=2,last_q=16,dense_last=0,dense_layers=0"
LONG = 512


def prefill(model, ids, method, chunk=64, record=None):
    """Logits of every prompt row, prefilled in chunks as the engine does, under ``method`` (None: dense)."""
    cache = model.new_cache(256, fixed=True)
    if method is not None:
        cache.sparse = PrefillState(method, method.layer_roles(model.config), method.patterns(model),
                                    len(ids) - method.dense_last, record=record)
    out = []
    with torch.inference_mode(), cache.plain_rows():
        for s in range(0, len(ids), chunk):
            c = ids[s:s + chunk]
            out.append(model(torch.tensor([c]), torch.arange(s, s + len(c)), cache)[0])
    return torch.cat(out)


def tokens(n, seed, vocab=101):
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("c_forward", [True, False])
@pytest.mark.parametrize("pattern", ["vs", "ashape", "block"])
def test_budgets_covering_every_key_are_dense_prefill_bit_for_bit(c_forward, pattern):
    if c_forward and not kernels.available():
        pytest.skip("kernels unavailable")
    model = (tiny_gguf_model if c_forward else tiny_model)("llama", seed=5, max_seq_len=LONG)
    ids = tokens(200, 1)
    covering = make_attention(f"minference:pattern={pattern},vertical=200,slash=200,blocks=4,dense_last=0,"
                              f"dense_layers=0")
    dense = prefill(model, ids, None)
    assert torch.equal(prefill(model, ids, covering), dense)
    assert not torch.equal(prefill(model, ids, make_attention(f"minference:pattern={pattern},{SMALL}")), dense)


@needs_kernels
@pytest.mark.parametrize("pattern", ["vs", "ashape", "block"])
def test_rows_read_together_give_the_bits_they_get_alone(pattern):
    """decoder.c reads a run of a chunk's rows together where they share their keys (dense layers, block-sparse
    heads within a query block); recording the slots read sends every row alone: the same logits, bit for bit."""
    model = tiny_gguf_model("llama", seed=8, max_seq_len=LONG)
    ids = tokens(200, 5)
    method = make_attention(f"minference:pattern={pattern},{SMALL.replace('dense_layers=0', 'dense_layers=1')}")
    L, Hkv = model.config.num_layers, model.config.num_kv_heads
    alone = prefill(model, ids, method, record=torch.zeros(L * Hkv * 64 * 264, dtype=torch.uint8))
    assert torch.equal(prefill(model, ids, method), alone)
    assert not torch.equal(alone, prefill(model, ids, None))


@needs_kernels
def test_gemma3_sliding_layers_stay_dense_and_its_full_layer_is_sparse():
    model = tiny_gguf_model("gemma3", seed=5, max_seq_len=LONG)
    ids = tokens(200, 4)
    dense = prefill(model, ids, None)
    covering = make_attention("minference:pattern=vs,vertical=200,slash=200,dense_layers=0")
    assert torch.equal(prefill(model, ids, covering), dense)
    method = make_attention(f"minference:pattern=vs,{SMALL}")
    assert method.patterns(model)[:5].eq(PATTERNS["dense"]).all() and method.patterns(model)[5].eq(1).all()
    assert not torch.equal(prefill(model, ids, method), dense)


@needs_kernels
@pytest.mark.parametrize("pattern", ["vs", "ashape", "block"])
def test_the_c_key_lists_agree_with_the_pytorch_oracle(pattern):
    """One sparse chunk after a dense one: the keys each row read in C (recorded) against the oracle's mask on
    the PyTorch forward's q and k (equal up to the two forwards' rounding: A-shape exactly)."""
    model = tiny_gguf_model("llama", seed=6, max_seq_len=LONG)
    method = make_attention(f"minference:pattern={pattern},{SMALL}")
    ids = tokens(192, 2)
    L, Hkv, T = model.config.num_layers, model.config.num_kv_heads, 64
    record = torch.zeros(L, Hkv, T, 128 + T, dtype=torch.uint8)
    cache = model.new_cache(256, fixed=True)
    with torch.inference_mode(), cache.plain_rows():
        model(torch.tensor([ids[:128]]), torch.arange(128), cache)
        cache.sparse = PrefillState(method, method.layer_roles(model.config), method.patterns(model), 10 ** 6,
                                    record=record)
        model(torch.tensor([ids[128:]]), torch.arange(128, 192), cache)
    masks = {}
    oracle = method.mask

    def keep(state, layer, q, k, mask, scale):
        masks[layer] = oracle(state, layer, q, k, mask, scale)
        return masks[layer]

    saved, model.cpu_forward = model.cpu_forward, None
    method.mask = keep
    try:
        cache = model.new_cache(256, fixed=True)
        with torch.inference_mode(), cache.plain_rows():
            model(torch.tensor([ids[:128]]), torch.arange(128), cache)
            cache.sparse = PrefillState(method, method.layer_roles(model.config), method.patterns(model), 10 ** 6)
            model(torch.tensor([ids[128:]]), torch.arange(128, 192), cache)
    finally:
        model.cpu_forward = saved
    for layer in range(L):
        c, torch_keys = record[layer].bool(), masks[layer][:, :, :192]
        agree = float((c == torch_keys).float().mean())
        assert agree == 1.0 if pattern == "ashape" else agree > 0.97, (layer, agree)
        assert c.sum() < 0.8 * Hkv * torch.arange(129, 193).sum()   # rows read fewer keys than they see


def test_the_estimation_finds_constructed_columns_and_diagonals():
    torch.manual_seed(0)
    N, R, D = 96, 8, 16
    k = torch.randn(N, D) * 0.1
    q = torch.randn(2, R, D) * 0.1
    u = torch.zeros(D)
    u[0] = 1
    k[[10, 41]] += 6 * u                # two columns every query attends to
    q[:, :, 0] = 1
    for r in range(R):                  # each last row attends to the key 5 behind it
        v = torch.zeros(D)
        v[1 + r] = 1
        q[:, r] += v
        k[N - R + r - 5] += 6 * v
    columns, offsets = vertical_slash_scores(q, k, scale=1.0)
    assert set(top_indices(columns, 2).tolist()) == {10, 41}
    assert top_indices(offsets, 1).tolist() == [5]
    keys = vertical_slash_keys(torch.tensor([10, 41]), torch.tensor([0, 5]), 90, 2, N)
    assert keys[0].nonzero().flatten().tolist() == [10, 41, 85, 90]       # row at index 90
    assert keys[1].nonzero().flatten().tolist() == [10, 41, 86, 91]


def test_the_block_estimation_finds_a_constructed_block():
    torch.manual_seed(1)
    N, D = 256, 16
    k = torch.randn(N, D) * 0.1
    q = torch.randn(3, 64, D) * 0.1       # the chunk's rows: key indices 192..255 (query block 3)
    k[64:128, 2] += 4                     # key block 1 matches the queries
    q[:, :, 2] += 1
    chosen = block_choice(q, k, 192, 3)
    assert chosen.shape == (1, 4) and chosen[0].tolist() == [True, True, False, True]   # 0 and 3 forced


class CharTokenizer:
    eos_token_ids: list[int] = []

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 101 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def test_calibration_is_cached_per_model_and_refuses_another_models_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path))
    engine = Engine(tiny_model("llama", seed=7, max_seq_len=LONG), CharTokenizer(), name="tiny")
    method = make_attention(f"minference:{SMALL},calibration_tokens=256")
    patterns = calibrate(method, engine, progress=False)
    files = list((tmp_path / "minference").glob("tiny-*.json"))
    assert len(files) == 1 and patterns.shape == (3, 2)
    saved = json.loads(files[0].read_text())
    assert saved["patterns"] == patterns.tolist() and set(patterns.flatten().tolist()) <= {1, 2, 3}
    recall = torch.tensor(saved["recall"])
    assert ((recall > 0) & (recall <= 1.0001)).all() and (recall.amax(-1) > 0.3).all()
    # cached: the second calibration reads the file
    monkeypatch.setattr("tachy.sparse.minference.measure_patterns", lambda *a, **k: pytest.fail("recalibrated"))
    assert torch.equal(calibrate(make_attention(f"minference:{SMALL},calibration_tokens=256"), engine), patterns)
    # another model (2 layers, 1 kv head) given this file: a clear error
    other = Engine(tiny_model("qwen2", seed=7, max_seq_len=LONG), CharTokenizer(), name="other")
    with pytest.raises(InvalidArgumentError, match=r"calibration .* was made for tiny \(3 layers.*not for other"):
        make_attention(f"minference:{SMALL},calibration={files[0]}").prepare(other)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        make_attention(f"minference:calibration={tmp_path / 'nope.json'}").prepare(other)


@needs_kernels
def test_the_c_calibration_measures_what_the_pytorch_one_does(tmp_path, monkeypatch):
    from tachy.sparse.minference import measure_patterns

    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path))
    model = tiny_gguf_model("llama", seed=8, max_seq_len=LONG)
    engine = Engine(model, CharTokenizer(), name="tiny")
    method = make_attention(f"minference:{SMALL},calibration_tokens=256")
    c = measure_patterns(method, engine, progress=False)
    saved, model.cpu_forward = model.cpu_forward, None
    try:
        reference = measure_patterns(method, engine, progress=False)
    finally:
        model.cpu_forward = saved
    assert torch.equal(c[..., 3], reference[..., 3]) and c[..., 3].min() > 0
    assert torch.allclose(c[..., :3] / c[..., 3:], reference[..., :3] / reference[..., 3:], atol=0.03)


@needs_kernels
def test_the_engine_prefills_sparsely_then_decodes_as_told(tmp_path, monkeypatch):
    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path))
    engine = Engine(tiny_gguf_model("llama", seed=9, max_seq_len=LONG), CharTokenizer(), name="tiny")
    ids = tokens(300, 3)

    def run(attention):
        return [t for r in engine.stream(ids, GenerationConfig(max_new_tokens=6, attention=attention, drafter=None))
                for t in r.token_ids]

    dense = run(None)
    assert run("minference:pattern=vs,vertical=300,slash=300,dense_layers=0") == dense   # everything covered
    assert len(run("minference:pattern=vs,decode=quest:budget=128")) == 6
    method = make_attention(f"minference:{SMALL},calibration_tokens=256")
    out = run(method)
    assert len(out) == 6 and model_key_count(method) == 1                    # calibrated once, on first use
    assert run(method) == out                                                # deterministic, no recalibration


def model_key_count(method: MInferenceAttention) -> int:
    return len(method.calibrated)


def test_registry_and_option_errors():
    assert isinstance(make_attention("minference"), MInferenceAttention)
    m = make_attention("minference:vertical=1000,slash=2048,pattern=vs,decode=quest")
    assert (m.vertical, m.slash, m.decode.name) == (1000, 2048, "quest")
    with pytest.raises(UnknownNameError, match="available: dense, double_sparsity, minference, quest, tidal"):
        make_attention("minferance")
    with pytest.raises(InvalidArgumentError, match="budget is not an option"):
        make_attention("minference:budget=1024")
    with pytest.raises(InvalidArgumentError, match=r"vertical must be a whole number in \[1, "):
        make_attention("minference:vertical=0")
    with pytest.raises(InvalidArgumentError, match=r"last_q must be a whole number in \[1, 1024\]"):
        make_attention("minference:last_q=5000")
    with pytest.raises(InvalidArgumentError, match="sinks 600 .* exceed vertical 512"):
        make_attention("minference:sinks=600")
    with pytest.raises(InvalidArgumentError, match="pattern must be auto, vs, ashape or block"):
        make_attention("minference:pattern=diagonal")
    with pytest.raises(InvalidArgumentError, match="decode must be a decode-time method"):
        make_attention("minference:decode=minference")
    with pytest.raises(UnknownNameError, match="unknown attention 'nope'"):
        make_attention("minference:decode=nope")
    with pytest.raises(InvalidArgumentError, match="unexpected keyword"):
        make_attention("minference:verticals=3")
    with pytest.raises(InvalidArgumentError, match="window 16 must exceed"):
        GenerationConfig(attention="minference:decode=quest:window=16", max_draft_tokens=16)
    assert PATTERNS["vs"] == 1


def test_the_ppl_eval_refuses_a_prefill_method():
    from tachy.eval.sweep import Prefilled, Setting

    engine = Engine(tiny_model("llama", seed=3), CharTokenizer(), name="tiny")
    pre = Prefilled(engine, tokens(20, 1), 4, record=False)
    with pytest.raises(InvalidArgumentError, match="sparsifies the prefill"):
        pre.compressed(Setting("none", 0.0, "minference"))
