"""ADED-style drafting: tri-gram statistics of the text, expanded as a probability-ranked tree.

Reference: X. Liu et al., "Adaptive Draft-Verification for Efficient Large Language Model Decoding" (ADED,
2024), https://arxiv.org/abs/2407.12021.

ADED approximates the target's next-token distribution with a tri-gram table that is refined during
decoding, and builds drafts by a search that balances exploiting likely continuations against exploring
alternatives. This is a deliberately small version of that idea:

* **Table.** ``(prev2, prev1) -> {next: count}`` over every committed token (prompt and generated), with a
  bigram table ``prev1 -> {next: count}`` as back-off when the tri-gram context is unseen. A successor's
  probability is estimated as ``count / (total + 1)``: the ``+ 1`` reserves mass for "something unseen", so a
  successor seen once is worth 0.5, one seen 3 times out of 3 is worth 0.75. Ties go to the most recent.
* **Draft.** Best-first expansion by estimated path probability (product along the path) over the
  ``max_branch`` best successors of each node; every node whose path probability reaches ``threshold``
  is drafted, best first, up to the node budget.
* **Adaptive balance.** The threshold moves with acceptance of this drafter's own drafts: when a draft is
  accepted to its deepest node, the threshold is divided by ``adapt`` (explore: more, deeper, less certain
  nodes); when nothing is accepted it is multiplied by ``adapt`` (exploit: only confident nodes), within
  ``[min_threshold, max_threshold]``.

Example: after ``[1, 2, 3, 1, 2, 3, 1, 2]`` the context ``(1, 2)`` was followed by ``3`` twice (estimate
2/3), then ``(2, 3)`` by ``1`` twice (path 4/9), ``(3, 1)`` by ``2`` twice (path 8/27) ... so the draft is the
chain ``[3, 1, 2, ...]`` down to the threshold.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from ..tree import DraftTree
from .base import Drafter

Key = tuple[int, int] | int


class NgramTable:
    """Counts of next tokens per context key (a ``(prev2, prev1)`` pair or a single ``prev1`` token).

    ``top(key, n)`` is cached per key until that key is updated, so drafting never re-sorts a hot context.

    >>> table = NgramTable()
    >>> for nxt in (5, 6, 5):
    ...     table.add((1, 2), nxt)
    >>> table.top((1, 2), 2)   # 5: 2/(3+1), 6: 1/(3+1)
    [(0.5, 5), (0.25, 6)]
    """

    __slots__ = ("counts", "totals", "_clock", "_top")

    def __init__(self) -> None:
        self.counts: dict[Key, dict[int, list[int]]] = {}  # key -> {next: [count, last seen clock]}
        self.totals: dict[Key, int] = {}
        self._clock = 0
        self._top: dict[Key, list[tuple[float, int]]] = {}

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, key: Key, nxt: int) -> None:
        self._clock += 1
        succ = self.counts.get(key)
        if succ is None:
            succ = self.counts[key] = {}
        entry = succ.get(nxt)
        if entry is None:
            succ[nxt] = [1, self._clock]
        else:
            entry[0] += 1
            entry[1] = self._clock
        self.totals[key] = self.totals.get(key, 0) + 1
        self._top.pop(key, None)

    def top(self, key: Key, n: int) -> list[tuple[float, int]]:
        """The ``n`` most frequent successors of ``key`` as ``(estimated probability, token)``, best first
        (ties: most recently seen first); empty when ``key`` was never seen."""
        cached = self._top.get(key)
        if cached is not None and len(cached) >= n:
            return cached[:n]
        succ = self.counts.get(key)
        if not succ:
            return []
        denom = self.totals[key] + 1.0
        best = heapq.nlargest(n, succ.items(), key=lambda kv: (kv[1][0], kv[1][1]))
        out = [(count / denom, tok) for tok, (count, _) in best]
        self._top[key] = out
        return out


@dataclass(repr=False)
class AdaptiveTrigramDrafter(Drafter):
    """Tri-gram table of the committed text, drafted by best-first expansion with an adaptive threshold.

    Args:
        max_branch: successors expanded per node.
        threshold: initial minimum estimated path probability of a drafted node.
        min_threshold, max_threshold: range the threshold adapts in.
        adapt: multiplicative threshold step (> 1).
        backoff: use bigram statistics where the tri-gram context is unseen.
        keep_across_prompts: keep the tables across ``reset`` (statistics of the model's own style).
    """

    max_branch: int = 3
    threshold: float = 0.1
    min_threshold: float = 0.02
    max_threshold: float = 0.5
    adapt: float = 1.25
    backoff: bool = True
    keep_across_prompts: bool = False

    name = "trigram"

    def __post_init__(self) -> None:
        if not 0.0 < self.min_threshold <= self.threshold <= self.max_threshold <= 1.0:
            raise ValueError("need 0 < min_threshold <= threshold <= max_threshold <= 1")
        if self.adapt <= 1.0 or self.max_branch < 1:
            raise ValueError("need adapt > 1 and max_branch >= 1")
        self.initial_threshold = self.threshold
        self.trigrams = NgramTable()
        self.bigrams = NgramTable()

    def _restart(self) -> None:
        if not self.keep_across_prompts:
            self.trigrams = NgramTable()
            self.bigrams = NgramTable()
            self.threshold = self.initial_threshold

    def _consume(self, start: int) -> None:
        h = self.history
        tri, bi = self.trigrams, self.bigrams
        for p in range(max(start, 1), len(h)):
            bi.add(h[p - 1], h[p])
            if p >= 2:
                tri.add((h[p - 2], h[p - 1]), h[p])

    def successors(self, prev2: int | None, prev1: int) -> list[tuple[float, int]]:
        """Estimated ``(probability, token)`` successors of the context, best first (tri-gram, else bigram)."""
        out = self.trigrams.top((prev2, prev1), self.max_branch) if prev2 is not None else []
        if not out and self.backoff:
            out = self.bigrams.top(prev1, self.max_branch)
        return out

    def _draft(self, max_tokens: int) -> DraftTree:
        h = self.history
        threshold = self.threshold
        tokens: list[int] = []
        parents: list[int] = []
        order = 0
        heap: list[tuple[float, int, int, int | None, int, int]] = []  # (-p, order, parent, prev2, prev1, tok)
        prev2 = h[-2] if len(h) >= 2 else None
        for q, tok in self.successors(prev2, h[-1]):
            if q >= threshold:
                heap.append((-q, order, -1, prev2, h[-1], tok))
                order += 1
        heapq.heapify(heap)
        while heap and len(tokens) < max_tokens:
            neg_p, _, parent, _, prev1, tok = heapq.heappop(heap)
            node = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            for q, nxt in self.successors(prev1, tok):
                p = -neg_p * q
                if p >= threshold:
                    heapq.heappush(heap, (-p, order, node, prev1, tok, nxt))
                    order += 1
        return DraftTree(tokens, parents)

    def _learn(self, accepted: int, logits: Tensor | None, tokens: Sequence[int] | None) -> None:
        if not self.proposed(tokens):
            return  # another drafter's tree was verified: no signal about ours
        if accepted >= self.last_tree.max_depth:
            self.threshold = max(self.min_threshold, self.threshold / self.adapt)
        elif accepted == 0:
            self.threshold = min(self.max_threshold, self.threshold * self.adapt)
