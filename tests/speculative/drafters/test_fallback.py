"""Fallback, combination and adaptive-length wrappers, and the model-free drafter."""
from __future__ import annotations

import pytest
import torch

from tachy.speculative.drafters import (AdaptiveLength, CombinedDrafter, Drafter, ModelFreeDrafter,
                                        FallbackDrafter, PromptLookupDrafter, SuffixAutomatonDrafter,
                                        TokenRecyclingDrafter, make_drafter)
from tachy.speculative.tree import DraftTree

from .helpers import make_stream, run_engine


class Fixed(Drafter):
    """Always proposes the same tree (truncated to the budget); records what it is told."""
    name = "fixed"

    def __init__(self, tree: DraftTree, needs_logits: bool = False):
        self.tree, self.needs_logits = tree, needs_logits
        self.calls: list = []

    def _draft(self, max_tokens):
        self.calls.append(("propose", max_tokens))
        return self.tree

    def _learn(self, accepted, logits, tokens):
        self.calls.append(("update", accepted, logits is not None, self.proposed(tokens)))


def test_fallback_uses_first_non_empty_draft():
    empty, a, b = Fixed(DraftTree.empty()), Fixed(DraftTree.chain([1, 2])), Fixed(DraftTree.chain([3]), True)
    fb = FallbackDrafter([empty, a, b])
    assert fb.needs_logits
    fb.reset([0])
    tree = fb.propose([0], 4)
    assert tree == DraftTree.chain([1, 2]) and fb.chosen is a
    assert b.calls == []                                              # not asked
    fb.update([0, 1, 2, 5], 2, torch.zeros(3, 8), [0, 1, 2])
    assert a.calls[-1] == ("update", 2, False, True)                  # logits only to those that want them
    assert b.calls[-1] == ("update", 2, True, False)                  # not b's draft
    assert empty.calls[-1] == ("update", 2, False, False)
    assert b.history == [0, 1, 2, 5]                                  # everyone keeps up with the text


def test_fallback_from_names_and_all_empty():
    fb = FallbackDrafter.from_names(["sam", "pld"])
    assert [d.name for d in fb.drafters] == ["sam", "pld"] and not fb.needs_logits
    fb.reset([1, 2, 3])
    assert fb.propose([1, 2, 3, 4], 4) == DraftTree.empty() and fb.chosen is None
    with pytest.raises(ValueError):
        FallbackDrafter([])


def test_combined_budgets_and_union():
    c = CombinedDrafter([Fixed(DraftTree.chain([1, 2, 3, 4])), Fixed(DraftTree.chain([1, 5, 6]))])
    assert c.budgets(5) == [3, 2] and c.budgets(0) == [0, 0] and sum(c.budgets(17)) == 17
    c.reset([0])
    tree = c.propose([0], 5)   # [1, 2, 3] and [1, 5] share their first node
    assert tree == DraftTree([1, 2, 3, 5], [-1, 0, 1, 0])
    assert [call[1] for call in c.drafters[1].calls if call[0] == "propose"] == [2]


def test_combined_passes_unused_budget_on():
    first, second = Fixed(DraftTree.empty()), Fixed(DraftTree.chain([7, 8, 9, 10]))
    c = CombinedDrafter([first, second], shares=[3, 1])
    c.reset([0])
    assert c.propose([0], 4) == DraftTree.chain([7, 8, 9, 10])
    assert second.calls[0] == ("propose", 4)
    with pytest.raises(ValueError):
        CombinedDrafter([first], shares=[0])


def test_adaptive_length_grows_and_shrinks():
    inner = Fixed(DraftTree.chain(list(range(1, 40))))
    ad = AdaptiveLength(inner, initial=4, min_tokens=2, grow=2, shrink=1)
    assert ad.name == "adaptive-fixed" and not ad.needs_logits
    ids = [0]
    ad.reset(ids)

    def step(accepted, foreign=False):
        nonlocal ids
        tree = ad.propose(ids, 16)
        tokens = [ids[-1]] + ([9, 9] if foreign else tree.tokens)
        ids = ids + tree.tokens[:accepted] + [50]
        ad.update(ids, accepted, None, tokens)
        return len(tree)

    assert step(4) == 4 and ad.length == 6        # all accepted: grow
    assert step(6) == 6 and ad.length == 8
    assert step(3) == 8 and ad.length == 7        # not all: shrink
    for _ in range(10):
        step(0)
    assert ad.length == 2                         # not below min_tokens
    step(0, foreign=True)                         # someone else's draft: no change
    assert ad.length == 2
    ad.reset([1])
    assert ad.length == 4


def test_adaptive_length_is_capped_by_the_budget():
    ad = AdaptiveLength(PromptLookupDrafter(), initial=3)
    ctx = [1, 2] * 10
    ad.reset(ctx)
    for _ in range(5):
        tree = ad.propose(ctx, 4)
        ctx2 = ctx + tree.tokens + [ctx[-2]]
        ad.update(ctx2, len(tree), None, [ctx[-1]] + tree.tokens)
        ctx = ctx2
    assert ad.length == 4


def test_model_free_drafter_prefers_long_context_matches():
    d = make_drafter("model-free")
    assert isinstance(d, ModelFreeDrafter) and d.needs_logits
    sam, rec = d.drafters
    assert isinstance(sam, SuffixAutomatonDrafter) and isinstance(rec, AdaptiveLength)
    assert isinstance(rec.inner, TokenRecyclingDrafter) and rec.length == 4   # recycling starts at 4 nodes
    ctx = [10, 11, 12, 13, 14, 15, 10, 11, 12, 13]
    d.reset(ctx)
    assert d.propose(ctx, 3) == DraftTree.chain([14, 15, 10]) and d.chosen is sam
    logits = torch.zeros(1, 20)
    logits[0, 7] = 1.0
    d.update(ctx + [3], 0, logits, [13])                               # recycling learns 13 -> 7
    d.update(ctx + [3, 13], 0, None, None)
    tree = d.propose(ctx + [3, 13], 3)                                 # match [13] is too short for SAM
    assert d.chosen is rec and tree.tokens[0] == 7


def test_wrappers_in_engine_loop():
    stream = make_stream(900, 40, seed=4)
    for drafter in (FallbackDrafter.from_names(["sam", "recycling"]),
                    CombinedDrafter.from_names(["pld", "trigram"], shares=[2, 1]),
                    AdaptiveLength(make_drafter("sam"))):
        stats = run_engine(drafter, stream, 200, 40, 12, 40)
        assert stats.accepted > 0


def test_a_fork_of_a_composite_forks_its_inner_drafters():
    d = FallbackDrafter([SuffixAutomatonDrafter(), AdaptiveLength(PromptLookupDrafter())])
    twin = d.fork()
    assert twin.drafters[0] is not d.drafters[0] and twin.drafters[1].inner is not d.drafters[1].inner
    d.reset([1, 2, 3, 1, 2])
    twin.reset([9, 9])
    assert d.drafters[0].history == [1, 2, 3, 1, 2] and twin.drafters[0].history == [9, 9]   # a sequence each
    assert d.drafters[1].inner.history == [1, 2, 3, 1, 2] and twin.drafters[1].inner.history == [9, 9]
    assert d.propose([1, 2, 3, 1, 2], 4).tokens == [3, 1, 2, 3] and twin.propose([9, 9], 4).tokens == [9] * 4
