"""A Frustratingly Simple Decoding Method (Yang et al. 2024): penalize what an n-gram anti-model predicts.

An n-gram model built on the fly from the prefix (prompt and generated text) predicts the continuation that
would repeat the text; FSD scores each of the LM's ``top_k`` candidates as

    (1 - alpha) * p_LM(v | x)  -  alpha * p_anti(v | x)

and decodes greedily on that score. Our anti-model backs off: it uses the longest context of ``n - 1`` down to
0 tokens that occurred before, with ``p_anti(v)`` = the fraction of those earlier occurrences followed by
``v`` (order 0 is the unigram frequency in the prefix).

The score depends only on each row's own context, so FSD runs under speculative verification unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .base import Strategy, register, row_contexts


def anti_ngram_probs(context: Sequence[int], n: int, vocab_size: int) -> Tensor:
    """p_anti [V] for the next token after ``context``: the highest order (n-1 tokens of history down to 0)
    whose history occurred earlier in the context; zeros for an empty context. Vectorized over positions."""
    ctx = torch.as_tensor(list(context), dtype=torch.long)
    L = ctx.shape[0]
    for order in range(min(n - 1, L - 1), -1, -1):
        match = torch.ones(L - order, dtype=torch.bool)      # position i: ctx[i:i+order] == the last order tokens
        for j in range(order):
            match &= ctx[j:L - order + j] == ctx[L - order + j]
        followers = ctx[order:][match]
        followers = followers[(followers >= 0) & (followers < vocab_size)]
        if followers.numel():
            counts = torch.bincount(followers, minlength=vocab_size)[:vocab_size].float()
            return counts / counts.sum()
    return torch.zeros(vocab_size)


@register
@dataclass
class FSD(Strategy):
    """FSD. alpha: anti-model weight (0.6); n: n-gram order of the anti-model (3); top_k: candidates (6).
    Deterministic (temperature 0)."""

    name: ClassVar[str] = "fsd"
    allows_sampling: ClassVar[bool] = False
    alpha: float = 0.6
    n: int = 3
    top_k: int = 6

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidArgumentError(f"fsd alpha must be in [0, 1], got {self.alpha}")
        if not isinstance(self.n, int) or self.n < 1 or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidArgumentError(f"fsd n and top_k must be positive integers, got n={self.n}, top_k={self.top_k}")

    def processor(self, engine, config, prompt_ids):
        alpha, n, k = self.alpha, self.n, self.top_k

        def process(logits: Tensor, context) -> Tensor:
            """-> FSD scores [rows, V] for the top-k candidates, -inf elsewhere (greedy takes the argmax)."""
            rows, vocab = logits.shape
            probs = torch.softmax(logits.float(), dim=-1)
            anti = torch.stack([anti_ngram_probs(c, n, vocab) for c in row_contexts(context, rows)])
            score = (1 - alpha) * probs - alpha * anti.to(probs.device)
            top = torch.topk(probs, min(k, vocab), dim=-1).indices
            return torch.full_like(score, float("-inf")).scatter(-1, top, score.gather(-1, top))

        return process
