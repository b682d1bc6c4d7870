"""EMS-style evict-then-merge: score tokens by global and local importance, give each kv head of a layer the
share of the layer's budget its scores earn, and merge every evicted token into its most similar kept token
instead of discarding it.

Based on Li et al. 2024, "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance". Global importance: the mean attention a key received from the
prompt queries that could see it (accumulated attention divided by their number, which removes H2O's bias to
early tokens); local: SnapKV's window vote. Each is normalized per head, mixed with ``alpha`` (0.5) and
max-pooled over ``kernel`` (7) slots as in SnapKV (without pooling, multi-token facts lose their tail). The
layer's budget ``n * Hkv`` goes to its top scores over all heads together (head-wise budgets), with ``sinks``
(4) and the last ``window`` (32) tokens of every head kept. ``merging=False`` evicts only. Merge: an evicted token joins the kept,
unprotected token whose key is most cosine-similar; that token's key and value become the score-weighted mean
of the group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PROTECTED, Press, per_kv_head, protect, ragged, register, window_attention
from .h2o import accumulated_attention


@register
@dataclass
class EMSPress(Press):
    alpha: float = 0.5
    sinks: int = 4
    window: int = 32
    kernel: int = 7
    merging: bool = True          # False: evict only (the ablation)
    name = "ems"
    query_window = -1

    def importance(self, queries, keys) -> torch.Tensor:
        """[B, Hkv, S] mixed global/local importance (each part sums to 1 per head)."""
        S = keys.shape[2]
        seen_by = torch.arange(S, 0, -1, device=keys.device, dtype=torch.float32)    # queries that see key j
        glob = per_kv_head(accumulated_attention(queries, keys) / seen_by, keys.shape[1])
        local = per_kv_head(window_attention(queries[:, :, -self.window:], keys).mean(2), keys.shape[1])
        mixed = (self.alpha * glob / glob.sum(-1, keepdim=True)
                 + (1 - self.alpha) * local / local.sum(-1, keepdim=True))
        return F.max_pool1d(mixed, self.kernel, stride=1, padding=self.kernel // 2)

    def compress(self, cache, layer, queries, keys, values, memo=None):
        key = ("ems", self.alpha, self.window, self.kernel, layer)
        score = memo.get(key) if memo is not None else None
        if score is None:
            score = self.importance(queries, keys)
            if memo is not None:
                memo[key] = score
        B, H, S = score.shape
        budget = max(1, round(S * (1 - self.compression_ratio))) * H
        ranked = protect(score, sinks=self.sinks, window=min(self.window, S))[0]      # [H, S]
        top = ranked.flatten().topk(min(budget, H * S)).indices
        chosen = torch.zeros(H * S, dtype=torch.bool, device=keys.device)
        chosen[top] = True
        chosen = chosen.view(H, S)
        for h in range(H if self.merging else 0):
            merge(keys[0, h], values[0, h], score[0, h], chosen[h], ranked[h] < PROTECTED)
        return ragged([chosen[h].nonzero().flatten() for h in range(H)])


def merge(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, mergeable: torch.Tensor) -> None:
    """Fold the evicted rows of k/v [S, D] into their most similar kept, mergeable rows, in place."""
    targets = (kept & mergeable).nonzero().flatten()
    evicted = (~kept).nonzero().flatten()
    if not len(targets) or not len(evicted):
        return
    sim = F.normalize(k[evicted].float(), dim=-1) @ F.normalize(k[targets].float(), dim=-1).T
    to = sim.argmax(-1)
    weight = torch.zeros(len(targets), device=k.device).index_add_(0, to, w[evicted]) + w[targets]
    for x in (k, v):
        acc = x[targets].float() * w[targets, None]
        acc.index_add_(0, to, x[evicted].float() * w[evicted, None])
        x[targets] = (acc / weight.clamp_min(1e-12)[:, None]).to(x.dtype)
