"""Quest: query-aware page selection for decoding.

Based on Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
(arXiv:2406.10774). The cache is cut into pages of ``page_size`` keys; each page keeps the elementwise min and
max of its keys. For a query q, sum_d max(q_d min_d, q_d max_d) is at least q.k for every key k of the page
(each term bounds q_d k_d), so ranking pages by it finds the pages that may hold large scores without reading
them. Each row then reads its top pages, the sinks and the recent window. With grouped-query attention a kv
head's pages serve all its query heads, so a page scores the largest bound among them.

C decoder: the bounds live beside the cache (bf16: a bf16 key's min/max is exact) and are computed once per
page, when a sequence commits its last slot; a decode step reads them (2 rows per page: 1/8 of the keys at
16 keys a page) and the chosen pages. CLI: ``--attention quest`` or ``quest:budget=512,page_size=16``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .base import DENSE, SparseAttention, register


def page_bounds(k: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Elementwise min and max of each whole page: k [..., S, D] -> two [..., S // page_size, D]."""
    pages = k.shape[-2] // page_size
    k = k[..., :pages * page_size, :].unflatten(-2, (pages, page_size))
    return k.amin(-2), k.amax(-2)


def page_scores(q: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Quest's upper bound of q.k over each page: q [..., T, D], lo/hi [..., pages, D] -> [..., T, pages]."""
    q = q.float()[..., :, None, :]
    return torch.maximum(q * lo.float()[..., None, :, :], q * hi.float()[..., None, :, :]).sum(-1)


@register
@dataclass
class QuestAttention(SparseAttention):
    page_size: int = 16
    dense_layers: int = 0       # the first layers read every key (the paper keeps 2 dense: dense_layers=2)
    name = "quest"
    method_id = 1

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or not 1 <= self.page_size <= 256:
            raise InvalidArgumentError(f"quest: page_size must be a whole number in [1, 256], got {self.page_size!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise InvalidArgumentError(f"quest: dense_layers must be a whole number >= 0, got {self.dense_layers!r}")
        super().__post_init__()

    def layer_roles(self, config):
        return [DENSE if i < self.dense_layers else role for i, role in enumerate(super().layer_roles(config))]

    @property
    def unit(self) -> int:
        return self.page_size

    def c_fields(self, state, cache):
        bounds = state.page_bounds(cache)
        return {"bounds": bounds.data_ptr(), "max_pages": bounds.shape[3]}

    def choose(self, state, layer, q, k, visible, candidate, scale):
        Hkv, (_, H, T, D) = k.shape[1], q.shape
        lo, hi = page_bounds(k[0], self.page_size)                                    # [Hkv, pages, D]
        scores = page_scores(q[0].view(Hkv, H // Hkv, T, D), lo[:, None], hi[:, None])   # [Hkv, G, T, pages]
        return self.top(scores.amax(1), candidate)

    def keys_read(self, role: int, context: int) -> float:
        """The chosen keys, plus each page's two bound rows (keys only: half a K/V row each)."""
        if role == DENSE:
            return float(context)
        return super().keys_read(role, context) + (context // self.page_size if context > self.budget else 0)
