"""StreamingLLM: keep the attention sinks (the first tokens) and the most recent tokens, drop the middle.

Based on Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv:2309.17453).
Needs no queries, so it costs nothing at prefill. sinks: first slots always kept (default 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScorerPress, protect, register


@register
@dataclass
class StreamingLLMPress(ScorerPress):
    sinks: int = 4
    name = "streaming_llm"

    def score(self, layer, queries, keys, values):
        B, Hkv, S, _ = keys.shape
        recency = torch.arange(S, device=keys.device, dtype=torch.float32).expand(B, Hkv, S)
        return protect(recency, sinks=self.sinks)
