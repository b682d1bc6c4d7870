"""Prompt lookup: hand-checked tables (incl. tie-breaks), the incremental index against the pure rescan."""
from __future__ import annotations

import random

import pytest

from tachy.speculative.drafters import PromptLookupDrafter, find_ngram_continuations
from tachy.speculative.tree import DraftTree


@pytest.mark.parametrize("context, max_len, kwargs, expected", [
    # suffix [1, 2] occurred at 0; the copy runs into the present and repeats the period [3, 1, 2]
    ([1, 2, 3, 1, 2], 4, {}, [[3, 1, 2, 3]]),
    # equal n: the most recent occurrence wins ([1] at 2 -> 6, not at 0 -> 5)
    ([1, 5, 1, 6, 1], 2, {}, [[6, 1]]),
    # a longer n-gram beats a more recent shorter one ([7, 1] at 0 -> 5, 8; not [1] at 4 -> 6)
    ([7, 1, 5, 8, 1, 6, 7, 1], 2, {}, [[5, 8]]),
    ([1, 2, 3], 4, {}, []),                                    # nothing repeats
    ([4], 4, {}, []),                                          # a single token
    ([3, 3], 4, {}, [[3, 3, 3, 3]]),                           # a loop of one token
    ([1, 5, 1], 4, {"min_ngram": 2}, []),                      # only [1] repeats, below min_ngram
    ([1, 2, 9, 1, 2, 8, 1, 2], 2, {"max_matches": 3}, [[8, 1], [9, 1]]),
    # n = 2 gives [3, 5, 1] (at 4) and [3, 4, 1] (at 0); n = 1 only finds starts already used
    ([1, 2, 3, 4, 1, 2, 3, 5, 1, 2], 3, {"max_ngram": 3, "max_matches": 3}, [[3, 5, 1], [3, 4, 1]]),
    # identical continuations are listed once
    ([1, 7, 1, 7, 1], 1, {"max_ngram": 1, "max_matches": 2}, [[7]]),
])
def test_table(context, max_len, kwargs, expected):
    assert find_ngram_continuations(context, max_len, **kwargs) == expected
    d = PromptLookupDrafter(**kwargs)
    d.reset(context)
    tree = d.propose(context, max_len)   # the budget is also the continuation length
    if not expected:
        assert tree == DraftTree.empty()
    elif len(expected) == 1:
        assert tree == DraftTree.chain(expected[0])
    else:
        assert tree == DraftTree.from_paths(expected).truncate(max_len, breadth_first=True)


def test_tree_of_matches_keeps_shallow_nodes_first():
    d = PromptLookupDrafter(max_matches=2)
    ctx = [1, 2, 9, 9, 9, 1, 2, 8, 8, 8, 1, 2]
    tree = d.propose(ctx, 4)   # candidates [8, 8, 8, 1] and [9, 9, 9, 1]: breadth first gives 2 + 2
    assert tree.tokens == [8, 9, 8, 9] and tree.parents == [-1, -1, 0, 1]


@pytest.mark.parametrize("kwargs", [{}, {"max_ngram": 2, "min_ngram": 2}, {"max_matches": 3},
                                    {"max_ngram": 5, "min_ngram": 1, "max_matches": 2}])
def test_incremental_equals_rescan(kwargs):
    rng = random.Random(0)
    for _ in range(30):
        ctx = [rng.randrange(4) for _ in range(rng.randint(1, 60))]
        fresh = PromptLookupDrafter(**kwargs)
        inc = PromptLookupDrafter(**kwargs)
        inc.reset(ctx[:1])
        pos = 1
        while pos < len(ctx):  # grow like the engine: a few tokens per step
            pos = min(len(ctx), pos + rng.randint(1, 5))
            inc.update(ctx[:pos], 0)
            expected = find_ngram_continuations(ctx[:pos], 6, max_ngram=kwargs.get("max_ngram", 4),
                                                min_ngram=kwargs.get("min_ngram", 1),
                                                max_matches=kwargs.get("max_matches", 1))
            tree = inc.propose(ctx[:pos], 6)
            assert tree == inc._tree(expected, 6) if expected else tree == DraftTree.empty()
        fresh.reset(ctx)
        assert fresh.propose(ctx, 6) == inc.propose(ctx, 6)


def test_reset_forgets_previous_prompt():
    d = PromptLookupDrafter()
    d.reset([1, 2, 3, 4])
    assert d.propose([1, 2, 3, 4, 1], 2).tokens == [2, 3]
    d.reset([5, 6])
    assert d.propose([5, 6, 1], 2) == DraftTree.empty()   # 1 -> 2 belonged to the old prompt


def test_invalid_options():
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_matches=0)
