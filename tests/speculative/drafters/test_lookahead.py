"""Lookahead-style n-gram pool: committed text, verify rows of its own drafts, recency."""
from __future__ import annotations

import pytest
import torch

from tachy.speculative.drafters import LookaheadDrafter, NgramPool
from tachy.speculative.tree import DraftTree


def argmax_logits(predictions: list[int], vocab: int = 20) -> torch.Tensor:
    out = torch.zeros(len(predictions), vocab)
    out[torch.arange(len(predictions)), torch.tensor(predictions)] = 1.0
    return out


def test_pool_recency_and_capacity():
    pool = NgramPool(size=2)
    for g in [(1, 2, 3), (1, 4, 5), (1, 2, 3), (1, 6, 7)]:
        pool.add(g)
    assert pool.get(1, 5) == [(6, 7), (2, 3)]
    assert pool.get(1, 1) == [(6, 7)] and pool.get(2, 3) == [] and len(pool) == 2


def test_generated_text_feeds_the_pool_not_the_prompt():
    d = LookaheadDrafter(ngram=3)
    d.reset([4, 5, 6, 4])
    assert d.propose([4, 5, 6, 4, 9], 4) == DraftTree.empty()          # prompt n-grams are not pooled
    d.update([4, 5, 6, 4, 9, 8], 0)                                    # generated: ... 4 9 8 closes (4, 9, 8)
    d.update([4, 5, 6, 4, 9, 8, 4], 0)
    assert d.propose([4, 5, 6, 4, 9, 8, 4], 4) == DraftTree.chain([9, 8])
    p = LookaheadDrafter(ngram=3, use_prompt=True)
    p.reset([4, 5, 6, 4])
    assert p.propose([4, 5, 6, 4], 4) == DraftTree.chain([5, 6])


def test_verify_rows_of_own_draft_feed_the_pool():
    d = LookaheadDrafter(ngram=3, max_guesses=3)
    ctx = [1, 2, 3, 4, 5, 3]
    d.reset(ctx[:-1])
    d.update(ctx, 0)                                         # generated so far: 3 -> closes (4, 5, 3)
    d.pool.add([3, 7, 8])                                    # seed a guess for root 3
    tree = d.propose(ctx, 4)
    assert tree == DraftTree.chain([7, 8])
    # verify rows: after [5, 3] -> 9 ; after [3, 7] -> 6 ; after [7, 8] -> 1. Nothing accepted, bonus 9.
    d.update(ctx + [9], 0, argmax_logits([9, 6, 1]), [3, 7, 8])
    assert (3, 9) in d.pool.get(5, 10)                      # row 0: (5, 3) + 9, also the committed text
    assert (7, 6) in d.pool.get(3, 10)                      # row 1: (3, 7) + 6
    assert (8, 1) in d.pool.get(7, 10)                      # row 2: (7, 8) + 1


def test_foreign_draft_rows_are_ignored():
    d = LookaheadDrafter(ngram=3)
    ctx = [1, 2, 3]
    d.reset(ctx)
    d.update(ctx + [4], 0, argmax_logits([4, 6, 7]), [3, 11, 12])   # not our draft: only committed text
    assert d.pool.get(11, 5) == [] and d.pool.get(2, 5) == [(3, 4)]


def test_invalid_options():
    with pytest.raises(ValueError):
        LookaheadDrafter(ngram=1)
