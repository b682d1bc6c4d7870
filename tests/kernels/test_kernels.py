"""tachy's CPU kernels on GGUF blocks: exact decoding, products close to float, row and thread invariance.

Weights are real GGUF blocks: quantized by the gguf package where it can, otherwise (the K formats) random
bytes with sane scales, which exercise every bit of the codes. The reference for decoding is the gguf
package's own dequantizer, bit for bit; for products, float32 matrix products of the dequantized weights.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from tachy import kernels as K
from tachy.errors import InvalidArgumentError

pytestmark = pytest.mark.skipif(not K.available(), reason=f"kernels unavailable: {K.unavailable_reason()}")

QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
ALL = [*QUANTIZED, "F32", "F16", "BF16"]
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208]}


def random_weight(name: str, N: int, Kd: int, seed: int = 0) -> K.QuantWeight:
    """N rows of Kd weights in format ``name``: random bytes, with finite fp16 scales (some subnormal)."""
    rng = np.random.default_rng(seed)
    fmt = K.FORMATS[name]
    if name in ("F32", "F16", "BF16"):
        values = rng.normal(0, 0.05, size=(N, Kd)).astype(np.float32)
        data = {"F32": values.view(np.uint8), "F16": values.astype(np.float16).view(np.uint8),
                "BF16": (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)}[name]
        return K.QuantWeight(fmt, torch.from_numpy(np.ascontiguousarray(data)).reshape(N, -1), Kd)
    rb, bb = K.row_bytes(fmt, Kd), K.BLOCK_BYTES[fmt]
    data = rng.integers(0, 256, size=(N, rb), dtype=np.uint8)
    blocks = data.reshape(N, rb // bb, bb)
    for off in SCALE_OFFSETS[name]:
        scales = rng.normal(0, 0.02, size=(N, rb // bb)).astype(np.float16)
        scales[rng.random(scales.shape) < 0.05] = np.float16(3e-6)        # subnormal fp16
        blocks[:, :, off:off + 2] = scales.view(np.uint8).reshape(N, rb // bb, 2)
    if name == "Q6_K":   # int8 sub-block scales of moderate size
        blocks[:, :, 192:208] = rng.integers(-40, 40, size=(N, rb // bb, 16)).astype(np.int8).view(np.uint8)
    return K.QuantWeight(fmt, torch.from_numpy(data), Kd)


def reference(w: K.QuantWeight) -> np.ndarray:
    """The gguf package's float32 dequantization [N, K]."""
    raw = w.data.numpy()
    if w.format == "F32":
        return raw.view(np.float32).reshape(w.N, w.K)
    if w.format == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(w.N, w.K)
    if w.format == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(w.N, w.K)
    return np.asarray(gguf.quants.dequantize(raw, GGMLQuantizationType(w.fmt)), dtype=np.float32).reshape(w.N, w.K)


def width(name: str) -> int:
    return 512 if name.endswith("_K") else 576


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_dequantize_equals_the_gguf_package_bit_for_bit(name, portable):
    w = random_weight(name, 37, width(name))
    ref = reference(w)
    got = K.dequantize(w, portable=portable).numpy()
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert torch.equal(K.dequantize(w, torch.bfloat16, portable=portable), torch.from_numpy(ref).to(torch.bfloat16))
    rows = torch.tensor([5, 0, 36, 5])
    assert np.array_equal(K.dequantize(w, rows=rows, portable=portable).numpy(), ref[rows.numpy()])


@pytest.mark.parametrize("name", ALL)
def test_bf16_products_are_close_to_float_and_row_invariant(name):
    w = random_weight(name, 48, width(name), seed=1)
    x = torch.randn(13, w.K).to(torch.bfloat16)
    ref = x.float() @ torch.from_numpy(reference(w)).to(torch.bfloat16).float().T
    y = K.matmul(x, w, out_dtype=torch.float32)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    check_invariance(x, w, y)


