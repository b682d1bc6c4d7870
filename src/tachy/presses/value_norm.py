"""Value-aware token importance (VATP): a token's attention score times the L1 norm of its value vector, since
a token with a tiny value contributes little to the output however much it is attended to.

Based on Guo et al. 2024, "Attention Score is not All You Need for Token Importance Indicator in KV Cache
Reduction: Value Also Matters" (arXiv:2406.12335). The attention score here is SnapKV's pooled window vote
(the paper pairs the value norm with accumulated-attention scores; the idea is the same).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import protect, register
from .snapkv import SnapKVPress


@register
@dataclass
class ValueNormPress(SnapKVPress):
    name = "vatp"

    def score(self, layer, queries, keys, values):
        votes = self.attention_votes(queries, keys) * values.float().abs().sum(-1)
        return protect(votes, window=min(self.window, keys.shape[2]))
