"""SnapKV: the last prompt queries (an observation window) vote for the keys they attend to, pooled so that
neighbours of a chosen token come along; the window itself is always kept.

Based on Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv:2404.14469).
window: observation window (last prompt queries, default 32); kernel: max-pool width over slots (default 7).
With the engine's prefill the window ends with the user's question, so the votes are question-aware.
Defaults: on a 2k-token needle probe (smollm2-135m, 3 depths, ratio 0.5) kvpress's 64/5 lost the needle's
later digits (they sit more than 2 slots after the words the question attends to); 32/7 kept them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ScorerPress, per_kv_head, protect, register, window_attention


@register
@dataclass
class SnapKVPress(ScorerPress):
    window: int = 32
    kernel: int = 7
    name = "snapkv"

    @property
    def query_window(self) -> int:
        return self.window

    def attention_votes(self, queries, keys):
        """[B, Hkv, S]: mean attention of the window's queries (grouped heads averaged), max-pooled."""
        attn = window_attention(queries[:, :, -self.window:], keys).mean(2)
        votes = per_kv_head(attn, keys.shape[1])
        return F.max_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2)

    def score(self, layer, queries, keys, values):
        return protect(self.attention_votes(queries, keys), window=min(self.window, keys.shape[2]))
