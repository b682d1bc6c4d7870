"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

Among the ``top_k`` most likely next tokens, pick

    argmax_v  (1 - alpha) * p(v | x)  -  alpha * max_j cos(h_v, h_j)

where ``h_v`` is the last hidden state (after the final norm) the model computes when fed ``v``, and ``h_j``
runs over the hidden states of every earlier token, prompt included (transformers' ``_ranking_fast``). The
second term, the degeneration penalty, keeps the model from repeating itself; ``alpha = 0`` is greedy.

The k candidates are scored in one forward: they are fed side by side as siblings at the same position, each
seeing the cache and itself only (a one-level draft tree), and the chosen one's K/V slot is kept
(``KVCache.keep``), so no cache copies are needed. Yields one token per step, so it streams.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from ..errors import InvalidArgumentError
from ..generation import Step
from .base import Strategy, eos_ids, prefill, register
from .config import logits_processor


def degeneration_scores(probs: torch.Tensor, candidates_hidden: torch.Tensor, context_hidden: torch.Tensor,
                        alpha: float) -> torch.Tensor:
    """probs [k] of the candidates, candidates_hidden [k, D], context_hidden [L, D] -> scores [k]."""
    cand = candidates_hidden.float() / candidates_hidden.float().norm(dim=-1, keepdim=True)
    ctx = context_hidden.float() / context_hidden.float().norm(dim=-1, keepdim=True)
    penalty = (cand @ ctx.T).max(dim=-1).values
    return (1.0 - alpha) * probs - alpha * penalty


@register
@dataclass
class ContrastiveSearch(Strategy):
    """Contrastive search. penalty_alpha: weight of the degeneration penalty (0.6); top_k: candidates (4)."""

    name: ClassVar[str] = "contrastive_search"
    allows_sampling: ClassVar[bool] = False
    penalty_alpha: float = 0.6
    top_k: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.penalty_alpha <= 1.0:
            raise InvalidArgumentError(f"penalty_alpha must be in [0, 1], got {self.penalty_alpha}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidArgumentError(f"top_k must be a positive integer, got {self.top_k!r}")

    def search(self, engine, prompt_ids, config, stats) -> Iterator:

        model, device = engine.model, engine.device
        eos = set(eos_ids(engine, config))
        max_new = min(config.max_new_tokens, engine.max_context - len(prompt_ids) - 1)
        processor = logits_processor(engine, config, prompt_ids)
        k = self.top_k
        start = time.perf_counter()
        cache = model.new_cache(capacity=len(prompt_ids) + max_new + k, fixed=False)
        logits, context_hidden = prefill(model, prompt_ids, cache, hidden=True)   # [1, V], [L, D]
        stats.prompt_tokens = len(prompt_ids)
        stats.prefill_s = time.perf_counter() - start
        ids = list(prompt_ids)
        for step in range(max_new):
            t = time.perf_counter()
            if processor is not None:
                logits = processor(logits, ids)
            probs = torch.softmax(logits[0].float(), dim=-1)
            k = min(self.top_k, int((probs > 0).sum()))   # a constraint may allow fewer than top_k tokens
            top_probs, top_ids = torch.topk(probs, k)
            base = cache.length
            mask = torch.cat([torch.ones(k, base, dtype=torch.bool, device=device),
                              torch.eye(k, dtype=torch.bool, device=device)], dim=1)
            cand_logits, cand_hidden = model(top_ids[None], torch.full((k,), base, device=device), cache, mask,
                                             return_hidden=True)
            scores = degeneration_scores(top_probs, cand_hidden[0], context_hidden, self.penalty_alpha)
            best = int(scores.argmax())
            cache.keep([base - 1, base + best])   # keep() leaves slots before its first untouched
            token = int(top_ids[best])
            ids.append(token)
            context_hidden = torch.cat([context_hidden, cand_hidden[0, best:best + 1]])
            logits = cand_logits[0, best:best + 1]
            stats.forwards += 1 if step else 0
            stats.generated_tokens = step + 1
            elapsed = time.perf_counter() - t
            if step:
                stats.decode_s += elapsed
            else:
                stats.prefill_s += elapsed
            yield Step([token], 0, 0)
            if token in eos:
                return
