"""RazorAttention: a few heads retrieve from anywhere in the context and keep their whole cache; every other
head only ever looks at the attention sinks and recent tokens, so it keeps just those, plus one compensation
token holding the mean key and value of everything it dropped.

Based on Tang et al. 2024, "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"
(arXiv:2407.15891). Retrieval heads are found once per model with a synthetic probe: a random token sequence
repeated twice; a head scores the attention its second-copy queries pay to the first copy at the same token
(echo) and at the token after it (induction). The top ``heads`` fraction of kv heads (default 0.15, grouped
query heads scored by their best member) are protected, chosen among full-attention layers only: a
sliding-window layer (Gemma 3) never reads past its window, so keeping its whole cache would buy nothing. The other heads share what is left of the budget
``(1 - compression_ratio) * S`` per head on average: ``sinks`` (4) + 1 compensation token + the most recent
tokens. When the protected heads alone exceed the budget, the others keep ``sinks`` + 1 + ``min_window`` (16)
and the cache is larger than asked; ``nbytes`` reports what is held.

Layout: a layer's tensor stays padded to its longest head (protected heads keep everything); ``nbytes`` counts
the entries held, not that padding.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .base import Press, ragged, register, window_attention

_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def retrieval_scores(model, length: int = 128, seed: int = 0) -> torch.Tensor:
    """[layers, kv_heads] echo + induction attention on a repeated random sequence (cached per model)."""
    if model in _PROBES:
        return _PROBES[model]
    cfg = model.config
    length = min(length, cfg.max_seq_len // 2)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, cfg.vocab_size, (length,), generator=g)
    ids = torch.cat([tokens, tokens])[None].to(model.device)
    cache = model.new_cache(capacity=2 * length)
    recorder = _Recorder()
    with recorder.observing(cache):
        model(ids, torch.arange(2 * length, device=model.device), cache)
    scores = torch.zeros(cfg.num_layers, cfg.num_kv_heads)
    i = torch.arange(length - 1)
    for layer in range(cfg.num_layers):
        attn = window_attention(recorder.queries(layer)[:, :, length:length + length - 1],
                                cache.k[layer, :, :, :2 * length])[0]     # [H, length-1, 2*length]
        hit = attn[:, i, i] + attn[:, i, i + 1]                            # echo + induction
        per_query_head = hit.mean(-1)
        scores[layer] = per_query_head.view(cfg.num_kv_heads, -1).amax(-1).cpu()
    _PROBES[model] = scores
    return scores


class _Recorder(Press):
    query_window = -1


def full_attention_scores(model) -> torch.Tensor:
    """retrieval_scores with sliding-window layers at -inf: such a layer never reads past its window, so
    keeping its whole cache would buy nothing."""
    sliding = torch.tensor([t == "sliding" for t in model.config.layer_types])
    return retrieval_scores(model).masked_fill(sliding[:, None], float("-inf"))


def retrieval_heads(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """[layers, kv_heads] bool: the top ``fraction`` of kv heads by ``scores`` (at least one, never a -inf one)."""
    flat = scores.flatten()
    protected = torch.zeros_like(flat, dtype=torch.bool)
    candidates = int(torch.isfinite(flat).sum())
    protected[flat.topk(min(candidates, max(1, round(fraction * flat.numel())))).indices] = True
    return protected.view(scores.shape)


@register
@dataclass
class RazorAttentionPress(Press):
    heads: float = 0.15
    sinks: int = 4
    min_window: int = 16
    name = "razor"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._scores: torch.Tensor | None = None

    def prepare(self, model) -> None:
        self._scores = full_attention_scores(model)

    def apply(self, cache, memo=None) -> None:
        if self._scores is None:
            raise RuntimeError("RazorAttentionPress.prepare(model) must run before apply()")
        L, B, H, _ = cache.shape
        S = cache.length
        protected = retrieval_heads(self._scores, self.heads)
        others = int((~protected).sum())
        total = round((1 - self.compression_ratio) * S) * L * H
        per_other = (total - int(protected.sum()) * S) // max(1, others)
        window = max(self.min_window, per_other - self.sinks - 1)
        if self.sinks + 1 + window >= S:          # nothing to drop
            return
        dropped = slice(self.sinks, S - window)
        kept, counts, comp = [], [], []
        short = torch.cat([torch.arange(self.sinks + 1), torch.arange(S - window, S)])   # sinks, comp, window
        for layer in range(L):
            heads = [torch.arange(S) if protected[layer, h] else short for h in range(H)]
            idx, count = ragged(heads)
            kept.append(idx)
            counts.append(count)
            comp.append((cache.k[layer, 0, :, dropped].float().mean(1), cache.v[layer, 0, :, dropped].float().mean(1)))
        cache.compact(kept, counts)
        for layer, (k_mean, v_mean) in enumerate(comp):
            for h in range(H):
                if not protected[layer, h]:     # the compensation token sits right after the sinks
                    cache.k[layer, 0, h, self.sinks] = k_mean[h].to(cache.dtype)
                    cache.v[layer, 0, h, self.sinks] = v_mean[h].to(cache.dtype)
        self._queries = {}
