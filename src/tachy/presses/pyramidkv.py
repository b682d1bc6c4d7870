"""PyramidKV: SnapKV scores with layer budgets that shrink linearly from the bottom layer to the top one, since
lower layers spread their attention widely and upper layers focus on few tokens. The total kept over all
layers equals the uniform budget's.

Based on Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). beta: the top layer keeps 1/beta of the mean budget (default 20).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .snapkv import SnapKVPress


def pyramid_budgets(num_layers: int, length: int, mean: float, beta: float) -> list[int]:
    """Integer budgets, linear from bottom to top, each in [1, length], summing to round(mean * num_layers)."""
    total = round(mean * num_layers)
    top = mean / beta
    if num_layers == 1:
        return [min(length, total)]
    raw = [2 * mean - top - (2 * mean - 2 * top) * i / (num_layers - 1) for i in range(num_layers)]
    budgets = [min(length, max(1, int(b))) for b in raw]
    # hand what capping/flooring lost to the layers with room, bottom first, one slot at a time
    i = 0
    while sum(budgets) < total:
        if budgets[i % num_layers] < length:
            budgets[i % num_layers] += 1
        i += 1
    while sum(budgets) > total:
        j = max(range(num_layers), key=lambda k: (budgets[k], k))
        budgets[j] -= 1
    return budgets


@register
@dataclass
class PyramidKVPress(SnapKVPress):
    beta: float = 20.0
    name = "pyramidkv"

    def budget(self, layer, num_layers, length):
        mean = max(1, round(length * (1 - self.compression_ratio)))
        return pyramid_budgets(num_layers, length, mean, self.beta)[layer]
