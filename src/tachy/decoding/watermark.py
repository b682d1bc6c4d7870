"""Green-list watermark (Kirchenbauer et al. 2023, "A Watermark for Large Language Models") and its detector.

At each step the previous token seeds a generator that splits the vocabulary into a green list (a fraction
``gamma``) and the rest; green logits get ``+delta``. Text written this way holds more green tokens than
chance, which the detector measures without the model: with T scored tokens of which G are green,
``z = (G - gamma T) / sqrt(T gamma (1 - gamma))`` (one-sided; z > 4 is the paper's threshold).

The seeding is transformers' ``WatermarkLogitsProcessor`` "lefthash" (seed = key * previous token, a torch
``randperm`` of the vocabulary), so the two mark and detect the same green lists. The bias depends only on
each row's context, so the watermark runs under speculative decoding too (verification sees the same
biased distribution).
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from ..sampling import LogitsProcessor
from .base import row_contexts

DEFAULT_KEY = 15485863   # transformers' default hashing key
MAX_DELTA = 1e4   # a green bias of a few units already decides every token; far more overflows float32 logits


@dataclass(frozen=True)
class WatermarkConfig:
    """gamma: green-list fraction of the vocabulary; delta: logit bias of green tokens; key: secret seed."""

    gamma: float = 0.25
    delta: float = 2.0
    key: int = DEFAULT_KEY

    def __post_init__(self) -> None:
        """Options may come from a request's JSON: a string key, a NaN or a delta that overflows float32 logits
        would otherwise fail (or poison the distribution) at the first sampled token."""
        for name in ("gamma", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidArgumentError(f"watermark {name} must be a finite number, got {value!r}")
        if not 0.0 < self.gamma < 1.0:
            raise InvalidArgumentError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        if not 0.0 <= self.delta <= MAX_DELTA:
            raise InvalidArgumentError(f"watermark delta must be in [0, {MAX_DELTA:g}], got {self.delta}")
        if isinstance(self.key, bool) or not isinstance(self.key, numbers.Integral):
            raise InvalidArgumentError(f"watermark key must be an integer, got {self.key!r}")


def watermark_config(value: bool | dict | WatermarkConfig | None) -> WatermarkConfig | None:
    """GenerationConfig.watermark (True, a dict of WatermarkConfig fields, or None) -> config or None."""
    if value is None or value is False:
        return None
    if value is True:
        return WatermarkConfig()
    if isinstance(value, WatermarkConfig):
        return value
    if isinstance(value, dict):
        try:
            return WatermarkConfig(**value)
        except TypeError as e:
            raise InvalidArgumentError(f"watermark options are gamma, delta, key: {e}") from None
    raise InvalidArgumentError(f"watermark must be True, a dict (gamma, delta, key) or None, got {value!r}")


def check_watermark(value) -> None:
    watermark_config(value)


class GreenLists:
    """Green-list masks per previous token (memoized: a randperm of the vocabulary costs ~0.5 ms)."""

    def __init__(self, vocab_size: int, cfg: WatermarkConfig, keep: int = 256):
        self.vocab_size, self.cfg, self.keep = vocab_size, cfg, keep
        self.size = int(vocab_size * cfg.gamma)
        self._generator = torch.Generator()
        self._masks: OrderedDict[int, Tensor] = OrderedDict()

    def ids(self, previous: int) -> Tensor:
        self._generator.manual_seed((self.cfg.key * int(previous)) % (2 ** 64 - 1))
        return torch.randperm(self.vocab_size, generator=self._generator)[:self.size]

    def mask(self, previous: int) -> Tensor:
        mask = self._masks.get(previous)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[self.ids(previous)] = True
            self._masks[previous] = mask
            if len(self._masks) > self.keep:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(previous)
        return mask


def make_watermark_processor(value) -> LogitsProcessor | None:
    cfg = watermark_config(value)
    if cfg is None:
        return None
    lists: dict[int, GreenLists] = {}

    def process(logits: Tensor, context) -> Tensor:
        vocab = logits.shape[-1]
        green = lists.setdefault(vocab, GreenLists(vocab, cfg))
        bias = torch.stack([green.mask(ctx[-1]) for ctx in row_contexts(context, logits.shape[0])])
        return logits + cfg.delta * bias.to(logits.device, logits.dtype)

    return process


@dataclass
class WatermarkScore:
    z: float            # standard score of the green count; > 4: watermarked (false positive rate ~3e-5)
    p_value: float      # one-sided normal tail probability of a green count this high by chance
    green: int          # green tokens among the scored ones
    scored: int         # tokens scored (every token that has a previous token)

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored if self.scored else 0.0


def detect(token_ids: Sequence[int], vocab_size: int, cfg: WatermarkConfig | None = None) -> WatermarkScore:
    """Score a token sequence: how many tokens fall in the green list seeded by their predecessor."""
    cfg = cfg or WatermarkConfig()
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise InvalidArgumentError("watermark detection needs at least two tokens")
    lists = GreenLists(vocab_size, cfg)
    green = sum(bool(lists.mask(prev)[tok]) for prev, tok in zip(ids, ids[1:]) if 0 <= tok < vocab_size)
    scored = len(ids) - 1
    gamma = cfg.gamma
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    return WatermarkScore(z=z, p_value=0.5 * math.erfc(z / math.sqrt(2)), green=green, scored=scored)
