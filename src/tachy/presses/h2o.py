"""H2O: heavy hitters (keys with the largest attention accumulated over every prompt query) plus the recent
tokens, half of the budget each.

Based on Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (arXiv:2306.14048). Scores the whole prompt's attention, in chunks of ``chunk`` queries: the costliest
press at prefill (O(S^2) per layer), which is why tachy eval scores once per prompt and reuses it per ratio.
recent_share: fraction of the budget given to the most recent tokens (default 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScorerPress, per_kv_head, protect, register, window_attention


@register
@dataclass
class H2OPress(ScorerPress):
    recent_share: float = 0.5
    chunk: int = 512
    name = "h2o"
    query_window = -1

    def score(self, layer, queries, keys, values):
        total = accumulated_attention(queries, keys, self.chunk)
        recent = int(self.budget(layer, 0, keys.shape[2]) * self.recent_share)
        return protect(per_kv_head(total, keys.shape[1]), window=recent)


def accumulated_attention(queries, keys, chunk: int = 512):
    """[B, H, S]: attention each key received, summed over all S prompt queries (causal), in query chunks."""
    S = keys.shape[2]
    total = torch.zeros(queries.shape[:2] + (S,), device=keys.device)
    for end in range(S, 0, -chunk):   # queries end-chunk..end see keys up to themselves
        start = max(0, end - chunk)
        total[..., :end] += window_attention(queries[:, :, start:end], keys[:, :, :end]).sum(2)
    return total
