"""Mirostat 2.0 (Basu et al. 2021, "Mirostat: A Neural Text Decoding Algorithm that Directly Controls
Perplexity"): sample at a target surprise ``tau`` (bits per token) with a feedback loop.

Each step keeps only the tokens whose surprise ``-log2 p`` is at most ``mu`` (at least the most likely one),
samples from what is left, and moves ``mu`` by ``eta`` times the error between the sampled token's surprise
(under the distribution it was drawn from) and ``tau``; ``mu`` starts at ``2 tau``. The average surprise of
the generated text thus settles near ``tau``.

The processor keeps ``mu`` between calls and learns which token was drawn from the next call's context, so
it is stateful: it cannot verify speculative drafts (a rejected draft would have moved ``mu``), and the
strategy runs plain decoding (an explicit drafter is an error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from ..sampling import make_probs_fn
from .base import Strategy, register, row_contexts


class MirostatProcessor:
    """Per-generation state: ``mu`` and the log2-probabilities the last token was drawn from."""

    def __init__(self, tau: float, eta: float, probs_fn):
        self.tau, self.eta, self.probs_fn = tau, eta, probs_fn
        self.mu = 2.0 * tau
        self.surprises: list[float] = []     # observed surprise of each drawn token (for tests and stats)
        self._last: tuple[int, Tensor] | None = None   # (context length, log2 probs [V]) of the last call

    def __call__(self, logits: Tensor, context) -> Tensor:
        if logits.shape[0] != 1:
            raise InvalidArgumentError("mirostat processes one row at a time (no speculative verification)")
        ctx = row_contexts(context, 1)[0]
        if self._last is not None and len(ctx) == self._last[0] + 1:   # the token drawn after the last call
            surprise = -float(self._last[1][ctx[-1]])
            self.surprises.append(surprise)
            self.mu -= self.eta * (surprise - self.tau)
        surprise = -torch.log_softmax(logits[0].float(), dim=-1) / math.log(2)
        drop = surprise > self.mu
        drop[int(surprise.argmin())] = False
        out = logits.masked_fill(drop[None], float("-inf"))
        self._last = (len(ctx), torch.log2(self.probs_fn(out)[0]))
        return out


@register
@dataclass
class Mirostat(Strategy):
    """Mirostat 2.0. tau: target surprise in bits (3.0); eta: learning rate of mu (0.1). Needs temperature > 0."""

    name: ClassVar[str] = "mirostat"
    allows_drafts: ClassVar[bool] = False
    tau: float = 3.0
    eta: float = 0.1

    def __post_init__(self) -> None:
        if not self.tau > 0 or not self.eta > 0:
            raise InvalidArgumentError(f"mirostat needs tau > 0 and eta > 0, got tau={self.tau}, eta={self.eta}")

    def check(self, config) -> None:
        if config.temperature <= 0:
            raise InvalidArgumentError("mirostat samples: set temperature > 0 (1.0 is the method as published)")
        super().check(config)

    def processor(self, engine, config, prompt_ids):
        self.last_processor = MirostatProcessor(self.tau, self.eta, make_probs_fn(config.sampling))
        return self.last_processor
