"""StreamingLLM: keep the attention sinks (the first tokens) and the most recent tokens, drop the middle.

Based on Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv:2309.17453).
Needs no queries, so it costs nothing at prefill. sinks: first slots always kept (default 4).

It is also the one press here that keeps working while decoding, as in the paper: with ``evict_every=N``
the cache, once it holds N slots more than right after prefill, is cut back to that size (the sinks and the
most recent tokens), so memory stays bounded however long the generation runs. The engine evicts at the same
cache sizes whether it decodes plainly or speculatively (drafts never cross the next eviction), so the two
stay token-identical (``Engine.generate_tokens``). CLI: ``--press streaming_llm:evict_every=64``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..errors import InvalidArgumentError
from .base import ScorerPress, protect, register


@register
@dataclass
class StreamingLLMPress(ScorerPress):
    sinks: int = 4
    evict_every: int = 0        # 0: after prefill only; N: also while decoding, every N new slots
    name = "streaming_llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.evict_every, int) or self.evict_every < 0:
            raise InvalidArgumentError(f"evict_every must be a whole number >= 0, got {self.evict_every!r}")

    def score(self, layer, queries, keys, values):
        B, Hkv, S, _ = keys.shape
        recency = torch.arange(S, device=keys.device, dtype=torch.float32).expand(B, Hkv, S)
        return protect(recency, sinks=self.sinks)

    def evict_while_decoding(self, cache: KVCache, budget: int) -> None:
        """Cut the cache back to ``budget`` slots: the sinks and the most recent ``budget - sinks`` tokens."""
        L, B, H, _ = cache.shape
        n, sinks = cache.length, min(self.sinks, budget)
        keep = torch.cat([torch.arange(sinks), torch.arange(n - (budget - sinks), n)]).to(cache.device)
        cache.compact([keep.expand(B, H, -1)] * L)
