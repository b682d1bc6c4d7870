"""KIVI-style quantized KV: keys quantized per channel (groups of ``key_group`` tokens share a scale and zero
point per channel, because key outliers live in fixed channels; a last partial group gets its own scales),
values per token (groups of ``value_group`` channels), both asymmetric to ``bits`` bits; the most recent
``residual`` tokens stay in full precision.

Based on Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (arXiv:2402.02750).
The quantized prefix is packed (two 4-bit or four 2-bit codes per byte) with fp16 scales and zero points and
moved out of the full-precision buffer (``KVCache.freeze_prefix``); attention reads it dequantized, so every
decode step pays a dequantization of the prefix: the memory shrinks, the speed does not improve on a CPU
(int4kv.py chooses a layout the int4 matmul kernel reads in place, and decodes faster than the full cache).
Tokens generated after the prompt stay in full precision (KIVI re-quantizes them every ``residual`` tokens).

bits: 4 or 2; residual: full-precision recent tokens (default 32); key_group: tokens per key scale
(default 128); value_group: channels per value scale (default 0 = the whole head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .base import Press, register

SCALE_DTYPE = torch.float16


def quantize(x: Tensor, bits: int, group_dim: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric ``bits``-bit codes of x [..., N, D], one (scale, zero) per ``group`` elements along
    ``group_dim`` (-2: tokens, per channel; -1: channels, per token). Returns (packed uint8 [..., N, D*bits/8],
    scale, zero) where scale/zero broadcast against x viewed in groups."""
    *lead, N, D = x.shape
    if group_dim == -2:
        g = x.float().reshape(*lead, N // group, group, D)
        mn, mx = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
    else:
        g = x.float().reshape(*lead, N, D // group, group)
        mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8).to(SCALE_DTYPE)
    zero = mn.to(SCALE_DTYPE)
    codes = ((g - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8).reshape(*lead, N, D)
    return pack(codes, bits), scale, zero


def dequantize(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_dim: int, dtype: torch.dtype) -> Tensor:
    codes = unpack(packed, bits).float()
    *lead, N, D = codes.shape
    if group_dim == -2:
        g = codes.reshape(*lead, scale.shape[-3], N // scale.shape[-3], D)
    else:
        g = codes.reshape(*lead, N, scale.shape[-2], D // scale.shape[-2])
    return (g * scale.float() + zero.float()).reshape(*lead, N, D).to(dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] (each < 2**bits) -> [..., D*bits/8], 8/bits codes per byte."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    per, mask = 8 // bits, 2 ** bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, -1).reshape(*packed.shape[:-1], -1)


class QuantizedPrefix:
    """The first ``length`` slots of every layer, quantized; ``read(layer)`` dequantizes one layer."""

    def __init__(self, k: Tensor, v: Tensor, bits: int, key_group: int, value_group: int):
        # k, v [layers, B, Hkv, length, D]
        self.bits, self.length, self.dtype = bits, k.shape[3], k.dtype
        whole = self.length // key_group * key_group
        pieces = [(0, whole, key_group)] if whole else []
        if whole < self.length:
            pieces.append((whole, self.length, self.length - whole))
        self.keys = [[quantize(k[i, :, :, a:b], bits, -2, g) for a, b, g in pieces] for i in range(k.shape[0])]
        self.values = [[quantize(v[i], bits, -1, value_group)] for i in range(v.shape[0])]

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        k = [dequantize(*q, self.bits, -2, self.dtype) for q in self.keys[layer]]
        return (k[0] if len(k) == 1 else torch.cat(k, 2),
                dequantize(*self.values[layer][0], self.bits, -1, self.dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for store in (self.keys, self.values) for layer in store for q in layer for t in q)


@dataclass
class KIVIPress(Press):
    """Quantizes the prompt's KV (all but the recent window) to ``bits`` bits. Evicts nothing by itself
    (``compression_ratio`` must be 0); combine with an eviction press as ``snapkv+kivi2``."""

    bits: int = 4
    residual: int = 32
    key_group: int = 128
    value_group: int = 0
    evicts = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compression_ratio:
            raise InvalidArgumentError(f"{self.name} sets its size by bits; use ratio 0, or combine it with an "
                                       f"eviction press (e.g. snapkv+{self.name})")
        if self.bits not in (2, 4):
            raise InvalidArgumentError(f"bits must be 2 or 4, got {self.bits}")

    @property
    def active(self) -> bool:
        return True

    def apply(self, cache, memo=None) -> None:
        n = self.prefix_length(cache)
        if n <= 0 or cache.prefix is not None:
            return
        cache.freeze_prefix(self.quantize(cache.k[:, :, :, :n], cache.v[:, :, :, :n]))

    def prefix_length(self, cache) -> int:
        """How many of the first slots to quantize: all but the ``residual`` most recent."""
        return cache.length - self.residual

    def quantize(self, k: Tensor, v: Tensor):
        """The quantized prefix holding k, v [layers, B, Hkv, n, D]."""
        return QuantizedPrefix(k, v, self.bits, self.key_group, self.value_group or k.shape[-1])


@register
@dataclass
class KIVI4Press(KIVIPress):
    bits: int = 4
    name = "kivi4"


@register
@dataclass
class KIVI2Press(KIVIPress):
    bits: int = 2
    name = "kivi2"