@pytest.mark.parametrize("name", QUANTIZED)
def test_packed_int8_products_are_close_to_float_and_exact_across_paths(name):
    w = K.pack(random_weight(name, 64, width(name), seed=2))
    assert w.packed is not None
    # 13 random rows, then rows whose blocks round ties (scale 1: each block's max is 127, the rest k + 0.5
    # and -(k + 0.5), which go to even) and a block of zeros (scale 0)
    ties = (torch.arange(3 * w.K) % 64 - 32 + 0.5).reshape(3, w.K)
    ties[:, ::32] = 127.0
    ties[2, :32] = 0.0
    # 40 rows in all: AMX (where the CPU has it) takes 16 at a time, the VNNI path the rest; the same bits
    x = torch.cat([torch.randn(13, w.K), ties, torch.randn(24, w.K)]).to(torch.bfloat16)
    ref = x.float() @ torch.from_numpy(reference(w)).T
    y = K.matmul(x, w, out_dtype=torch.float32)
    err = (y - ref)[:13].norm() / ref[:13].norm()   # the tie rows round by half a step on purpose
    assert err.item() < 1.5e-2   # int8 activations, as llama.cpp computes
    if K.simd() != "portable":   # the vector path does the portable path's operations, lane by lane
        assert torch.equal(K.matmul(x, w, out_dtype=torch.float32, portable=True), y)
    check_invariance(x, w, y)


def check_invariance(x: torch.Tensor, w: K.QuantWeight, y: torch.Tensor) -> None:
    """Row t of a product over T rows has the bits of the product of row t alone, on 1 or 2 threads."""
    try:
        for n in (1, 2):
            K.set_threads(n)
            for T in sorted({t for t in (1, 2, 3, 8, 9, 13, 16, 17, 33) if t < len(x)} | {len(x)}):
                assert torch.equal(K.matmul(x[:T].contiguous(), w, out_dtype=torch.float32), y[:T]), (n, T)
                assert torch.equal(K.matmul(x[T - 1:T].contiguous(), w, out_dtype=torch.float32)[0], y[T - 1])
    finally:
        K.set_threads(None)


def test_products_into_a_column_slice_and_in_bf16():
    w = K.pack(random_weight("Q4_1", 32, 64))
    x = torch.randn(3, 64).to(torch.bfloat16)
    full = K.matmul(x, w, out_dtype=torch.float32)
    out = torch.zeros(3, 80, dtype=torch.float32)
    K.matmul(x, w, out=out[:, 16:48])
    assert torch.equal(out[:, 16:48], full) and not out[:, :16].any() and not out[:, 48:].any()
    assert torch.equal(K.matmul(x, w), full.to(torch.bfloat16))


def test_unpackable_shapes_stay_unpacked_and_bad_input_is_refused():
    odd = random_weight("Q4_0", 24, 64)            # 24 rows: not a multiple of 16
    assert K.pack(odd).packed is None
    assert K.pack(random_weight("F16", 32, 64)).packed is None   # float formats keep the bf16 path
    w = random_weight("Q4_0", 32, 64)
    with pytest.raises(InvalidArgumentError):
        K.matmul(torch.randn(2, 32).to(torch.bfloat16), w)        # wrong width
    with pytest.raises(InvalidArgumentError):
        K.matmul(torch.randn(2, 64), w)                            # float32 activations
    with pytest.raises(InvalidArgumentError):
        K.QuantWeight(K.FORMATS["Q4_0"], torch.zeros(4, 17, dtype=torch.uint8), 64)
    with pytest.raises(IndexError):
        K.dequantize(w, rows=torch.tensor([32]))


def test_threads_do_not_change_results():
    w = K.pack(random_weight("Q8_0", 256, 256, seed=3))
    x = torch.randn(5, 256).to(torch.bfloat16)
    try:
        K.set_threads(1)
        one = K.matmul(x, w, out_dtype=torch.float32)
        K.set_threads(3)
        assert torch.equal(K.matmul(x, w, out_dtype=torch.float32), one)
    finally:
        K.set_threads(None)


