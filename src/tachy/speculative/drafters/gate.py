"""The never-slower gate: speculate only as much as it pays, measured as the generation goes.

Speculative decoding is slower than plain decoding whenever drafts are rarely accepted, since a verify forward
over T tokens costs more than a one-token step. :class:`SpeedGate` wraps any drafter and treats the draft
budget as a bandit arm: budget 0 is plain decoding, the others cap the draft tree. Each step is timed from
``propose`` to ``update`` (drafting + target forward + verification) and credited to its arm as seconds per
committed token (exponential average). The gate plays the arm with the lowest cost and, with probability
``explore``, a neighbouring arm, so it follows the text as it changes. Budget 0 is always an arm, so on text
where nothing is accepted the gate settles on plain decoding and costs at most its exploration steps.

The inner drafter sees every step (``update`` is forwarded even after a plain step), so it keeps learning.
"""
from __future__ import annotations

import random
import time
from typing import Sequence

from torch import Tensor

from ..tree import DraftTree
from .base import Drafter, Wrapper
from .fallback import ModelFreeDrafter


class SpeedGate(Wrapper):
    """Wrap ``inner``; choose per step a draft budget among ``budgets`` by measured seconds per token.

    inner: the drafter to gate. budgets (default (0, 4, 8, 16)): candidate node budgets, 0 = plain decoding.
    explore (0.1): probability of trying a neighbouring budget. decay (0.3): weight of the newest measurement.
    seed (0): exploration is deterministic for a given seed, so runs are repeatable.
    """

    name = "gate"

    def __init__(self, inner: Drafter, budgets: Sequence[int] = (0, 4, 8, 16), explore: float = 0.1,
                 decay: float = 0.3, seed: int = 0):
        if 0 not in budgets:
            raise ValueError("SpeedGate needs budget 0 (plain decoding) among its arms")
        self.inner = inner
        self.budgets = sorted(set(budgets))
        self.explore, self.decay = explore, decay
        self.rng = random.Random(seed)
        self.cost: dict[int, float] = {}        # budget -> EMA seconds per committed token
        self.arm = self.budgets[-1]
        self.started: float | None = None   # when the current step's propose began
        self.steps = 0

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """A new sequence. The arm costs carry over: they describe the model and machine more than the text,
        and the moving average lets the new text correct them within a few steps (re-measuring every arm
        on each request cost more than it saved on short answers)."""
        self.inner.reset(prompt_ids)
        self.steps = 0

    def choose(self) -> int:
        untried = [b for b in reversed(self.budgets) if b not in self.cost]
        if untried:  # measure every arm once, largest first
            return untried[0]
        best = min(self.budgets, key=lambda b: self.cost[b])
        if self.rng.random() < self.explore:
            i = self.budgets.index(best) + self.rng.choice((-1, 1))
            return self.budgets[min(max(i, 0), len(self.budgets) - 1)]
        return best

    def propose(self, ids: Sequence[int], max_tokens: int) -> DraftTree:
        self.started = time.perf_counter()
        self.arm = self.choose()
        budget = min(self.arm, max_tokens)
        return self.inner.propose(ids, budget) if budget > 0 else DraftTree.empty()

    def update(self, ids: Sequence[int], accepted: int, logits: Tensor | None = None,
               tokens: Sequence[int] | None = None) -> None:
        self.inner.update(ids, accepted, logits, tokens)
        if self.started is not None:
            per_token = (time.perf_counter() - self.started) / (accepted + 1)
            old = self.cost.get(self.arm)
            self.cost[self.arm] = per_token if old is None else (1 - self.decay) * old + self.decay * per_token
            self.started = None
        self.steps += 1


class GatedModelFreeDrafter(SpeedGate):
    """``"gated"``: the model-free drafter behind the never-slower gate.

    Opt-in: docs/benchmarks.md measures it slower than the ungated drafter on 128-token answers, its
    exploration costing more than it saves.
    """

    name = "gated"

    def __init__(self, min_match_len: int = 4, k: int = 8, num_nodes: int = 48,
                 budgets: Sequence[int] = (0, 4, 8, 16), explore: float = 0.1):
        super().__init__(ModelFreeDrafter(min_match_len=min_match_len, k=k, num_nodes=num_nodes), budgets, explore)
