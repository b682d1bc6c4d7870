"""Double Sparsity: token sparsity chosen through channel sparsity.

Based on Yang et al. 2024, "Post-Training Sparse Attention with Double Sparsity" (arXiv:2408.07092). A few key
channels carry most of q.k (outlier channels, stable across inputs), so an offline calibration ranks them per
layer and kv head (calibration.py: mean |q_d k_d|, summed over the query heads sharing the kv head), and each
cached key keeps a *label*: its values on the top ``channels`` channels. A decoding query in a sparse layer
scores every candidate key by q[channels] . label, with q summed over the group's query heads (one dot
product per key for the whole group, where a max over the heads would take one per head), takes the top
``select`` keys, and attends exactly over the sinks, those keys and the recent window (single keys: unit 1,
like TidalDecode). Measured defaults and variants: docs/long_context.md.

Rope rotates channel pairs (d, d + head_dim/2) by a position-dependent angle, which moves a pair's share of
q.k between its two channels from one position to the next; so channels are chosen in whole pairs (a pair
ranked by the sum of its two channels' importance). ``channels`` must be even and at most head_dim; the
default (0) takes half of head_dim (32 of smollm2's 64).

Labels are int8: a key's chosen channels rounded to 127 levels of their absolute maximum, with that scale
(a float) kept per key; the query (summed over the group) is rounded the same way, and a key's score is the
exact integer dot product times the key's scale (the query's scale is the same for every key, so it ranks
nothing). Half the bytes of bf16 labels: 32 int8 channels plus the scale cost 36 bytes per key, where 16
bf16 channels cost 32; the rounding changes which keys are chosen far less than the number of channels does
(docs/long_context.md).

C decoder: labels are kept beside the cache (blocks of 16 keys, 4 channels of a key together, scored 16 keys
by 4 channels per vpdpbusd), computed once per committed slot like Quest's page bounds; rollback marks them
stale. ``label_scores`` is the PyTorch implementation and gives the same bits. The calibration runs once per
model (with a progress bar) and is cached under ``<cache root>/calibration/``. CLI: ``--attention
double_sparsity`` or ``double_sparsity:budget=1024,channels=16`` (``calibration=FILE``,
``calibration_text=FILE``, ``calibration_tokens=N`` to choose the calibration).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .base import DENSE, SparseAttention, SparseState, register
from .calibration import load_or_calibrate

LABEL_BLOCK = 16   # keys per label block (decoder.c's layout: [blocks, channels, 16])

# model -> {calibration key: importance [layers, kv_heads, head_dim]}: calibrations loaded in this process
_CALIBRATED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Tensor]]" = weakref.WeakKeyDictionary()


def top_channels(importance: Tensor, channels: int) -> Tensor:
    """The ``channels`` most important channels of each (layer, kv head), in whole rope pairs (d, d + D/2),
    ascending: importance [..., D] -> int64 [..., channels]."""
    half = importance.shape[-1] // 2
    pairs = importance[..., :half] + importance[..., half:]
    best = pairs.topk(channels // 2, dim=-1).indices
    return torch.cat([best, best + half], -1).sort(-1).values


def quantize_labels(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 labels, as decoder.c makes them: x [..., C] float32 -> (round(x * 127 / absmax) as float32
    [..., C], the scale absmax / 127 [..., 1]); a vector whose absmax is 0 or not finite gets zeros and scale 0."""
    mx = x.abs().amax(-1, keepdim=True)
    ok = (mx > 0) & mx.isfinite()
    full = torch.full_like(mx, 127.0)
    inv = torch.where(ok, full / mx, torch.zeros_like(mx))                 # one IEEE division each, as in C
    values = (torch.where(ok, x, torch.zeros_like(x)) * inv).round()        # inv 0 where not ok: zeros
    return values, torch.where(ok, mx / full, torch.zeros_like(mx))


def label_scores(q: Tensor, k: Tensor, index: Tensor) -> Tensor:
    """Each key's label score, decoder.c's bits: the int8 dot product of the query (summed over the group) and
    the key on the chosen channels, times the key's label scale. q [Hkv, G, T, D], k [Hkv, S, D],
    index [Hkv, C] -> float32 [Hkv, T, S]."""
    qs = q.float().sum(1)
    C = index.shape[-1]
    q_label, _ = quantize_labels(qs.gather(-1, index[:, None, :].expand(-1, qs.shape[1], C)))
    k_label, k_scale = quantize_labels(k.float().gather(-1, index[:, None, :].expand(-1, k.shape[1], C)))
    return (q_label @ k_label.transpose(-1, -2)) * k_scale.transpose(-1, -2)   # integer sums below 2^24: exact


