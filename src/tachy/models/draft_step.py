"""DraftStep: decoding a token (or a few) with as few ops as possible, for a draft model only.

A draft token's only job is to be a good guess: the target verifies it, so the draft's numerics need not match
the target's or Hugging Face's. ``Transformer.forward`` pays for exactness and generality on every call
(float32 norms and rope, masks, press and batch hooks, dtype casts); for the int4 self-draft, which is bound
by op dispatch rather than by memory (docs/benchmarks.md, section 3), that is most of a step. This step
computes the same model for one new token at the cache's next slot with bf16 norms and rope, the int4 kernel
called directly, and no mask (a plain cache holds only visible keys; a sliding layer reads its window). A few
tokens at once (a guessed continuation the draft model checks in one forward) take a causal mask among them.

Works for both architectures (Llama family and Gemma 3) on a plain KVCache: not ``fixed``, no press, batch 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache
from .quant import Int4Linear


def fast_linear(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module as a function of a [1, in] input, calling the packed int4 kernel directly where it can."""
    if isinstance(module, Int4Linear) and module.cpu_kernel and module.bias is None:
        weight, group, scales = module.weight, module.group_size, module.scales_and_zeros
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales)
    return module


def norm_weight(norm: nn.Module | None, dtype: torch.dtype) -> Tensor | None:
    """An RMSNorm's effective scale (Gemma's ``1 + w`` folded in) times sqrt(width), in ``dtype``: see rms_norm."""
    return None if norm is None else (norm.scale.float() * norm.scale.shape[-1] ** 0.5).to(dtype)


def rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    """RMSNorm in three ops: x * w * sqrt(width) / ||x|| (``weight`` from norm_weight). It drops the norm's
    epsilon, which only matters for near-zero rows, and is ~3x faster than ``F.rms_norm`` on a bf16 row here
    (5 vs 14 us), which is most of a draft step's norm time (61 norms per SmolLM2 step)."""
    return x * weight / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


@dataclass
class LayerWeights:
    attn_norm: Tensor
    qkv: Callable
    qk_norm: Tensor | None          # [H + Hkv, D]: q_norm's scale on the query heads, k_norm's on the key heads
    o: Callable
    post_attn_norm: Tensor | None   # Gemma's sandwich norms; None for Llama
    mlp_norm: Tensor
    gate_up: Callable
    down: Callable
    post_mlp_norm: Tensor | None
    rope: int                       # index into DraftStep.ropes
    window: int | None              # sliding-window layers read only their last ``window`` keys


