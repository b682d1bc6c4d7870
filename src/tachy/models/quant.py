"""Weight formats for decode speed: fp32, bf16, and weight-only int8 / int4 linears.

Decode on a CPU is bound by the bytes of weights read per token, so smaller weights decode faster. The int8
and int4 layers keep activations in bf16 and call PyTorch's packed weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``); on other devices they dequantize on the fly.

Measured on this CPU (AVX512-BF16): int8 and int4 matmuls, and bf16 ones up to 1024 input features, give
bitwise the same row results whatever the number of rows (wider bf16 layers do too once split, see
SplitKLinear), so a speculative verification forward reproduces single-token decoding exactly; fp32 (MKL)
does not. bf16 cost is nearly flat from 1 to 16 rows, int8/int4 grow with the rows: int8/int4 are the fastest
for plain decoding, bf16 for speculative decoding.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from .llama import Rope

WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4", "gguf")   # gguf: the file's own blocks (gguf_linear.py)


class TransposedLinear(nn.Module):
    """fp32 weights stored as [in, out]: MKL's one-row product reads this layout up to 1.6x faster
    (measured: 4.4 vs 7.1 ms for SmolLM2's 49152x576 output layer)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().float().t().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class SplitKLinear(nn.Module):
    """bf16 linear for wide inputs, computed in chunks of at most ``chunk`` input features summed in fp32.

    oneDNN's bf16 product changes its reduction order with the number of rows once the input is wider than
    about 1024 (measured: 1536 and 2048 wide layers differ for most row counts from 2 to 32), which would let a
    verification forward drift from one-token decoding. Each 768-wide chunk is row-invariant, and the fp32
    sum of the chunks is too. Cost: about 0.4 ms per SmolLM2 step.
    """

    def __init__(self, linear: nn.Linear, chunk: int = 768):
        super().__init__()
        w = linear.weight.detach().to(torch.bfloat16)
        self.parts = nn.ParameterList(nn.Parameter(p.contiguous(), requires_grad=False)
                                      for p in w.split(chunk, dim=1))
        self.chunk = chunk
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        xs = x.to(torch.bfloat16).split(self.chunk, dim=-1)
        parts = list(self.parts)    # (slicing a ParameterList builds a new module on every call)
        y = F.linear(xs[0], parts[0]).float()
        for xi, wi in zip(xs[1:], parts[1:]):
            y = y + F.linear(xi, wi).float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(torch.bfloat16)


def make_bf16(linear: nn.Linear) -> nn.Module:
    return SplitKLinear(linear) if linear.in_features > 1024 else linear


class Int8Linear(nn.Module):
    """Symmetric per-output-channel int8 weights: W ≈ scale[:, None] * q."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit groups: returns q [out, in] in 0..15, scale and zero [out, in/group] with
    w ≈ (q - 8) * scale + zero (zero is the group's midpoint value, the convention of PyTorch's kernel)."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, -1, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(out_features, in_features), scale, lo + 8 * scale


def dequantize_int4(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    out_features = q.shape[0]
    groups = (q.float() - 8).reshape(out_features, -1, group_size)
    return (groups * scale[..., None] + zero[..., None]).reshape(out_features, -1)


class Int4Linear(nn.Module):
    """Asymmetric int4 weights in groups of ``group_size`` input channels (the layout of GGUF's Q4_1)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % group_size:
            raise InvalidArgumentError(f"int4 needs in_features ({in_features}) divisible by {group_size}")
        self.group_size = group_size
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        self.cpu_kernel = linear.weight.device.type == "cpu"
        if self.cpu_kernel:
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1)
                                 .contiguous().to(torch.bfloat16))      # [in/group, out, 2], the kernel's layout
        else:  # other devices: keep plain weights and dequantize in forward
            self.register_buffer("weight", dequantize_int4(q, scale, zero, group_size).to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.cpu_kernel:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = F.linear(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def make_int4(linear: nn.Linear) -> nn.Module:
    """Int4 where the packed kernel accepts the shape (out % 16, in % 32), else int8."""
    out_features, in_features = linear.weight.shape
    if out_features % 16 or in_features % 32:
        return Int8Linear(linear)
    return Int4Linear(linear)


def convert_weights(model: nn.Module, dtype: str) -> nn.Module:
    """Cast a float32 model in place to one of WEIGHT_DTYPES; activations become bf16 for all but fp32."""
    if dtype not in WEIGHT_DTYPES:
        raise InvalidArgumentError(f"unknown weight dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")
    if dtype == "gguf":
        raise InvalidArgumentError("gguf weights are a GGUF file's own blocks: load them with tachy.load(path, "
                                   "dtype='gguf'), they cannot be made from float weights")
    if dtype == "bf16":
        _replace_linears(model, make_bf16)
        model.to(torch.bfloat16)
    else:
        _replace_linears(model, {"fp32": TransposedLinear, "int8": Int8Linear, "int4": make_int4}[dtype])
        if dtype == "fp32":
            return model
        model.to(torch.bfloat16)
    for module in model.modules():  # rope tables stay float32 for accuracy
        if isinstance(module, Rope):
            module.float()
    return model


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            new = make(child)
            if new is not child:
                setattr(module, name, new)
        else:
            _replace_linears(child, make)


def is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, SplitKLinear, TransposedLinear))


