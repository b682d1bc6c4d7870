"""Gemma 3 text decoder: only what it changes over the Llama family (llama.py).

Reference: Gemma Team 2025, "Gemma 3 Technical Report"; transformers' modeling_gemma3.py for numerics.
Changes: embeddings scaled by sqrt(hidden), RMSNorm as ``x * (1 + w)``, q/k norms, a norm before and after
both attention and MLP ("sandwich"), GELU-tanh MLP, and interleaved layers: five local layers with a sliding
window and their own rope base for every global layer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache import KVCache
from ..config import ModelConfig
from .llama import Block, RMSNorm, Rope, Transformer, causal_mask


class Gemma3Block(Block):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, offset=1.0)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, mask: Tensor | None) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Transformer(Transformer):
    block_class = Gemma3Block

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.local_rope = Rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_local_theta)
        self.sliding = [t == "sliding" for t in cfg.layer_types]

    def embed(self, tokens: Tensor) -> Tensor:
        x = self.embed_tokens(tokens)
        return (x * torch.tensor(self.config.embed_scale, dtype=x.dtype)).to(self.dtype)

    def layer_ropes(self) -> list[Rope]:
        return [self.local_rope if s else self.rope for s in self.sliding]

    def attention_inputs(self, positions: Tensor, start: int, mask: Tensor | None) -> list[tuple]:
        full = (self.rope(positions), mask)
        local = (self.local_rope(positions), sliding_window_mask(positions, start, mask, self.config.sliding_window))
        return [local if s else full for s in self.sliding]


def sliding_window_mask(positions: Tensor, start: int, mask: Tensor | None, window: int) -> Tensor | None:
    """Restrict ``mask`` [T, S] so each query sees only keys less than ``window`` positions behind it.

    Cached slots hold positions 0..start-1 in order (the cache keeps slot order = position order); slots past
    the new tokens (a fixed-size cache) are already masked out.
    """
    T = positions.shape[0]
    if start + T <= window:  # positions never exceed start + T - 1, so nothing is out of reach
        return mask
    keys = start + T if mask is None else mask.shape[1]
    key_pos = torch.cat([torch.arange(start, device=positions.device), positions,
                         torch.zeros(keys - start - T, dtype=positions.dtype, device=positions.device)])
    near = (positions[:, None] - key_pos[None, :]) < window
    if mask is None:
        mask = causal_mask(start, T, positions.device)
    return mask & near
