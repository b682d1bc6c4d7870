"""Head-level budgets: retrieval heads keep their whole cache, every other head keeps what SnapKV's votes rank
highest within the rest of the budget.

In the spirit of Fu et al. 2024, "Not All Heads Matter: A Head-Level KV Cache Compression Method with
Integrated Retrieval and Reasoning" (HeadKV, arXiv:2410.19258): budgets are set per head from a retrieval
probe, and tokens are chosen within each head by SnapKV. HeadKV spreads one shared pool over heads in
proportion to their scores; this press takes the simpler two-level split RazorAttention uses: the top
``heads`` fraction of kv heads by razor's echo/induction probe (presses/razor.py) keep everything, the others
share the remainder evenly. Where razor keeps only sinks and a recent window on those heads, this press keeps
the question-voted tokens, which is what a small model still reads far back with its non-retrieval heads: on
smollm2-135m at 4k (20 needles, 50% KV) razor scored 50% and this 80%, the full cache's score
(docs/presses.md).

Budget: ``round(S * (1 - compression_ratio))`` per head on average, exactly (the remainder of the even split
goes to the first heads); every other head keeps at least ``sinks`` + the observation ``window``, so when the
retrieval heads alone use up the budget the cache is larger than asked (``nbytes`` reports what is held).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import protect, ragged, register
from .razor import full_attention_scores, retrieval_heads
from .snapkv import SnapKVPress


@register
@dataclass
class HeadKVPress(SnapKVPress):
    heads: float = 0.15
    sinks: int = 4
    name = "headkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._protected: torch.Tensor | None = None

    def prepare(self, model) -> None:
        self._protected = retrieval_heads(full_attention_scores(model), self.heads)

    def score(self, layer, queries, keys, values):
        return protect(self.attention_votes(queries, keys), sinks=self.sinks, window=min(self.window, keys.shape[2]))

    def head_budgets(self, length: int) -> torch.Tensor:
        """[layers, kv_heads] slots each head keeps out of ``length``."""
        protected = self._protected
        others = int((~protected).sum())
        total = max(1, round(length * (1 - self.compression_ratio))) * protected.numel()
        spare = total - int(protected.sum()) * length
        floor = min(length, self.sinks + self.window)
        share = torch.full((others,), spare // max(1, others))
        share[:spare % max(1, others)] += 1
        budgets = torch.full(protected.shape, length)
        budgets[~protected] = share.clamp(floor, length)
        return budgets

    def compress(self, cache, layer, queries, keys, values, memo=None):
        if self._protected is None:
            raise RuntimeError("HeadKVPress.prepare(model) must run before apply()")
        scores = self.scores(layer, queries, keys, values, memo)[0]         # [Hkv, S]
        budgets = self.head_budgets(keys.shape[2])[layer]
        return ragged([scores[h].topk(int(n)).indices.sort().values for h, n in enumerate(budgets)])
