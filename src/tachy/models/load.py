"""Checkpoints -> (ModelConfig, Hugging Face-named float32 state dict, tokenizer folder).

Two sources: a GGUF file (quantized, llama.cpp names and conventions) or a Hugging Face folder
(config.json + safetensors). Both come out identical in form, so model code only knows HF names.
GGUF dequantization takes seconds to tens of seconds, so the converted result is cached as a small HF-like
folder (config.json + model.safetensors + tokenizer files) and later loads read that instead.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import kernels
from ..config import ModelConfig
from ..errors import ModelLoadError
from ..kernels import QuantWeight
from ..registry import cache_root
from ..tokenizer import END_OF_TURN_TOKENS, gguf_tokenizer, save_tokenizer_files
from .gguf_file import GGUFFile

CONVERTED_FORMAT = 1   # bump when the conversion changes, so stale caches are rebuilt

# ---- GGUF tensor names -> Hugging Face names ------------------------------------------------------------------
# One table per GGUF architecture; "{i}" is the layer index. The only per-family difference is what
# llama.cpp calls "ffn_norm": Llama's post-attention norm, Gemma 3's pre-feed-forward norm.
_COMMON = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
}
_QKV_BIAS = {f"blk.{{i}}.attn_{x}.bias": f"model.layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkv"}
_QK_NORM = {
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
_LLAMA_FFN_NORM = {"blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight"}

GGUF_TO_HF: dict[str, dict[str, str]] = {
    "llama": {**_COMMON, **_LLAMA_FFN_NORM},
    "qwen2": {**_COMMON, **_LLAMA_FFN_NORM, **_QKV_BIAS},
    "qwen3": {**_COMMON, **_LLAMA_FFN_NORM, **_QK_NORM},
    "gemma3": {
        **_COMMON, **_QK_NORM,
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    },
}


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_COMPILED = {arch: [(_template_regex(g), h) for g, h in table.items()] for arch, table in GGUF_TO_HF.items()}
_COMPILED_INV = {arch: [(_template_regex(h), g) for g, h in table.items()] for arch, table in GGUF_TO_HF.items()}


def _map(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in pattern.groupindex else target
    return None


def gguf_to_hf_name(name: str, arch: str) -> str | None:
    """The HF name of a GGUF tensor, or None when the table has no rule for it."""
    return _map(name, _COMPILED[arch])


def hf_to_gguf_name(name: str, arch: str) -> str | None:
    return _map(name, _COMPILED_INV[arch])


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a model with this config needs, with its shape: the ground truth for validation."""
    h, hd, inter, vocab = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if cfg.arch == "gemma3":
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
    return shapes


