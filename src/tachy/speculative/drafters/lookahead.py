"""Lookahead-style n-gram pool, fed by the target's own predictions in the verify forwards.

Reference: Y. Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding"
(ICML 2024), https://arxiv.org/abs/2402.02057.

Lookahead Decoding runs two branches in one forward: a *lookahead* branch doing Jacobi iterations on a window
of future positions, whose trajectories yield n-grams for a pool keyed by their first token, and a
*verification* branch checking pool n-grams that start with the last committed token.

This drafter keeps the pool and its use, but has no Jacobi branch (the engine's verify forward only sees
``[root] + draft``): the n-grams come from forwards that happen anyway.

* **Committed text**: every committed token closes an n-gram of the generated text (the target's output).
* **Verify rows of its own drafts**: row ``j`` of the verify logits is the target's prediction after the path
  to node ``j``, so ``path[-(n-1):] + [argmax(logits[j])]`` is an n-gram the target would produce after that
  (possibly rejected) context, much like a Jacobi trajectory step. For trees proposed by another drafter
  (inside a fallback) the tree shape is unknown, so only the committed text is used.

The draft is up to ``max_guesses`` pool n-grams whose first token is the root, most recently added first,
merged into a trie. Example (``ngram=3``): after generating ``[.., 4, 5, 6]`` the pool holds ``4 -> (5, 6)``,
so a later root ``4`` drafts ``5, 6``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from ..tree import DraftTree
from .base import Drafter


class NgramPool:
    """``first token -> continuations`` (tuples), most recent last, at most ``size`` per key.

    >>> pool = NgramPool(size=2)
    >>> for g in [(1, 2, 3), (1, 4, 5), (1, 2, 3), (1, 6, 7)]:
    ...     pool.add(g)
    >>> pool.get(1, 5)   # (1, 2, 3) was refreshed, (1, 4, 5) pushed out
    [(6, 7), (2, 3)]
    """

    __slots__ = ("size", "table")

    def __init__(self, size: int = 16):
        self.size = size
        self.table: dict[int, list[tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.table.values())

    def add(self, ngram: Sequence[int]) -> None:
        key, cont = ngram[0], tuple(ngram[1:])
        conts = self.table.get(key)
        if conts is None:
            conts = self.table[key] = []
        elif cont in conts:
            conts.remove(cont)
        conts.append(cont)
        if len(conts) > self.size:
            del conts[0]

    def get(self, key: int, n: int) -> list[tuple[int, ...]]:
        """Up to ``n`` continuations of ``key``, most recent first."""
        conts = self.table.get(key)
        return conts[::-1][:n] if conts else []


@dataclass(repr=False)
class LookaheadDrafter(Drafter):
    """N-gram pool keyed by first token, filled from the committed text and the verify rows.

    Args:
        ngram: n-gram length (drafts are ``ngram - 1`` tokens deep).
        pool_size: continuations kept per first token.
        max_guesses: continuations drafted per step.
        use_prompt: also pool the prompt's n-grams (Lookahead Decoding pools only model outputs).
    """

    ngram: int = 4
    pool_size: int = 16
    max_guesses: int = 5
    use_prompt: bool = False

    name = "lookahead"
    needs_logits = True

    def __post_init__(self) -> None:
        if self.ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {self.ngram}")

    def _restart(self) -> None:
        self.pool = NgramPool(self.pool_size)
        self._text_from: int | None = None  # first position whose closing n-gram is pooled
        self._root_pos = -1

    def _consume(self, start: int) -> None:
        h, n = self.history, self.ngram
        if self._text_from is None:
            self._text_from = 0 if self.use_prompt else len(h)
        for p in range(max(start, self._text_from, n - 1), len(h)):
            self.pool.add(h[p - n + 1:p + 1])

    def _draft(self, max_tokens: int) -> DraftTree:
        self._root_pos = len(self.history) - 1
        guesses = self.pool.get(self.history[-1], self.max_guesses)
        return DraftTree.from_paths(guesses) if guesses else DraftTree.empty()

    def _learn(self, accepted: int, logits: Tensor | None, tokens: Sequence[int] | None) -> None:
        if logits is None or not self.proposed(tokens):
            return
        n, tree = self.ngram, self.last_tree
        predicted = logits.reshape(-1, logits.shape[-1]).argmax(-1).tolist()
        root_ctx = self.history[max(0, self._root_pos - n + 2):self._root_pos + 1]  # last n-1 up to the root
        contexts: list[list[int]] = [root_ctx]  # contexts[i + 1]: last n-1 tokens of the path to node i
        for tok, parent in zip(tree.tokens, tree.parents):
            contexts.append((contexts[parent + 1] + [tok])[-(n - 1):])
        for ctx, nxt in zip(contexts, predicted):
            if len(ctx) == n - 1:
                self.pool.add(ctx + [nxt])
