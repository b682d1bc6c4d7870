"""Suffix automaton: structure against brute force, the longest-previous-match table, the drafter's rule."""
from __future__ import annotations

import random

import pytest

from tachy.speculative.drafters import SuffixAutomaton, SuffixAutomatonDrafter, longest_previous_matches
from tachy.speculative.drafters.suffix_automaton import DraftMatch
from tachy.speculative.tree import DraftTree


def brute_previous_match(tokens: list[int], i: int) -> tuple[int, list[int]]:
    """Longest suffix of tokens[:i+1] also ending at some e < i, and all such e."""
    for length in range(i, 0, -1):
        suffix = tokens[i - length + 1:i + 1]
        ends = [e for e in range(length - 1, i) if tokens[e - length + 1:e + 1] == suffix]
        if ends:
            return length, ends
    return 0, []


def test_automaton_recognizes_exactly_the_substrings():
    rng = random.Random(0)
    for _ in range(40):
        toks = [rng.randrange(3) for _ in range(rng.randint(0, 14))]
        sam = SuffixAutomaton(toks)
        assert sam.num_states <= max(2 * len(toks) - 1, len(toks) + 1)
        subs = {tuple(toks[i:j]) for i in range(len(toks) + 1) for j in range(i, len(toks) + 1)}
        for L in range(0, 5):
            for _ in range(10):
                pat = [rng.randrange(3) for _ in range(L)]
                assert sam.contains(pat) == (tuple(pat) in subs)


@pytest.mark.parametrize("tokens, expected", [
    ([1, 2, 1, 2, 3], [(0, -1), (0, -1), (1, 0), (2, 1), (0, -1)]),
    ([5, 5, 5], [(0, -1), (1, 0), (2, 1)]),
    ([1, 2, 3], [(0, -1)] * 3),
    ([1, 2, 3, 2, 3, 1, 2, 3], None),  # checked against brute force below
])
def test_longest_previous_matches(tokens, expected):
    got = longest_previous_matches(tokens)
    if expected is not None:
        assert got == expected
    for i, (length, end) in enumerate(got):
        b_len, b_ends = brute_previous_match(tokens, i)
        assert length == b_len and (end in b_ends if length else end == -1)


def test_longest_previous_matches_random():
    rng = random.Random(1)
    for _ in range(100):
        toks = [rng.randrange(3) for _ in range(rng.randint(1, 25))]
        for i, (length, end) in enumerate(longest_previous_matches(toks)):
            b_len, b_ends = brute_previous_match(toks, i)
            assert length == b_len and (end in b_ends if length else end == -1)


def test_step_matches_pattern_against_fixed_automaton():
    sam = SuffixAutomaton([4, 5, 6, 7, 8])
    state = length = 0
    lengths = []
    for t in [0, 5, 6, 1, 5, 6, 7]:
        state, length = sam.step(state, length, t)
        lengths.append(length)
    assert lengths == [0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("context, kwargs, max_tokens, expected", [
    ([1, 2, 3, 9, 1, 2], {}, 5, [3, 9, 1, 2, 3]),          # copy after [1, 2], repeating into the present
    ([1, 2, 5, 1, 2, 6, 1, 2], {}, 3, [6, 1, 2]),          # most recent occurrence of [1, 2]
    ([1, 2, 3], {}, 4, []),
    ([4, 4], {}, 3, [4, 4, 4]),
    ([1, 2, 3, 9, 1, 2], {"min_match_len": 3}, 5, []),    # match of 2 < 3
    # static corpus: ties go to the context, a longer corpus match wins
    ([0, 5, 6, 1, 5], {"corpus_ids": [[4, 5, 6, 7, 8]]}, 3, [6, 1, 5]),
    ([0, 9, 5, 6], {"corpus_ids": [[4, 5, 6, 7, 8]]}, 5, [7, 8]),
    ([5, 6, 1, 4, 5, 6], {"corpus_ids": [[4, 5, 6, 7, 8]]}, 5, [7, 8]),
    ([0, 4, 5, 6, 7], {"corpus_ids": [4, 5, 6, 7, 8, 9]}, 1, [8]),   # a flat corpus list
    ([2], {"corpus_ids": [[1, 2], [3, 4]]}, 4, []),       # continuations stop at a document boundary
])
def test_drafter_table(context, kwargs, max_tokens, expected):
    d = SuffixAutomatonDrafter(**kwargs)
    d.reset(context)
    assert d.propose(context, max_tokens) == DraftTree.chain(expected)


def test_corpus_as_arrays():
    import numpy as np
    import torch

    for corpus in (np.array([4, 5, 6, 7, 8]), torch.tensor([4, 5, 6, 7, 8]), [torch.tensor([4, 5, 6, 7, 8])]):
        d = SuffixAutomatonDrafter(corpus_ids=corpus)
        assert d.propose([0, 9, 5, 6], 5) == DraftTree.chain([7, 8])


def test_incremental_equals_from_scratch():
    rng = random.Random(2)
    corpus = [[rng.randrange(4) for _ in range(30)] for _ in range(3)]
    for _ in range(25):
        ctx = [rng.randrange(4) for _ in range(rng.randint(1, 80))]
        inc = SuffixAutomatonDrafter(corpus_ids=corpus)
        inc.reset(ctx[:3])
        pos = 3
        while pos < len(ctx):
            pos = min(len(ctx), pos + rng.randint(1, 6))
            inc.update(ctx[:pos], 0)
        fresh = SuffixAutomatonDrafter(corpus_ids=corpus)
        fresh.reset(ctx)
        assert inc.propose(ctx, 8) == fresh.propose(ctx, 8)
        assert (inc.match_len, inc.static_len) == (fresh.match_len, fresh.static_len)
        b_len, b_ends = brute_previous_match(ctx, len(ctx) - 1)
        assert inc.match_len == b_len and (inc.match_end in b_ends if b_len else True)


def test_reset_starts_a_new_automaton():
    d = SuffixAutomatonDrafter()
    d.reset([1, 2, 3, 1])
    assert d.propose([1, 2, 3, 1], 2).tokens == [2, 3]
    d.reset([7, 1])
    assert d.propose([7, 1], 2) == DraftTree.empty()
    assert len(d.sam) == 2


def test_draft_match_walks_a_draft_past_the_context_and_finds_what_followed():
    sam = SuffixAutomatonDrafter()
    sam.reset([5, 1, 2, 3, 4, 9, 7])
    match = DraftMatch(sam)
    match.push(1)
    match.push(2)                                     # text ... 9, 7, 1, 2: "1 2" occurred, then 3 4 9
    assert match.continuation(3, min_match_len=2) == [3, 4, 9]
    assert match.continuation(3, min_match_len=3) == []
    match.push(8)                                     # 8 never occurred: no match
    assert match.continuation(3, min_match_len=1) == []


def test_draft_match_is_the_longest_suffix_found_in_the_context():
    rng = random.Random(0)
    for _ in range(200):
        history = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        draft = [rng.randrange(4) for _ in range(rng.randint(1, 6))]
        sam = SuffixAutomatonDrafter()
        sam.reset(history)
        match = DraftMatch(sam)
        for t in draft:
            match.push(t)
        text = history + draft
        longest = max(n for n in range(len(text) + 1)
                      if n == 0 or any(history[i:i + n] == text[-n:] for i in range(len(history))))
        assert match.length == longest
        if longest:
            assert history[match.end - longest + 1:match.end + 1] == text[-longest:]
            assert match.continuation(5, 1) == history[match.end + 1:match.end + 6]