def validate_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: Path | str,
                        allow_extra: tuple[str, ...] = ()) -> None:
    """Missing, unexpected or misshapen tensors are a ModelLoadError naming the file, never a silent load."""
    shapes = expected_shapes(cfg)
    missing = sorted(shapes.keys() - sd.keys())
    unexpected = sorted(k for k in sd.keys() - shapes.keys() if k not in allow_extra)
    if missing or unexpected:
        raise ModelLoadError(f"{source}: checkpoint does not match its config: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise ModelLoadError(f"{source}: {name} has shape {tuple(sd[name].shape)}, config implies {shape}")


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp convert_hf_to_gguf's ``permute``: its rope pairs interleaved dims, HF rotates halves."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# ---- GGUF -------------------------------------------------------------------------------------------------
class _Meta:
    """Typed access to GGUF metadata, raising ModelLoadError for required keys that are absent."""

    _MISSING = object()

    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise ModelLoadError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()


def _gguf_config(meta: _Meta, arch: str, tensors: dict[str, Any], vocab: dict[str, int]) -> ModelConfig:
    """ModelConfig from GGUF metadata: llama.cpp's keys carry the same numbers as a config.json."""
    p = arch
    hidden = int(meta.get(f"{p}.embedding_length"))
    heads = int(meta.get(f"{p}.attention.head_count"))
    kv_heads = meta.get(f"{p}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):   # per-layer lists appear in hybrid models; uniform ones are fine
        if len(set(kv_heads)) != 1:
            raise ModelLoadError(f"{meta.path}: per-layer KV head counts are not supported")
        kv_heads = kv_heads[0]
    head_dim = int(meta.get(f"{p}.attention.key_length", hidden // heads))
    layers = int(meta.get(f"{p}.block_count"))
    rope_dims = meta.get(f"{p}.rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise ModelLoadError(f"{meta.path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{meta.path}: GGUF with rope_freqs (Llama 3.1-style rope scaling) is not supported; "
                             f"load the Hugging Face folder instead")
    rope_scaling = None
    scaling_type = meta.get(f"{p}.rope.scaling.type", None)
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta.get(f"{p}.rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ModelLoadError(f"{meta.path}: rope scaling {scaling_type!r} is not supported")
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    eos_ids: list[int] = []
    for tid in [meta.get("tokenizer.ggml.eos_token_id", None), meta.get("tokenizer.ggml.eot_token_id", None),
                *(vocab.get(t) for t in END_OF_TURN_TOKENS)]:
        if tid is not None and int(tid) not in eos_ids:
            eos_ids.append(int(tid))
    common: dict[str, Any] = dict(
        # GGUF shapes list the innermost dim first: token_embd is [hidden, vocab]
        vocab_size=int(tensors["token_embd.weight"].shape[-1]), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=int(kv_heads), head_dim=head_dim,
        intermediate_size=int(meta.get(f"{p}.feed_forward_length")),
        max_seq_len=int(meta.get(f"{p}.context_length", 4096)),
        rope_theta=float(meta.get(f"{p}.rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        norm_eps=float(meta.get(f"{p}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
    )
    if arch == "gemma3":
        pattern = meta.get(f"{p}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):   # per-layer flags, True = sliding
            types = ["sliding" if s else "full" for s in pattern]
        else:
            types = ["full" if i % int(pattern) == int(pattern) - 1 else "sliding" for i in range(layers)]
        # llama.cpp: Gemma 3 27B (62 layers) scales queries by hidden/heads, the others by head_dim.
        scalar = hidden // heads if layers == 62 else head_dim
        return ModelConfig(arch="gemma3", qk_norm=True, hidden_act="gelu_pytorch_tanh",
                           rope_local_theta=float(meta.get(f"{p}.rope.freq_base_swa", 10000.0)),
                           sliding_window=int(meta.get(f"{p}.attention.sliding_window", 512)), layer_types=types,
                           query_pre_attn_scalar=float(scalar), embed_scale=math.sqrt(hidden), **common)
    return ModelConfig(arch="llama", qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", hidden_act="silu", **common)


def read_gguf(path: Path, progress: bool = True, weights: bool = True
              ) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, Any, dict[str, Any]]:
    """Dequantize a GGUF file into (config, HF state dict, fast tokenizer, tokenizer_config). No caching.
    ``weights=False`` reads only the config and the tokenizer (the state dict is None)."""
    import gguf
    from tqdm import tqdm

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated/corrupt files raise ValueError, struct/IndexError, OSError...
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    meta = _Meta(reader, path)
    gguf_arch = str(meta.get("general.architecture"))
    if gguf_arch not in GGUF_TO_HF:
        raise ModelLoadError(f"{path}: GGUF architecture {gguf_arch!r} is not supported "
                             f"(supported: {', '.join(GGUF_TO_HF)})")
    tok_backend, tok_config = gguf_tokenizer(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: GGUF has no token_embd.weight")
    try:
        cfg = _gguf_config(meta, gguf_arch, tensors, tok_backend.get_vocab(with_added_tokens=True))
    except (ValueError, TypeError) as e:   # metadata of the wrong type
        raise ModelLoadError(f"{path}: malformed GGUF metadata ({e})") from e
    unmapped = [t for t in tensors if gguf_to_hf_name(t, gguf_arch) is None]
    if unmapped:
        raise ModelLoadError(f"{path}: GGUF tensors with no Hugging Face name: {unmapped[:5]}")
    if not weights:
        return cfg, None, tok_backend, tok_config

    sd: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", file=sys.stderr,
                  disable=not progress, leave=False):
        name = gguf_to_hf_name(t.name, gguf_arch)
        assert name is not None
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
        shape = tuple(int(d) for d in reversed(t.shape))   # GGUF lists dims innermost first
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))
        sd[name] = _to_hf_convention(w, t.name, gguf_arch, cfg)
    validate_state_dict(cfg, sd, path)
    return cfg, sd, tok_backend, tok_config


def _to_hf_convention(w: torch.Tensor, gguf_name: str, gguf_arch: str, cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's conventions -> Hugging Face's: rope-permuted q/k rows (Llama), Gemma's stored ``1 + w``.
    ``w`` may be float values or rows of quantized blocks (uint8 [rows, bytes]): both are reordered by row."""
    if gguf_arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return unpermute_rope(w, cfg.num_heads).contiguous()
    if gguf_arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return unpermute_rope(w, cfg.num_kv_heads).contiguous()
    if gguf_arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return (w - 1.0).contiguous()   # the converter stores Gemma's (1 + w); HF keeps w
    return w.contiguous()


def read_gguf_blocks(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor | QuantWeight]:
    """A GGUF file's weights in HF names and conventions without dequantizing: matrices as QuantWeight
    (the file's blocks, memory-mapped; q/k rows reordered for rope), vectors as float32 tensors."""
    f = GGUFFile(path)
    gguf_arch = str(f.metadata.get("general.architecture"))
    if gguf_arch not in GGUF_TO_HF:
        raise ModelLoadError(f"{path}: GGUF architecture {gguf_arch!r} is not supported")
    sd: dict[str, torch.Tensor | QuantWeight] = {}
    with warnings.catch_warnings():   # the map is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        for info in f.tensors.values():
            name = gguf_to_hf_name(info.name, gguf_arch)
            if name is None:
                raise ModelLoadError(f"{path}: GGUF tensor {info.name!r} has no Hugging Face name")
            data = torch.from_numpy(f.data(info.name))
            if len(info.shape) == 2:
                if info.ggml_type not in kernels.BLOCK:
                    raise ModelLoadError(f"{path}: {info.name} is stored as ggml type {info.ggml_type}, which "
                                         "tachy cannot read natively; load with --dtype bf16")
                data = data.view(torch.uint8).reshape(info.shape[0], -1)
                sd[name] = QuantWeight(info.ggml_type, _to_hf_convention(data, info.name, gguf_arch, cfg),
                                       info.shape[1])
            else:
                sd[name] = _to_hf_convention(data.float(), info.name, gguf_arch, cfg)
    validate_state_dict(cfg, sd, path)
    return sd


def converted_dir(gguf_path: Path) -> Path:
    """Cache folder keyed by the file's name, size and a hash of its first and last MiB: a replaced file is
    converted again, while the same file installed twice (two virtual environments) shares one conversion."""
    size = gguf_path.stat().st_size
    digest = hashlib.blake2b(digest_size=8)
    with open(gguf_path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return cache_root() / "converted" / f"{gguf_path.stem}-{size}-{digest.hexdigest()}"


# The cache always holds the config and tokenizer; the float32 weights only once a float dtype was asked for
# (a model run on its own GGUF blocks never needs them).
_CONVERTED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
_WEIGHTS_FILE = "model.safetensors"


def _load_converted(folder: Path, weights: bool) -> tuple[ModelConfig, dict[str, torch.Tensor] | None] | None:
    """The cached conversion, or None when it is absent, stale or unreadable (then it is rebuilt)."""
    from safetensors.torch import load_file

    if not all((folder / f).is_file() for f in _CONVERTED_FILES) or (weights and not (folder / _WEIGHTS_FILE).is_file()):
        return None
    try:
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("tachy_format") != CONVERTED_FORMAT:
            return None
        cfg = ModelConfig.from_dict(raw)
        sd = None
        if weights:
            sd = load_file(str(folder / _WEIGHTS_FILE))
            validate_state_dict(cfg, sd, folder)
    except Exception as e:
        warnings.warn(f"ignoring unreadable converted cache {folder}: {e}", stacklevel=3)
        return None
    return cfg, sd


def _write_converted(folder: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor] | None, tok_backend: Any,
                     tok_config: dict[str, Any]) -> Path:
    """Write into a temp folder and rename it into place: an interrupted conversion leaves no half cache.
    Weights added to an existing folder are renamed into it as one file, for the same reason."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    if sd is not None and _load_converted(folder, weights=False) is not None:
        tmp_file = folder / f".{_WEIGHTS_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save_file(sd, str(tmp_file))
            os.replace(tmp_file, folder / _WEIGHTS_FILE)
        finally:
            tmp_file.unlink(missing_ok=True)
        return folder
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        # No "model_type": transformers' AutoTokenizer would then parse this file as an HF config and fail.
        (tmp / "config.json").write_text(json.dumps({**cfg.to_dict(), "tachy_format": CONVERTED_FORMAT}, indent=2))
        if sd is not None:
            save_file(sd, str(tmp / _WEIGHTS_FILE))
        save_tokenizer_files(tok_backend, tok_config, tmp)
        if folder.exists():   # stale or broken cache (or a concurrent writer): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():   # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_gguf(path: Path, progress: bool, quantized: bool
               ) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantWeight], Path]:
    folder = converted_dir(path)
    cached = _load_converted(folder, weights=not quantized)
    if cached is not None:
        cfg, sd = cached
    else:
        cfg, sd, tok_backend, tok_config = read_gguf(path, progress, weights=not quantized)
        try:
            _write_converted(folder, cfg, sd, tok_backend, tok_config)
        except OSError as e:   # an unwritable cache slows the next load but must not fail this one
            warnings.warn(f"could not cache converted weights in {folder}: {e}", stacklevel=3)
            folder = Path(tempfile.mkdtemp(prefix="tachy-tokenizer-"))
            save_tokenizer_files(tok_backend, tok_config, folder)
    if quantized:
        return cfg, read_gguf_blocks(path, cfg), folder
    assert sd is not None
    return cfg, sd, folder


# ---- Hugging Face folder --------------------------------------------------------------------------------------
def _load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        hf = json.loads(cfg_path.read_text())
        # a converted-GGUF cache folder is loadable too: its config.json is a ModelConfig dict
        cfg = ModelConfig.from_dict(hf) if "tachy_format" in hf else ModelConfig.from_hf(hf)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{cfg_path}: unreadable or incomplete config ({type(e).__name__}: {e})") from e
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():   # chat models list their end-of-turn ids here (e.g. Llama 3's <|eot_id|>)
        try:
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            gen_eos = None
        for tid in [] if gen_eos is None else (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
            if tid not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(int(tid))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: unreadable shard index: {e}") from e
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights (other weight formats are not supported)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # SafetensorError, OSError, ... for missing/corrupt shards
            raise ModelLoadError(f"{f}: cannot read safetensors weights ({type(e).__name__}: {e})") from e
        sd.update({k: v.to(torch.float32) for k, v in part.items() if not k.endswith("rotary_emb.inv_freq")})
    validate_state_dict(cfg, sd, folder, allow_extra=("lm_head.weight",) if cfg.tie_embeddings else ())
    return cfg, sd, folder


# ---- entry point ----------------------------------------------------------------------------------------------
def load_checkpoint(path: Path | str, progress: bool = True, quantized: bool = False
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantWeight], Path]:
    """(config, HF-named state dict, folder with tokenizer.json + tokenizer_config.json) for a GGUF file or a
    Hugging Face folder. Weights are float32, or with ``quantized`` (GGUF only) the file's own blocks as
    QuantWeight matrices. GGUF conversions are cached under ``<cache root>/converted``."""
    path = Path(path).expanduser()
    if path.is_dir():
        if quantized:
            raise ModelLoadError(f"{path}: quantized (gguf) weights need a GGUF file, not a Hugging Face folder")
        return _load_hf_folder(path)
    if path.is_file():
        return _load_gguf(path, progress, quantized)
    raise ModelLoadError(f"{path}: no such file or folder")
