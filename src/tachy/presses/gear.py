"""GEAR: quantized KV plus the two cheap corrections of its error, a sparse matrix of outliers (kept exact)
and a low-rank approximation of the quantization residual.

Based on Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
Inference of LLM" (arXiv:2403.05527), on top of the KIVI quantizer (kivi.py). Per layer and kv head:
outliers S = the ``outliers`` fraction of largest-magnitude entries; Q = quantize(X - S);
L = rank-``rank`` SVD of (X - S - dequantize(Q)); attention reads dequantize(Q) + L + S.
Bytes counted: KIVI's packed codes and scales, L's factors in the cache dtype, and each outlier as its
value (cache dtype) plus an int32 index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import register
from .kivi import KIVIPress, QuantizedPrefix


def split_outliers(x: Tensor, fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, H, N, D] -> (x without its largest-|x| entries, their flat indices per head, their values)."""
    flat = x.flatten(2)
    n = max(1, int(flat.shape[-1] * fraction))
    idx = flat.abs().topk(n, dim=-1).indices
    vals = flat.gather(-1, idx)
    rest = flat.scatter(-1, idx, torch.zeros_like(vals)).view_as(x)
    return rest, idx.to(torch.int32), vals


def low_rank(r: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors (A [B, H, N, rank], B [B, H, rank, D]) of r [B, H, N, D]."""
    u, s, vh = torch.linalg.svd(r.float(), full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]).to(dtype), vh[..., :rank, :].to(dtype)


class GEARPrefix(QuantizedPrefix):
    def __init__(self, k: Tensor, v: Tensor, bits: int, key_group: int, value_group: int, rank: int,
                 outliers: float):
        corrections = []
        rests = []
        for x in (k, v):
            per_layer = [split_outliers(x[i], outliers) for i in range(x.shape[0])]
            rests.append(torch.stack([p[0] for p in per_layer]))
            corrections.append([p[1:] for p in per_layer])
        super().__init__(rests[0], rests[1], bits, key_group, value_group)
        self.sparse = corrections                       # [k|v][layer] -> (indices, values)
        self.factors = [[], []]
        for j, x in enumerate(rests):
            for i in range(x.shape[0]):
                approx = QuantizedPrefix.read(self, i)[j]
                self.factors[j].append(low_rank(x[i] - approx, rank, x.dtype))

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        out = []
        for j, x in enumerate(super().read(layer)):
            a, b = self.factors[j][layer]
            x = x + a @ b
            idx, vals = self.sparse[j][layer]
            x = x.flatten(2).scatter(-1, idx.long(), vals).view_as(x)
            out.append(x)
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for store in (self.sparse, self.factors)
                    for per_layer in store for pair in per_layer for t in pair)
        return super().nbytes + extra


@dataclass
class GEARPress(KIVIPress):
    """KIVI quantization with GEAR's outlier and low-rank corrections. rank: residual rank per head (default
    4); outliers: fraction of entries kept exact (default 0.01)."""

    rank: int = 4
    outliers: float = 0.01

    def quantize(self, k: Tensor, v: Tensor) -> GEARPrefix:
        return GEARPrefix(k, v, self.bits, self.key_group, self.value_group or k.shape[-1], self.rank,
                          self.outliers)


@register
@dataclass
class GEAR4Press(GEARPress):
    bits: int = 4
    name = "gear4"


@register
@dataclass
class GEAR2Press(GEARPress):
    bits: int = 2
    name = "gear2"
