"""ModelConfig: the one description of an architecture that every model file reads.

Built from a Hugging Face ``config.json`` or from GGUF metadata, so that both sources
produce the same object and the model code never looks at either format.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError


@dataclass
class ModelConfig:
    arch: str                      # "llama" (Llama, Mistral, Qwen2/3, SmolLM) or "gemma3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # HF rope_scaling dict ("llama3" and "linear" supported)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False           # Qwen3 / Gemma 3: RMSNorm on each head of q and k
    hidden_act: str = "silu"        # "silu" or "gelu_pytorch_tanh"
    # Gemma 3 only
    rope_local_theta: float = 10000.0
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)   # per layer: "full" or "sliding"
    query_pre_attn_scalar: float | None = None
    embed_scale: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gemma3"):
            raise ModelLoadError(f"unsupported architecture {self.arch!r}; tachy supports llama-family and gemma3")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.layer_types:
            self.layer_types = ["full"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ModelLoadError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")

    @property
    def norm_offset(self) -> float:
        """Gemma stores RMSNorm weights as ``w`` and scales by ``1 + w``."""
        return 1.0 if self.arch == "gemma3" else 0.0

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face config.json dict (text configs nested under text_config are unwrapped)."""
        if "text_config" in hf and "hidden_size" not in hf:
            hf = {**hf["text_config"], "model_type": hf.get("model_type", "")}
        model_type = hf.get("model_type", "")
        arch = "gemma3" if model_type.startswith("gemma3") else "llama"
        if model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text", "smollm3"):
            # Llama-shaped families work; anything else is refused rather than silently wrong.
            raise ModelLoadError(f"unsupported model_type {model_type!r}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        eos = hf.get("eos_token_id")
        common = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads), head_dim=head_dim,
            intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_theta=_rope_theta(hf), rope_scaling=hf.get("rope_scaling"),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", arch == "gemma3"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
        )
        if arch == "gemma3":
            window = hf.get("sliding_window", 512)
            types = hf.get("layer_types") or [
                "full" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding"
                for i in range(hf["num_hidden_layers"])]
            types = ["full" if t == "full_attention" or t == "full" else "sliding" for t in types]
            return cls(arch="gemma3", qk_norm=True, hidden_act=hf.get("hidden_activation", "gelu_pytorch_tanh"),
                       rope_local_theta=hf.get("rope_local_base_freq", 10000.0), sliding_window=window,
                       layer_types=types, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim),
                       embed_scale=math.sqrt(hf["hidden_size"]), **common)
        return cls(arch="llama", qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                   qk_norm=model_type == "qwen3", hidden_act=hf.get("hidden_act", "silu"), **common)

    def to_hf(self) -> dict[str, Any]:
        """A transformers config dict for the same architecture (used by the parity tests)."""
        d: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta, rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_ids or None,
        )
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_scaling
        if self.arch == "gemma3":
            d.update(model_type="gemma3_text", hidden_activation=self.hidden_act, sliding_window=self.sliding_window,
                     rope_local_base_freq=self.rope_local_theta, query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                     layer_types=["full_attention" if t == "full" else "sliding_attention" for t in self.layer_types])
        else:
            model_type = "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"
            d.update(model_type=model_type, hidden_act=self.hidden_act)
        return d


def _rope_theta(hf: dict[str, Any]) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _int_if_whole(x: float | None) -> float | int | None:
    """transformers' strict Gemma3 config wants an int where GGUF metadata gives 256.0."""
    return int(x) if x is not None and float(x).is_integer() else x