class DraftStep:
    """``DraftStep(model)(token, cache)`` -> the next-token logits [V] (float32) after ``token``, written at the
    cache's next slot (the cache advances by one, as after ``model(...)``); ``DraftStep(model)(tokens, cache)``
    -> [len(tokens), V], one row per token."""

    def __init__(self, model: nn.Module):
        cfg, dtype = model.config, model.dtype
        self.model, self.dtype = model, dtype
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.embed_scale = cfg.attn_scale, cfg.embed_scale
        self.act = F.silu if cfg.hidden_act == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
        ropes = model.layer_ropes()
        self.ropes = [(r.cos, r.signed_sin) for r in dict.fromkeys(ropes)]   # float32 tables, shared
        rope_index = {id(r): i for i, r in enumerate(dict.fromkeys(ropes))}
        self.layers = []
        for i, block in enumerate(model.layers):
            attn, sandwich = block.self_attn, hasattr(block, "pre_feedforward_layernorm")
            self.layers.append(LayerWeights(
                attn_norm=norm_weight(block.input_layernorm, dtype), qkv=fast_linear(attn.qkv_proj),
                qk_norm=None if attn.q_norm is None else torch.cat([
                    norm_weight(attn.q_norm, dtype).expand(self.heads, -1),
                    norm_weight(attn.k_norm, dtype).expand(self.kv_heads, -1)]),
                o=fast_linear(attn.o_proj),
                post_attn_norm=norm_weight(block.post_attention_layernorm, dtype) if sandwich else None,
                mlp_norm=norm_weight(block.pre_feedforward_layernorm if sandwich else block.post_attention_layernorm,
                                     dtype),
                gate_up=fast_linear(block.mlp.gate_up_proj), down=fast_linear(block.mlp.down_proj),
                post_mlp_norm=norm_weight(block.post_feedforward_layernorm, dtype) if sandwich else None,
                rope=rope_index[id(ropes[i])],
                window=cfg.sliding_window if cfg.layer_types[i] == "sliding" else None))
        self.final_norm = norm_weight(model.norm, dtype)
        self.lm_head = fast_linear(model.lm_head)

    @staticmethod
    def supports(cache: KVCache) -> bool:
        return (not cache.fixed and cache.prefix is None and not cache.compressed and not cache.ragged
                and cache.shape[1] == 1 and cache.observer is None)

    @torch.inference_mode()
    def __call__(self, tokens: int | Sequence[int], cache: KVCache) -> Tensor:
        """Feed ``tokens`` (one, or a few: a guessed continuation the draft model checks in one forward) at
        the cache's next slots; the next-token logits float32 [V] after a single token, [len(tokens), V]
        after several, one row per token. The cache advances by all of them."""
        single = isinstance(tokens, int)
        ids = [tokens] if single else list(tokens)
        n = len(ids)
        cache.reserve(n)
        slot, H, Hkv, D = cache.length, self.heads, self.kv_heads, self.head_dim
        group, end = H // Hkv, slot + n
        embedding = self.model.embed_tokens.weight
        x = embedding[ids[0] if n == 1 else torch.tensor(ids, device=embedding.device)].view(n, -1).to(self.dtype)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        ropes = [(cos[slot:end, None].to(self.dtype), sin[slot:end, None].to(self.dtype)) for cos, sin in self.ropes]
        masks: dict[int | None, Tensor | None] = {}
        for w, (k, v) in zip(self.layers, cache.layer_views()):
            qkv = w.qkv(rms_norm(x, w.attn_norm)).view(n, H + 2 * Hkv, D)
            qk, new_v = qkv.split([H + Hkv, Hkv], dim=1)   # rope (and q/k norms) on all heads at once
            if w.qk_norm is not None:
                qk = rms_norm(qk, w.qk_norm)
            cos, sin = ropes[w.rope]
            qk = qk * cos + qk.roll(D // 2, -1) * sin
            k[0, :, slot:end] = qk[:, H:].transpose(0, 1)
            v[0, :, slot:end] = new_v.transpose(0, 1)
            first = 0 if w.window is None else max(0, slot + 1 - w.window)   # the first token's window
            if w.window not in masks:
                masks[w.window] = self._mask(slot, n, first, w.window, group, x.device)
            # queries grouped by their key head ([Hkv, group * n, D]), so attention needs no repeated K/V
            q = qk[:, :H].view(Hkv, group, D) if n == 1 else qk[:, :H].view(n, Hkv, group, D).permute(1, 2, 0, 3)
            out = F.scaled_dot_product_attention(q.reshape(1, Hkv, group * n, D), k[:, :, first:end],
                                                 v[:, :, first:end], attn_mask=masks[w.window], scale=self.scale)
            if n > 1:
                out = out.view(Hkv, group, n, D).permute(2, 0, 1, 3)
            out = w.o(out.reshape(n, H * D))
            if w.post_attn_norm is not None:
                out = rms_norm(out, w.post_attn_norm)
            x = x + out
            gate, up = w.gate_up(rms_norm(x, w.mlp_norm)).chunk(2, dim=-1)
            out = w.down(self.act(gate) * up)
            if w.post_mlp_norm is not None:
                out = rms_norm(out, w.post_mlp_norm)
            x = x + out
        cache.advance(n)
        logits = self.lm_head(rms_norm(x, self.final_norm)).float()
        return logits[0] if single else logits

    @staticmethod
    def _mask(slot: int, n: int, first: int, window: int | None, group: int,
              device: torch.device) -> Tensor | None:
        """Which keys ``first..slot+n-1`` each of ``n`` new tokens at ``slot..`` sees (causal, and within a
        sliding window), repeated for the ``group`` query heads per key head; None when it sees them all."""
        if n == 1:
            return None
        query = torch.arange(slot, slot + n, device=device)[:, None]
        key = torch.arange(first, slot + n, device=device)[None, :]
        visible = key <= query
        if window is not None:
            visible &= key > query - window
        return visible.repeat(group, 1)