def test_threads_to_kernels_leaves_pytorch_alone_where_the_kernels_take_no_part(monkeypatch):
    """Inside, PyTorch runs on one thread only where the kernels run: not with ``on`` False, and not where
    they are not loaded (GGUF layers then run as plain PyTorch linears, which need PyTorch's threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with K.threads_to_kernels(False):
            assert torch.get_num_threads() == 2
        if K.available():
            with K.threads_to_kernels():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
        monkeypatch.setattr(K, "available", lambda: False)
        with K.threads_to_kernels():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows, vocab", [(1, 49152), (3, 1000), (17, 37), (2, 5)])
def test_argmax_and_topk_rows_equal_pytorch(rows, vocab):
    x = torch.randn(rows, vocab)
    assert K.argmax(x) == x.argmax(-1).tolist()
    k = min(8, vocab)
    assert torch.equal(K.topk_ids(x, k), x.topk(k, dim=-1).indices)
    assert K.argmax(x[0]) == [int(x[0].argmax())]
    strided = torch.randn(rows, vocab + 3)[:, :vocab]          # a row stride wider than the row
    assert K.argmax(strided) == strided.argmax(-1).tolist()


def test_ties_go_to_the_lowest_index():
    x = torch.zeros(2, 100)
    x[0, [7, 40]] = 3.0
    x[1, [60, 90]] = 2.0
    assert K.argmax(x) == [7, 60]
    assert K.topk_ids(x, 3).tolist() == [[7, 40, 0], [60, 90, 0]]


@pytest.mark.skipif(not K.available() or not hasattr(K.library(), "tq_horizontal_sums"),
                    reason="an AVX-512 build of the kernels")
def test_the_attention_sum_network_gives_each_rows_own_horizontal_sum_bits():
    """decoder.c's grouped_tokens sums up to 16 product vectors at once through a shuffle network; each sum
    must be the bits _mm512_reduce_add_ps gives that vector alone (what keeps a prefill chunk's tokens, a
    verify row and a decoded token on the same bits). Magnitudes spread over 2^40, where order shows."""
    import ctypes

    gen = torch.Generator().manual_seed(0)
    for n in list(range(1, 17)) * 40:
        rows = torch.randn(n, 16, generator=gen) * torch.exp2(torch.randint(-20, 20, (n, 16), generator=gen))
        network, alone = torch.empty(n), torch.empty(n)
        K.library().tq_horizontal_sums(ctypes.c_void_p(rows.data_ptr()), n, ctypes.c_void_p(network.data_ptr()),
                                       ctypes.c_void_p(alone.data_ptr()))
        assert torch.equal(network.view(torch.int32), alone.view(torch.int32)), n
        assert torch.allclose(alone.double(), rows.double().sum(1), rtol=1e-5, atol=1e-3 * rows.abs().max().item())


@pytest.mark.skipif(not K.available() or not hasattr(K.library(), "tq_attention_scores"),
                    reason="an AVX-512 build of the kernels")
def test_attention_scores_are_the_dot_products(attention_path):
    """decoder.c's attention scores (AMX tiles where the CPU has them: amx_scores) are the scaled dot products
    of float32 queries with bf16 keys, for 1-16 queries, in-place and gathered key lists, partial blocks of 16
    keys and head dims 32-256, to float32's accuracy (the query goes in as two bf16 parts: ~16 bits)."""
    import ctypes

    amx = attention_path == "amx"
    gen = torch.Generator().manual_seed(1)
    for D, P, n, gathered in [(64, 3, 37, False), (64, 16, 64, True), (32, 4, 5, False), (128, 8, 300, True),
                              (256, 4, 19, True), (64, 1, 16, False), (64, 12, 1, True)]:
        q = torch.randn(P, D, generator=gen) * 3
        keys_all = torch.randn(400, D, generator=gen).to(torch.bfloat16)
        keys = (torch.randperm(400, generator=gen)[:n] if gathered else torch.arange(7, 7 + n)).long()
        out = torch.empty(n, P)
        used = K.library().tq_attention_scores(
            ctypes.c_void_p(q.data_ptr()), P, ctypes.c_void_p(keys_all.data_ptr()),
            ctypes.c_void_p(keys.data_ptr()), n, D, 0.125, ctypes.c_void_p(out.data_ptr()), int(amx))
        assert used == int(amx)
        exact = (keys_all[keys].double() @ q.double().T) * 0.125
        bound = (keys_all[keys].double().abs() @ q.double().abs().T) * 0.125
        assert ((out.double() - exact).abs() <= 2e-5 * bound + 1e-30).all(), (D, P, n, gathered)


