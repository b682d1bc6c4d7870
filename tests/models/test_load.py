"""Checkpoint loading: GGUF name mapping and conventions, the converted cache, HF folders, loud failures.

Fast tests use tiny synthetic GGUF files written with gguf.GGUFWriter from a known HF state dict; the slow
ones compare the embedded models against transformers' own GGUF loader (the independent oracle).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tachy.config import ModelConfig
from tachy.errors import ModelLoadError
from tachy.models import load as L
from tachy.models.load import (GGUF_TO_HF, converted_dir, expected_shapes, gguf_to_hf_name, hf_to_gguf_name,
                               load_checkpoint, unpermute_rope)

# ---- helpers ---------------------------------------------------------------------------------------------------


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written independently of the code under test."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tiny_cfg(arch: str) -> ModelConfig:
    if arch == "gemma3":
        return ModelConfig(arch="gemma3", vocab_size=260, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=1,
                           head_dim=16, intermediate_size=48, max_seq_len=64, rope_theta=1e6, qk_norm=True,
                           norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", sliding_window=8,
                           layer_types=["sliding"] * 5 + ["full"], query_pre_attn_scalar=16.0,
                           embed_scale=32 ** 0.5, tie_embeddings=True, bos_token_id=1, eos_token_ids=[2])
    return ModelConfig(arch="llama", vocab_size=260, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=48, max_seq_len=64, rope_theta=1e5, norm_eps=1e-5,
                       tie_embeddings=False, bos_token_id=1, eos_token_ids=[2])


def random_sd(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in expected_shapes(cfg).items()}


def byte_level_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [*bytes_to_unicode().values()] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "he"]


def storage_kind(i: int, t: torch.Tensor) -> str:
    """Mix storage types across tensors so F32, F16 and a block quantization all go through the loader."""
    if t.ndim == 2 and i % 3 == 1:
        return "f16"
    if t.ndim == 2 and i % 3 == 2 and t.shape[-1] % 32 == 0:
        return "q8_0"
    return "f32"


def write_tiny_gguf(path: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], *, drop: str | None = None,
                    extra: str | None = None, ffn_override: int | None = None) -> Path:
    """A GGUF as llama.cpp's converter would write it: permuted q/k (llama), +1 norms (gemma3), F32/F16/Q8_0."""
    arch = cfg.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(ffn_override or cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if arch == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    tokens = byte_level_vocab()
    assert len(tokens) == cfg.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3, 3, 1])
    w.add_token_merges(["h e"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for i, (name, t) in enumerate(sd.items()):
        gname = hf_to_gguf_name(name, arch)
        assert gname is not None, name
        if gname == drop:
            continue
        if arch == "llama" and gname.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, cfg.num_heads)
        if arch == "llama" and gname.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, cfg.num_kv_heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            t = t + 1
        arr = t.numpy().astype(np.float32)
        kind = storage_kind(i, t)
        if kind == "f16":
            w.add_tensor(gname, arr.astype(np.float16))
        elif kind == "q8_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    if extra:
        w.add_tensor(extra, np.zeros(cfg.hidden_size, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_after_storage(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """What the loader must return: the same tensors, rounded the way each was stored (F32/F16/Q8_0)."""
    out = {}
    for i, (name, t) in enumerate(sd.items()):
        arr = t.numpy().astype(np.float32)
        kind = storage_kind(i, t)
        if kind == "f16":
            arr = arr.astype(np.float16).astype(np.float32)
        elif kind == "q8_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            arr = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        out[name] = torch.from_numpy(arr.reshape(t.shape))
    return out


@pytest.fixture(scope="session")
def _session_cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tachy_cache")


@pytest.fixture
def tmp_cache(_session_cache_root: Path, monkeypatch) -> Path:
    """TACHY_CACHE_DIR (one per session) for the cache tests only; the others use the default cache."""
    monkeypatch.setenv("TACHY_CACHE_DIR", str(_session_cache_root))
    return _session_cache_root


# ---- name mapping --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(GGUF_TO_HF))
def test_mapping_round_trip(arch: str) -> None:
    for gguf_template, hf_template in GGUF_TO_HF[arch].items():
        for i in ("0", "17"):
            g, h = gguf_template.replace("{i}", i), hf_template.replace("{i}", i)
            assert gguf_to_hf_name(g, arch) == h
            assert hf_to_gguf_name(h, arch) == g
    assert gguf_to_hf_name("blk.0.attn_qkv.weight", arch) is None
    assert gguf_to_hf_name("blk.x.attn_q.weight", arch) is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_every_expected_tensor_has_a_gguf_name(arch: str) -> None:
    for name in expected_shapes(tiny_cfg(arch)):
        assert hf_to_gguf_name(name, arch) is not None, name


def test_ffn_norm_differs_per_family() -> None:
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "llama") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.3.post_attention_norm.weight", "gemma3") == \
        "model.layers.3.post_attention_layernorm.weight"


@pytest.mark.parametrize("n_head,out,inp", [(4, 32, 32), (2, 16, 32), (9, 576, 7)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, out: int, inp: int) -> None:
    w = torch.randn(out, inp)
    assert torch.equal(unpermute_rope(llama_cpp_permute(w, n_head), n_head), w)
    assert not torch.equal(llama_cpp_permute(w, n_head), w)


# ---- tiny synthetic GGUF files -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_gguf_round_trip(arch: str, tmp_path: Path, tmp_cache: Path) -> None:
    cfg = tiny_cfg(arch)
    sd = random_sd(cfg)
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", cfg, sd)
    got_cfg, got, tok_dir = load_checkpoint(path, progress=False)
    want = expected_after_storage(sd, arch)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32
        # gemma norms go through (w + 1) - 1 in float32
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6 if "norm" in k else 0, msg=k)
    assert got_cfg.arch == arch and got_cfg.tie_embeddings == cfg.tie_embeddings
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_seq_len", "rope_theta", "layer_types", "sliding_window",
                  "query_pre_attn_scalar", "embed_scale", "qk_norm"):
        assert getattr(got_cfg, field) == pytest.approx(getattr(cfg, field)), field
    assert got_cfg.bos_token_id == 256 and got_cfg.eos_token_ids[0] == 257
    assert 258 in got_cfg.eos_token_ids   # <|endoftext|>, an end-of-turn token present in the vocab
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for m")
    assert tok_dir == converted_dir(path) and tok_dir.is_relative_to(tmp_cache)


def test_converted_cache_reload_is_fast_and_identical(tmp_path: Path, tmp_cache: Path) -> None:
    cfg = tiny_cfg("llama")
    path = write_tiny_gguf(tmp_path / "cached.gguf", cfg, random_sd(cfg, seed=1))
    cfg1, sd1, dir1 = load_checkpoint(path, progress=False)
    assert sorted(p.name for p in dir1.iterdir()) == sorted([*L._CONVERTED_FILES, L._WEIGHTS_FILE])
    calls = []
    orig = L.read_gguf
    try:
        L.read_gguf = lambda *a, **k: calls.append(1) or orig(*a, **k)   # type: ignore[assignment]
        cfg2, sd2, dir2 = load_checkpoint(path, progress=False)
    finally:
        L.read_gguf = orig   # type: ignore[assignment]
    assert not calls, "second load must come from the converted cache"
    assert cfg1 == cfg2 and dir1 == dir2
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # the same file installed elsewhere (a second venv) shares the conversion; a changed file gets its own
    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    shutil.copy(path, copy)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert converted_dir(copy) == dir1
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert converted_dir(copy) != dir1


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, tmp_cache: Path, monkeypatch) -> None:
    cfg = tiny_cfg("llama")
    path = write_tiny_gguf(tmp_path / "interrupted.gguf", cfg, random_sd(cfg, seed=2))

    def boom(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(L, "save_tokenizer_files", boom)   # dies after the weights were written
        with pytest.raises(KeyboardInterrupt):
            load_checkpoint(path, progress=False)
    target = converted_dir(path)
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
    load_checkpoint(path, progress=False)
    assert (target / "model.safetensors").is_file()


def test_broken_cache_is_rebuilt(tmp_path: Path, tmp_cache: Path) -> None:
    cfg = tiny_cfg("llama")
    path = write_tiny_gguf(tmp_path / "rebuilt.gguf", cfg, random_sd(cfg, seed=3))
    _, sd1, folder = load_checkpoint(path, progress=False)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable converted cache"):
        _, sd2, _ = load_checkpoint(path, progress=False)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


# ---- loud failures -------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_llama_gguf(tmp_path: Path) -> Path:
    cfg = tiny_cfg("llama")
    return write_tiny_gguf(tmp_path / "ok.gguf", cfg, random_sd(cfg))


def test_truncated_gguf(tiny_llama_gguf: Path, tmp_path: Path, tmp_cache: Path) -> None:
    data = tiny_llama_gguf.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=str(bad)):
            load_checkpoint(bad, progress=False)


def test_garbage_gguf(tmp_path: Path, tmp_cache: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        load_checkpoint(bad, progress=False)


def test_unmapped_missing_and_misshapen_gguf_tensors(tmp_path: Path, tmp_cache: Path) -> None:
    cfg = tiny_cfg("llama")
    sd = random_sd(cfg)
    extra = write_tiny_gguf(tmp_path / "extra.gguf", cfg, sd, extra="blk.0.mystery.weight")
    with pytest.raises(ModelLoadError, match="blk.0.mystery.weight"):
        load_checkpoint(extra, progress=False)
    missing = write_tiny_gguf(tmp_path / "missing.gguf", cfg, sd, drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(missing, progress=False)
    shape = write_tiny_gguf(tmp_path / "shape.gguf", cfg, sd, ffn_override=40)
    with pytest.raises(ModelLoadError, match="shape"):
        load_checkpoint(shape, progress=False)
    assert not (tmp_cache / "converted").exists() or not any(
        p.name.startswith(("extra", "missing", "shape")) for p in (tmp_cache / "converted").iterdir())


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_checkpoint(Path("/nonexistent/model.gguf"))


# ---- Hugging Face folders ------------------------------------------------------------------------------------

def write_hf_folder(folder: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    names = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].to(torch.bfloat16) for k in names}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({k: sd[k].to(torch.bfloat16) for k in part}, str(folder / fname))
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder(tmp_path: Path, shards: int) -> None:
    cfg = tiny_cfg("llama")
    sd = random_sd(cfg)
    folder = write_hf_folder(tmp_path / "hf", cfg, sd, shards)
    got_cfg, got, tok_dir = load_checkpoint(folder)
    assert tok_dir == folder
    assert got_cfg.hidden_size == cfg.hidden_size and got_cfg.tie_embeddings is False
    assert got.keys() == sd.keys()
    for k in sd:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], sd[k].to(torch.bfloat16).float())


