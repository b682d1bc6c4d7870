"""Drafters made of drafters: fallback chains, merged trees, and an adaptive draft budget.

* :class:`FallbackDrafter`: ask drafters in order, use the first non-empty draft (SAM-Decoding's recipe:
  retrieval when the context has a long enough match, a model-based tree otherwise).
* :class:`CombinedDrafter`: every drafter gets a share of the node budget (unused budget passes on to the
  next drafter), and their trees are merged into one trie.
* :class:`AdaptiveLength`: wraps any drafter and moves its node budget with acceptance: grows after a draft
  accepted to its deepest node, shrinks after a shorter acceptance (the heuristic of transformers' assisted
  generation: ``+grow`` / ``-shrink``).
* :class:`ModelFreeDrafter` (``"model-free"``): suffix automaton when the longest match has at least
  ``min_match_len`` tokens, else Token Recycling. ``"gated"`` is this behind the never-slower gate (gate.py);
  ``"default"`` uses it where drafting with the target's int4 copy does not pay (default.py).

All of them forward ``reset``, ``update``, ``check_target`` and ``attach_cache`` to every inner drafter (with the logits only to those that want
them), so each keeps its incremental state. An inner drafter whose draft was not the one verified learns
the committed tokens but recognizes (:meth:`Drafter.proposed`) that ``accepted`` is not about its draft.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..tree import DraftTree
from .base import Drafter, Wrapper
from .suffix_automaton import SuffixAutomatonDrafter
from .token_recycling import TokenRecyclingDrafter


class _Composite(Drafter):
    """Shared plumbing: a list of inner drafters, reset/update forwarded to all of them."""

    def __init__(self, drafters: Sequence[Drafter]):
        if not drafters:
            raise ValueError(f"{type(self).__name__} needs at least one drafter")
        self.drafters: list[Drafter] = list(drafters)
        self.needs_logits = any(d.needs_logits for d in self.drafters)  # type: ignore[misc]
        self.last_tree = DraftTree.empty()

    @classmethod
    def from_names(cls, names: Sequence[str], **kwargs):
        """Build the inner drafters by registry name, e.g. ``FallbackDrafter.from_names(["sam", "pld"])``."""
        from . import make_drafter

        return cls([make_drafter(n) for n in names], **kwargs)

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self.last_tree = DraftTree.empty()
        for d in self.drafters:
            d.reset(prompt_ids)

    def update(self, ids: Sequence[int], accepted: int, logits: Tensor | None = None,
               tokens: Sequence[int] | None = None) -> None:
        for d in self.drafters:
            d.update(ids, accepted, logits if d.needs_logits else None, tokens)

    def check_target(self, target) -> None:
        for d in self.drafters:
            d.check_target(target)

    def attach_cache(self, cache) -> None:
        for d in self.drafters:
            d.attach_cache(cache)

    @property
    def model_s(self) -> float:
        return sum(d.model_s for d in self.drafters)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.drafters!r})"


class FallbackDrafter(_Composite):
    """The first non-empty draft of ``drafters``, asked in order (later ones are not asked that step)."""

    name = "fallback"

    def __init__(self, drafters: Sequence[Drafter]):
        super().__init__(drafters)
        self.chosen: Drafter | None = None  # the drafter whose tree the last propose returned

    def propose(self, ids: Sequence[int], max_tokens: int) -> DraftTree:
        tree = DraftTree.empty()
        self.chosen = None
        for d in self.drafters:
            if self.chosen is None:
                tree = d.propose(ids, max_tokens)
                if len(tree):
                    self.chosen = d
            else:
                d.last_tree = DraftTree.empty()  # not asked this step
        self.last_tree = tree
        return tree


class CombinedDrafter(_Composite):
    """The union of several drafters' trees (merged as a trie) within one node budget.

    Args:
        drafters: in priority order.
        shares: fraction of the budget per drafter (default equal). A drafter's unused budget is added to
            the next one's, so a drafter with nothing to say leaves its room to the others.
    """

    name = "combined"

    def __init__(self, drafters: Sequence[Drafter], shares: Sequence[float] | None = None):
        super().__init__(drafters)
        if shares is None:
            shares = [1.0] * len(self.drafters)
        if len(shares) != len(self.drafters) or any(s < 0 for s in shares) or not sum(shares) > 0:
            raise ValueError("shares: one non-negative weight per drafter, not all zero")
        total = float(sum(shares))
        self.shares = [s / total for s in shares]

    def budgets(self, max_tokens: int) -> list[int]:
        """Integer node budgets per drafter summing to ``max_tokens`` (rounding remainders go first)."""
        raw = [max_tokens * s for s in self.shares]
        out = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[:max_tokens - sum(out)]:
            out[i] += 1
        return out

    def propose(self, ids: Sequence[int], max_tokens: int) -> DraftTree:
        paths: list[list[int]] = []
        carry = 0
        for d, budget in zip(self.drafters, self.budgets(max_tokens)):
            budget += carry
            tree = d.propose(ids, budget) if budget > 0 else DraftTree.empty()
            if budget <= 0:
                d.last_tree = DraftTree.empty()
            carry = budget - len(tree)
            paths.extend(tree.paths())
        self.last_tree = DraftTree.from_paths(paths).truncate(max_tokens)
        return self.last_tree


class AdaptiveLength(Wrapper):
    """Wrap ``inner`` so that its node budget follows acceptance.

    The budget starts at ``initial`` (capped by each step's ``max_tokens``); after a verify of this drafter's
    own draft it grows by ``grow`` when the draft was accepted down to its deepest node and shrinks by
    ``shrink`` (not below ``min_tokens``) otherwise.
    """

    def __init__(self, inner: Drafter, initial: int = 8, min_tokens: int = 1, grow: int = 2, shrink: int = 1):
        if not 1 <= min_tokens <= initial:
            raise ValueError("need 1 <= min_tokens <= initial")
        self.inner = inner
        self.name = f"adaptive-{inner.name}"  # type: ignore[misc]
        self.initial, self.min_tokens, self.grow, self.shrink = initial, min_tokens, grow, shrink
        self.length = initial
        self._cap = initial
        self.last_tree = DraftTree.empty()

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self.length = self.initial
        self.last_tree = DraftTree.empty()
        self.inner.reset(prompt_ids)

    def propose(self, ids: Sequence[int], max_tokens: int) -> DraftTree:
        self._cap = max(max_tokens, self.min_tokens)
        self.last_tree = self.inner.propose(ids, min(max_tokens, self.length))
        return self.last_tree

    def update(self, ids: Sequence[int], accepted: int, logits: Tensor | None = None,
               tokens: Sequence[int] | None = None) -> None:
        self.inner.update(ids, accepted, logits, tokens)
        if self.proposed(tokens):
            if accepted >= self.last_tree.max_depth:
                self.length = min(self.length + self.grow, self._cap)
            else:
                self.length = max(self.length - self.shrink, self.min_tokens)

    def __repr__(self) -> str:
        return f"AdaptiveLength({self.inner!r}, length={self.length})"


class ModelFreeDrafter(FallbackDrafter):
    """``"model-free"``: the suffix automaton's chain when the context holds a match of at least
    ``min_match_len`` tokens, else a Token Recycling draft (SAM-Decoding with Token Recycling as its
    auxiliary drafter). Options are passed to the two drafters.

    Token Recycling's drafts are accepted far less often than a long suffix match, and a verify forward over
    T tokens costs about 1 + 0.06 (T - 1) one-token steps here (docs/benchmarks.md), so its budget starts at
    ``recycling_tokens`` and follows acceptance (:class:`AdaptiveLength`); the suffix automaton keeps the
    whole budget. Measured with `tachy bench` on the 30 dev prompts: 1.29x -> 1.32x over plain decoding.
    """

    name = "model-free"

    def __init__(self, min_match_len: int = 4, k: int = 8, num_nodes: int = 48, recycling_tokens: int = 4):
        recycling = AdaptiveLength(TokenRecyclingDrafter(k=k, num_nodes=num_nodes), initial=recycling_tokens)
        super().__init__([SuffixAutomatonDrafter(min_match_len=min_match_len), recycling])
