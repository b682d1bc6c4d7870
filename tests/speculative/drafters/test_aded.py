"""ADED-style tri-gram drafter: statistics, tie-breaks, back-off, the adaptive threshold."""
from __future__ import annotations

import random

import pytest

from tachy.speculative.drafters import AdaptiveTrigramDrafter, NgramTable
from tachy.speculative.tree import DraftTree


def test_table_estimates_and_recency_ties():
    t = NgramTable()
    for nxt in (5, 6, 5, 7):
        t.add((1, 2), nxt)
    assert t.top((1, 2), 3) == [(2 / 5, 5), (1 / 5, 7), (1 / 5, 6)]   # 7 is more recent than 6
    assert t.top((1, 2), 1) == [(2 / 5, 5)]
    t.add((1, 2), 6)                                                   # cache invalidated
    assert t.top((1, 2), 2) == [(2 / 6, 6), (2 / 6, 5)]
    assert t.top((9, 9), 2) == []


@pytest.mark.parametrize("context, kwargs, expected", [
    # (1,2)->3 2/3, (2,3)->1 path 4/9, (3,1)->2 8/27, (1,2)->3 .198, (2,3)->1 .132, then .088 < 0.1
    ([1, 2, 3, 1, 2, 3, 1, 2], {}, DraftTree.chain([3, 1, 2, 3, 1])),
    # (1,2) -> 3 or 4, 1/3 each: the more recent 4 first; each then -> 1 (path 1/6); then 1/12 < 0.1
    ([1, 2, 3, 1, 2, 4, 1, 2], {}, DraftTree([4, 3, 1, 1], [-1, -1, 0, 1])),
    # tri-gram (9, 2) unseen: bigram 2 -> 9 (1/2); (2, 9) -> 2 (1/4); back-off 2 -> 9 (1/8)
    ([5, 1, 2, 9, 2], {}, DraftTree.chain([9, 2, 9])),
    ([5, 1, 2, 9, 2], {"backoff": False}, DraftTree.empty()),
    ([1, 2, 3, 1, 2, 3, 1, 2], {"threshold": 0.3, "max_threshold": 0.5}, DraftTree.chain([3, 1])),
    ([1, 2, 3, 1, 2, 4, 1, 2], {"max_branch": 1}, DraftTree.chain([4, 1])),
    ([7], {}, DraftTree.empty()),
])
def test_table_of_drafts(context, kwargs, expected):
    d = AdaptiveTrigramDrafter(**kwargs)
    d.reset(context)
    assert d.propose(context, 16) == expected


def test_budget_keeps_most_probable_nodes():
    d = AdaptiveTrigramDrafter()
    ctx = [1, 2, 3, 1, 2, 4, 1, 2]
    assert d.propose(ctx, 2) == DraftTree([4, 3], [-1, -1])


def test_threshold_adapts_to_own_drafts_only():
    d = AdaptiveTrigramDrafter(threshold=0.1, adapt=2.0, min_threshold=0.02, max_threshold=0.4)
    ctx = [1, 2, 3, 1, 2, 3, 1, 2]
    d.reset(ctx)
    tree = d.propose(ctx, 16)
    assert tree.max_depth == 5
    d.update(ctx + tree.tokens + [2], 5, None, [2] + tree.tokens)     # all accepted: explore
    assert d.threshold == pytest.approx(0.05)
    ids = ctx + tree.tokens + [2]
    tree = d.propose(ids, 16)
    d.update(ids + [9], 0, None, [ids[-1]] + tree.tokens)             # nothing accepted: exploit
    assert d.threshold == pytest.approx(0.1)
    d.update(ids + [9, 9], 0, None, [9, 4, 4])                        # someone else's draft: no change
    assert d.threshold == pytest.approx(0.1)
    for _ in range(5):
        ids = ids + [9]
        tree = d.propose(ids, 16)
        d.update(ids + [0], 0, None, [ids[-1]] + tree.tokens)
        ids = ids + [0]
    assert d.threshold <= 0.4
    d.reset([1, 2])
    assert d.threshold == 0.1


def test_keep_across_prompts():
    ctx = [1, 2, 3, 1, 2, 3]
    keep = AdaptiveTrigramDrafter(keep_across_prompts=True)
    forget = AdaptiveTrigramDrafter()
    for d in (keep, forget):
        d.reset(ctx)
        d.reset([8, 1, 2])
    assert keep.propose([8, 1, 2], 4).tokens[:1] == [3]
    assert forget.propose([8, 1, 2], 4) == DraftTree.empty()


def test_incremental_equals_from_scratch():
    rng = random.Random(3)
    for _ in range(20):
        ctx = [rng.randrange(5) for _ in range(rng.randint(2, 80))]
        inc = AdaptiveTrigramDrafter()
        inc.reset(ctx[:2])
        pos = 2
        while pos < len(ctx):
            pos = min(len(ctx), pos + rng.randint(1, 6))
            inc.update(ctx[:pos], 0)
        fresh = AdaptiveTrigramDrafter()
        fresh.reset(ctx)
        assert inc.propose(ctx, 12) == fresh.propose(ctx, 12)


def test_invalid_options():
    with pytest.raises(ValueError):
        AdaptiveTrigramDrafter(threshold=0.9, max_threshold=0.5)
    with pytest.raises(ValueError):
        AdaptiveTrigramDrafter(adapt=1.0)