@pytest.mark.skipif(not K.available() or not hasattr(K.library(), "tq_attention_values"),
                    reason="an AVX-512 build of the kernels")
def test_attention_value_sums_are_the_weighted_sums(attention_path):
    """decoder.c's value sums (AMX tiles where the CPU has them: amx_values, the weights as two bf16 parts) are
    the softmax weights times the bf16 value rows, for 1-16 pairs, in-place and gathered lists, lists that end
    inside a block of 32 keys, head dims 32-256, to float32's accuracy."""
    import ctypes

    amx = attention_path == "amx"
    gen = torch.Generator().manual_seed(2)
    for D, P, L, gathered in [(64, 3, 37, False), (64, 16, 64, True), (32, 4, 5, False), (128, 8, 300, True),
                              (256, 4, 19, True), (64, 1, 33, False), (64, 12, 1, True), (96, 5, 70, False)]:
        e = torch.rand(L, P, generator=gen) * torch.exp2(torch.randint(-12, 1, (L, P), generator=gen)).float()
        values = torch.randn(400, D, generator=gen).to(torch.bfloat16)
        keys = (torch.randperm(400, generator=gen)[:L] if gathered else torch.arange(3, 3 + L)).long()
        out = torch.empty(P, D)
        used = K.library().tq_attention_values(
            ctypes.c_void_p(e.data_ptr()), P, ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(keys.data_ptr()),
            L, D, ctypes.c_void_p(out.data_ptr()), int(amx))
        assert used == int(amx)
        exact = e.double().T @ values[keys].double()
        bound = e.double().T @ values[keys].double().abs()
        assert ((out.double() - exact).abs() <= 2e-5 * bound + 1e-30).all(), (D, P, L, gathered)



def test_a_first_build_says_it_is_compiling_and_later_ones_are_silent(tmp_path, monkeypatch, capsys):
    """Compiling takes ~10 s on 2 cores; a first `tachy generate` had sat silent after "loading ..."."""
    compiled = []
    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(K, "compile_library", lambda sources, out: compiled.append(out.write_bytes(b"lib")))
    lib = K.build()
    err = capsys.readouterr().err
    assert lib.is_file() and str(tmp_path) in str(lib) and len(compiled) == 1
    assert "compiling the CPU kernels for this machine" in err and "kernels compiled in" in err
    assert K.build() == lib and len(compiled) == 1 and capsys.readouterr().err == ""


def test_the_build_uses_the_cpus_vector_instructions():
    """-march=native picks the kernels' vector path from the CPU: AVX-512 (with BF16 and VNNI), else AVX2 (with
    FMA and F16C), else plain C; the C forward over GGUF blocks is the default on the first two."""
    try:
        line = next(x for x in open("/proc/cpuinfo") if x.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    flags = set(line.split(":", 1)[1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        expected = "avx2"
    else:
        expected = "portable"
    assert K.simd() == expected
    assert K.runs_gguf_natively() == (expected != "portable")


def test_the_embedded_model_loads_as_gguf_blocks_through_the_c_forward_where_they_run_natively(smollm):
    if K.runs_gguf_natively():
        assert smollm.weights == "gguf" and smollm.model.cpu_forward is not None
    else:
        assert smollm.weights != "gguf"
