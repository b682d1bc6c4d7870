"""4-bit KV that attention reads without dequantizing it: a smaller cache that also decodes faster.

KIVI (kivi.py) stores keys per channel and values per token, but attention then has to unpack the whole
prefix to bf16 at every step, which made decoding slower than with the full cache. This press picks a layout
that PyTorch's packed int4 matmul kernel (the one int4 weights use, ``_weight_int4pack_mm_for_cpu``) consumes
directly, so the scores and the weighted values are computed from the packed codes:

* keys: every channel is divided by its absolute maximum over the prefix (per kv head), then each token is
  quantized to 4 bits with a scale and zero point per ``key_group`` channels (default 32). Key outliers sit in
  fixed channels (KIVI's observation); the channel scale takes them out before the per-token step, and it
  folds into the query: q . k = (q * c) . k_normalized, so the kernel multiplies the scaled queries by the
  packed keys.
* values: 4 bits per token over the whole head (KIVI's value layout); the per-token scale and zero point fold
  into the probabilities: p . v = sum_t (p_t s_t) (code_t - 8) + sum_t p_t z_t.

The prefix and the full-precision tail (recent window and generated tokens) are attended separately and merged
with their log-sum-exp, so the result is ordinary softmax attention over both. The kernel's rows do not
depend on how many rows it gets (tested), so a speculative verification forward stays exact against one-token
decoding under this press. CPU only (the kernel's device): on other devices use kivi4.

Bytes per token and kv head (head_dim 64): 32 for key codes, 32 for value codes, 8 for the keys' bf16 scales
and zero points (two groups of 32 channels), 4 for the values': 76 against 256 for bf16, 3.37x smaller
(``key_group=64``: 72 bytes, 3.56x, but it lost one of five needles at 2k on smollm2-135m where 32 kept all).
Head dims of 32, 64, 128 or 256 (the kernel's group sizes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from ..models.quant import quantize_int4
from .base import register
from .kivi import KIVIPress

TOKEN_MULTIPLE = 32   # the kernel packs rows in blocks of 16 and wants the value reduction in groups of 32


def _pack(codes: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


def _int4_mm(x: Tensor, packed: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, scales_and_zeros)


class Int4KVPrefix:
    """The first ``length`` slots of every layer in the kernel's packed layout. k, v [layers, 1, Hkv, n, D]."""

    def __init__(self, k: Tensor, v: Tensor, key_group: int = 32):
        layers, batch, heads, n, dim = k.shape
        if batch != 1:
            raise ValueError("int4kv quantizes one sequence (batch 1)")
        self.length, self.dtype, self.heads, self.dim = n, k.dtype, heads, dim
        self.key_group = min(key_group, dim)
        self.channel_scale = k.float().abs().amax(dim=-2, keepdim=True).clamp_min(1e-6)[:, 0]  # [L, Hkv, 1, D]
        normalized = k.float()[:, 0] / self.channel_scale
        self.keys, self.values = [], []
        for layer in range(layers):
            per_head_k, per_head_v = [], []
            for h in range(heads):
                codes, scale, zero = quantize_int4(normalized[layer, h], self.key_group)   # per token
                per_head_k.append((_pack(codes), torch.stack([scale, zero], -1).transpose(0, 1)
                                   .contiguous().to(torch.bfloat16)))          # [dim / key_group, n, 2]
                codes, scale, zero = quantize_int4(v[layer, 0, h].float(), dim)
                per_head_v.append((_pack(codes.t()), scale.to(torch.bfloat16), zero.to(torch.bfloat16)))
            self.keys.append(per_head_k)
            self.values.append(per_head_v)
        # the value kernel's own scale and zero point: 1 and 0 (W = code - 8); one shared tensor
        self.unit = torch.zeros(n // TOKEN_MULTIPLE, dim, 2, dtype=torch.bfloat16)
        self.unit[..., 0] = 1

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """The prefix dequantized [1, Hkv, n, D] (for tests; attention uses :meth:`attend`)."""
        ks, vs = [], []
        for h in range(self.heads):
            packed, sz = self.keys[layer][h]
            eye = torch.eye(self.dim, dtype=torch.bfloat16)
            ks.append(_int4_mm(eye, packed, self.key_group, sz).t().float() * self.channel_scale[layer, h])
            packed, scale, zero = self.values[layer][h]
            codes = _int4_mm(torch.eye(self.length, dtype=torch.bfloat16), packed, TOKEN_MULTIPLE, self.unit)
            vs.append(codes.float() * scale.float() + zero.float())
        return torch.stack(ks)[None].to(self.dtype), torch.stack(vs)[None].to(self.dtype)

    def attend(self, layer: int, q: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
        """Attention of rows q [Hkv, M, D] over the prefix: (output [Hkv, M, D] float32, log-sum-exp [Hkv, M]).
        mask: None, [M, n] or [Hkv, M, n] bool (True = visible)."""
        scores = torch.stack([_int4_mm(q[h] * self.channel_scale[layer, h], packed, self.key_group, sz)
                              for h, (packed, sz) in enumerate(self.keys[layer])]).float() * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        p = (scores - lse.clamp_min(torch.finfo(torch.float32).min)[..., None]).exp()   # rows seeing nothing: 0
        out = []
        for h in range(self.heads):
            packed, vscale, vzero = self.values[layer][h]
            out.append(_int4_mm(p[h] * vscale.float()[:, 0], packed, TOKEN_MULTIPLE, self.unit).float()
                       + (p[h] * vzero.float()[:, 0]).sum(-1, keepdim=True))
        return torch.stack(out), lse

    @property
    def nbytes(self) -> int:
        held = [t for layer in (self.keys + self.values) for head in layer for t in head]
        return sum(t.numel() * t.element_size() for t in [*held, self.channel_scale, self.unit])


@register
@dataclass
class Int4KVPress(KIVIPress):
    """4-bit KV in the int4 kernel's layout (see the module docstring). Like kivi4 it evicts nothing by itself
    and keeps the last ``residual`` prompt tokens (plus up to 31 more, to a multiple of 32) in full precision."""

    bits: int = 4
    key_group: int = 32
    name = "int4kv"

    def prefix_length(self, cache) -> int:
        return super().prefix_length(cache) // TOKEN_MULTIPLE * TOKEN_MULTIPLE

    def quantize(self, k: Tensor, v: Tensor) -> Int4KVPrefix:
        if k.shape[-1] not in (32, 64, 128, 256):
            raise InvalidArgumentError(f"int4kv needs a head dimension of 32, 64, 128 or 256 (the kernel's group "
                                       f"sizes), this model has {k.shape[-1]}; use kivi4")
        if k.device.type != "cpu":
            raise InvalidArgumentError("int4kv runs on PyTorch's CPU int4 kernel; on this device use kivi4")
        return Int4KVPrefix(k, v, self.key_group)