def test_hf_folder_errors(tmp_path: Path) -> None:
    cfg = tiny_cfg("llama")
    sd = random_sd(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"{empty}.*config.json"):
        load_checkpoint(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(cfg.to_hf()))
    with pytest.raises(ModelLoadError, match=f"{no_weights}.*safetensors"):
        load_checkpoint(no_weights)
    corrupt = write_hf_folder(tmp_path / "corrupt", cfg, sd)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_checkpoint(corrupt)
    bad_json = write_hf_folder(tmp_path / "bad_json", cfg, sd)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(bad_json)
    partial = write_hf_folder(tmp_path / "partial", cfg, {k: v for k, v in sd.items() if "layers.1." not in k})
    with pytest.raises(ModelLoadError, match="missing"):
        load_checkpoint(partial)


def test_converted_folder_loads_as_a_folder(tiny_llama_gguf: Path, tmp_cache: Path) -> None:
    cfg, sd, folder = load_checkpoint(tiny_llama_gguf, progress=False)
    cfg2, sd2, folder2 = load_checkpoint(folder)
    assert cfg2 == cfg and folder2 == folder and all(torch.equal(sd[k], sd2[k]) for k in sd)


# ---- the embedded models against transformers' GGUF loader ---------------------------------------------------

def transformers_gguf_state_dict(path: Path, monkeypatch) -> tuple[dict[str, torch.Tensor], object]:
    import transformers
    import transformers.modeling_utils as mu

    # transformers insists on accelerate for GGUF but does not use it on this CPU path; the venv lacks it.
    monkeypatch.setattr(mu, "is_accelerate_available", lambda: True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return dict(model.state_dict()), model.config


@pytest.mark.slow
def test_smollm2_matches_transformers(monkeypatch) -> None:
    from tachy.registry import resolve_model

    path = resolve_model("smollm2-135m")
    cfg, sd, _ = load_checkpoint(path, progress=False)
    ref, hf_cfg = transformers_gguf_state_dict(path, monkeypatch)
    assert cfg.tie_embeddings and hf_cfg.tie_word_embeddings
    ref.pop("lm_head.weight")   # tied: the same tensor as the embedding
    assert sd.keys() == ref.keys()
    for k in ref:   # exact: proves the q/k unpermute and the name mapping on every tensor
        assert torch.equal(sd[k], ref[k]), k
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.intermediate_size) == \
        (hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.hidden_size,
         hf_cfg.intermediate_size)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(hf_cfg.rms_norm_eps)
    assert cfg.max_seq_len == 8192 and cfg.vocab_size == 49152 and 2 in cfg.eos_token_ids


@pytest.mark.slow
def test_gemma3_matches_transformers(monkeypatch) -> None:
    from tachy.registry import resolve_model

    path = resolve_model("gemma3-270m")
    cfg, sd, _ = load_checkpoint(path, progress=False)
    ref, hf_cfg = transformers_gguf_state_dict(path, monkeypatch)
    ref.pop("lm_head.weight")
    assert sd.keys() == ref.keys()
    for k in ref:   # includes every norm (the -1) and q_proj
        assert torch.equal(sd[k], ref[k]), k
    assert cfg.layer_types == ["full" if t == "full_attention" else "sliding" for t in hf_cfg.layer_types]
    assert cfg.sliding_window == hf_cfg.sliding_window == 512
    assert cfg.query_pre_attn_scalar == hf_cfg.query_pre_attn_scalar == 256
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert cfg.embed_scale == pytest.approx(640 ** 0.5) and cfg.head_dim == 256
    assert cfg.eos_token_ids[:2] == [1, 106] and cfg.bos_token_id == 2