def plain_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear a float linear layer (Linear, SplitKLinear, TransposedLinear) computes."""
    if isinstance(module, nn.Linear):
        return module
    weight = torch.cat(list(module.parts), dim=1) if isinstance(module, SplitKLinear) else module.weight_t.t()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


class RescoredLinear(nn.Module):
    """A quantized output layer whose ``top`` largest logits are recomputed with the float weights.

    The int4 copy's disagreements with its float original come almost all from the output layer: on
    SmolLM2-135M (Q4_1 body, Q8_0 embedding) teacher-forced top-1 agreement with the bf16 target is 0.895 with
    an int4 output layer and 0.982 with the bf16 one, the same as the bf16 model against itself
    (docs/benchmarks.md). The float argmax almost always lies among the int4 layer's top few, so recomputing
    those few (8 rows of the weight) restores the float layer's choice at the int4 layer's cost.
    """

    def __init__(self, quantized: nn.Module, weight: Tensor, top: int):
        super().__init__()
        self.quantized, self.weight, self.top = quantized, weight, top   # ``weight`` is shared, not copied

    def forward(self, x: Tensor) -> Tensor:
        """Float32 logits: the quantized layer's, with its ``top`` largest recomputed (in the weights' dtype)."""
        y = self.quantized(x).float()
        top = y.topk(self.top, dim=-1).indices                                              # [..., top]
        rows = self.weight.index_select(0, top.flatten()).view(*top.shape, -1).float()     # [..., top, in]
        exact = (rows @ x.float().unsqueeze(-1)).squeeze(-1)
        # rounded as the float layer rounds its output, so near-ties break the way the target's do
        return y.scatter_(-1, top, exact.to(self.weight.dtype).float())


def quantized_copy(model: nn.Module, dtype: str = "int4", rescore_top: int = 0) -> nn.Module:
    """A copy of a loaded float model with its linear layers in ``dtype`` (int8/int4), built from the weights
    in memory (no reload). A bf16 embedding table is shared with the original, not copied.

    rescore_top: recompute the copy's ``rescore_top`` largest logits with the original's output weights
    (:class:`RescoredLinear`), which makes its argmax the float layer's nearly always; 0 keeps the plain
    quantized output layer."""
    embedding = model.embed_tokens.weight
    memo = {id(embedding): embedding} if embedding.dtype == torch.bfloat16 else {}
    clone = copy.deepcopy(model, memo)
    _replace_float_linears(clone)
    convert_weights(clone, dtype)
    if rescore_top:
        clone.lm_head = RescoredLinear(clone.lm_head, plain_linear(model.lm_head).weight.detach(), rescore_top)
    return clone


def _replace_float_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, (SplitKLinear, TransposedLinear)):
            setattr(module, name, plain_linear(child))
        else:
            _replace_float_linears(child)
