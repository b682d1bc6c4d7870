"""Linear and embedding layers that keep a GGUF file's own quantized blocks (``--dtype gguf``).

Decode reads every weight once per token, so the bytes per weight set the speed: a Q4_1 matrix is 0.625
bytes per weight against bf16's 2. These layers hold the blocks as the file stores them (memory-mapped,
rows reordered or stacked where the model needs it) and multiply with tachy's CPU kernels
(``tachy.kernels``), which decode each block to the bf16 weights tachy's bf16 path would hold and are
row-invariant, so speculative decoding on such a model stays exact. Elsewhere (no compiler, another
device) they dequantize once to bf16 and run as plain ``nn.Linear`` / ``nn.Embedding``.

Shapes: ``GGUFLinear`` maps [..., in] -> [..., out] (bf16 in, bf16 out); ``GGUFEmbedding`` maps token ids
[...] -> [..., dim] bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import QuantWeight


def stack_rows(parts: list[QuantWeight]) -> list[QuantWeight]:
    """Adjacent parts of one format merged into one weight (rows stacked), so a fused projection (q/k/v,
    gate/up) is one kernel call where the formats agree."""
    merged: list[QuantWeight] = []
    for part in parts:
        if merged and merged[-1].fmt == part.fmt and merged[-1].K == part.K:
            merged[-1] = QuantWeight(part.fmt, torch.cat([merged[-1].data, part.data]), part.K)
        else:
            merged.append(part)
    return merged


class GGUFLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with W the row-wise concatenation of ``parts`` (GGUF blocks)."""

    def __init__(self, parts: list[QuantWeight], bias: bool = False):
        super().__init__()
        self.parts = stack_rows(parts)
        if kernels.available():   # int8 kernels where the format allows (kernels.pack)
            self.parts = [kernels.pack(p) for p in self.parts]
        self.in_features = self.parts[0].K
        self.out_features = sum(p.N for p in self.parts)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=torch.bfloat16), requires_grad=False) \
            if bias else None
        self.dense: Tensor | None = None   # bf16 [out, in], only where the kernels cannot run

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.bfloat16)
        if x.device.type == "cpu" and kernels.available():
            x2 = x.reshape(-1, self.in_features)
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            if len(self.parts) == 1:
                y = kernels.matmul(x2, self.parts[0])
            else:
                y = torch.empty(x2.shape[0], self.out_features, dtype=torch.bfloat16)
                start = 0
                for part in self.parts:
                    kernels.matmul(x2, part, out=y[:, start:start + part.N])
                    start += part.N
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dense_weight(x.device))
        return y if self.bias is None else y + self.bias

    def dense_weight(self, device: torch.device | None = None) -> Tensor:
        """The weights as bf16 [out, in] (built once, for devices and machines without the kernels)."""
        if self.dense is None or (device is not None and self.dense.device != device):
            self.dense = torch.cat([dequantize_part(p) for p in self.parts]).to(device or "cpu")
        return self.dense

    def extra_repr(self) -> str:
        formats = "+".join(p.format for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, {formats}, bias={self.bias is not None}"


class GGUFEmbedding(nn.Module):
    """Token embeddings gathered row by row from GGUF blocks (bf16), with no dequantized table in memory."""

    activation_dtype = torch.bfloat16   # what the model computes in (Transformer.dtype reads it)

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.weight_q = weight
        self.num_embeddings, self.embedding_dim = weight.N, weight.K
        self.dense: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:
        if ids.device.type == "cpu" and kernels.available():
            rows = kernels.dequantize(self.weight_q, torch.bfloat16, rows=ids)
            return rows.view(*ids.shape, self.embedding_dim)
        if self.dense is None or self.dense.device != ids.device:
            self.dense = dequantize_part(self.weight_q).to(ids.device)
        return F.embedding(ids, self.dense)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight_q.format}"


def dequantize_part(w: QuantWeight) -> Tensor:
    """bf16 [N, K] weights, through the kernels where they run, else the gguf package (float32, rounded)."""
    if kernels.available():
        return kernels.dequantize(w, torch.bfloat16)
    import gguf
    import numpy as np

    raw = w.data.numpy()
    if w.fmt in (0, 1, 30):   # float formats: reinterpret the row bytes
        values = raw.view({0: np.float32, 1: np.float16, 30: np.uint16}[w.fmt])
        if w.fmt == 30:
            return torch.from_numpy(values.astype(np.int16)).view(torch.bfloat16).reshape(w.N, w.K)
    else:
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(w.fmt))
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(w.N, w.K)).to(torch.bfloat16)