def label_stride(channels: int) -> int:
    """Bytes per block of LABEL_BLOCK labels (decoder.c's LABEL_STRIDE): int8 values padded to 4 channels, then
    a float32 scale per key."""
    return LABEL_BLOCK * (-(-channels // 4) * 4 + 4)


@register
@dataclass
class DoubleSparsityAttention(SparseAttention):
    """channels: label channels per kv head (even, <= head_dim; 0: half of head_dim, 32 on smollm2). calibration: a calibration file (default:
    the per-model cache, made on first use); calibration_text / calibration_tokens: what to calibrate on
    (default the first 4096 tokens of shared/data/frankenstein_pg84.txt)."""

    channels: int = 0
    calibration: str = ""
    calibration_text: str = ""
    calibration_tokens: int = 4096
    name = "double_sparsity"
    method_id = 4

    def __post_init__(self) -> None:
        if not isinstance(self.channels, int) or isinstance(self.channels, bool) or self.channels < 0 \
                or self.channels % 2:
            raise InvalidArgumentError(f"double_sparsity: channels must be an even whole number >= 2 (rope "
                                       f"rotates channel pairs), or 0 for half of head_dim, got {self.channels!r}")
        if not isinstance(self.calibration_tokens, int) or self.calibration_tokens < 16:
            raise InvalidArgumentError(f"double_sparsity: calibration_tokens must be a whole number >= 16, "
                                       f"got {self.calibration_tokens!r}")
        for field in ("calibration", "calibration_text"):
            if not isinstance(getattr(self, field), str):
                raise InvalidArgumentError(f"double_sparsity: {field} must be a file path, "
                                           f"got {getattr(self, field)!r}")
        super().__post_init__()

    # -- calibration ---------------------------------------------------------------------------------------------
    @property
    def calibration_key(self) -> tuple:
        return self.calibration, self.calibration_text, self.calibration_tokens

    def prepare(self, engine) -> None:
        """Load this model's calibration (cached on disk), or calibrate it once with a progress bar."""
        known = _CALIBRATED.setdefault(engine.model, {})
        if self.calibration_key not in known:
            self.check_model(engine.model.config)
            known[self.calibration_key] = load_or_calibrate(
                engine.model, engine.tokenizer, Path(self.calibration_text) if self.calibration_text else None,
                self.calibration_tokens, Path(self.calibration) if self.calibration else None)

    def use_calibration(self, model, importance: Tensor) -> None:
        """Use ``importance`` ([layers, kv_heads, head_dim], calibration.channel_importance) for ``model``
        instead of the file (tests, a calibration made elsewhere)."""
        known = _CALIBRATED.setdefault(model, {})
        known[self.calibration_key] = importance

    def channels_for(self, config) -> int:
        """The label channels on this model: ``channels``, or half of head_dim (rounded to even) when 0."""
        return self.channels or max(2, config.head_dim // 4 * 2)

    def check_model(self, config) -> None:
        if self.channels_for(config) > config.head_dim:
            raise InvalidArgumentError(f"double_sparsity: channels {self.channels} exceeds this model's head_dim "
                                       f"{config.head_dim}")

    def attach(self, model, cache) -> None:
        self.check_model(model.config)
        importance = _CALIBRATED.get(model, {}).get(self.calibration_key)
        if importance is None:
            raise InvalidArgumentError("double_sparsity: this model is not calibrated yet; call prepare(engine) "
                                       "first (the engine does) or use_calibration(model, importance)")
        super().attach(model, cache)
        cache.sparse.channel_index = top_channels(importance, self.channels_for(model.config)).to(cache.k.device)

    # -- the C decoder's label cache -------------------------------------------------------------------------
    def c_fields(self, state: SparseState, cache) -> dict:
        layers, batch, heads, _ = cache.shape
        channels = state.channel_index.shape[-1]
        blocks = -(-cache.capacity // LABEL_BLOCK)
        if state.labels is None or state.labels.shape[3] < blocks:   # new slots: every label is recomputed
            state.labels = torch.empty(layers, batch, heads, blocks, label_stride(channels), dtype=torch.uint8)
            state.bounded.zero_()
        return {"labels": state.labels.data_ptr(), "max_pages": state.labels.shape[3] * LABEL_BLOCK,
                "channels": channels, "channel_index": state.channel_index.data_ptr()}

    # -- the PyTorch implementation ------------------------------------------------------------------------------
    def choose(self, state, layer, q, k, visible, candidate, scale):
        Hkv, (_, H, T, D) = k.shape[1], q.shape
        return self.top(label_scores(q[0].view(Hkv, H // Hkv, T, D), k[0], state.channel_index[layer]), candidate)

    def kv_bytes_per_token(self, config, context: int, dtype_bytes: int = 2) -> int:
        """The base count plus the labels a sparse layer scores: ``channels`` int8 values (padded to 4) and a
        float32 scale per cached key and kv head (all of them once the context exceeds the budget)."""
        roles = zip(self.layer_roles(config), config.layer_types)
        sparse = sum(role != DENSE and kind == "full" for role, kind in roles)
        per_key = label_stride(self.channels_for(config)) // LABEL_BLOCK
        labels = sparse * context * config.num_kv_heads * per_key if context > self.budget else 0
        return super().kv_bytes_per_token(config, context, dtype_bytes) + labels
