"""Token Recycling: template shape, adjacency updates from (fake) verify logits, template expansion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tachy.speculative.drafters import TokenRecyclingDrafter, make_template
from tachy.speculative.tree import DraftTree


def ranked_logits(rows: list[list[int]], vocab: int) -> torch.Tensor:
    """Logits whose descending order in row r starts with rows[r] (then the remaining ids, lowest first)."""
    out = torch.zeros(len(rows), vocab)
    for r, ranking in enumerate(rows):
        for i, tok in enumerate(ranking):
            out[r, tok] = 100.0 - i
        rest = [t for t in range(vocab) if t not in ranking]
        out[r, rest] = -torch.arange(len(rest), dtype=torch.float32)
    return out


def test_template_is_best_first_and_prefix_closed():
    parents, ranks = make_template(40)
    assert len(parents) == 40 and parents[0] == -1 and ranks[0] == 0
    probs = [0.5, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01]
    scores = []
    for i, (p, r) in enumerate(zip(parents, ranks)):
        assert -1 <= p < i
        scores.append(probs[r] * (1.0 if p < 0 else scores[p]))
    assert scores == sorted(scores, reverse=True)
    siblings = {(p, r) for p, r in zip(parents, ranks)}
    assert len(siblings) == 40                        # no two nodes share (parent, rank)


def test_template_small_example():
    assert make_template(4, rank_probs=(0.6, 0.3)) == ([-1, 0, -1, 1], [0, 0, 1, 0])
    assert make_template(3, rank_probs=(0.6, 0.3), max_depth=1) == ([-1, -1], [0, 1])
    with pytest.raises(ValueError):
        make_template(3, rank_probs=(1.0,))


def test_update_and_expand():
    d = TokenRecyclingDrafter(k=2, num_nodes=4, rank_probs=(0.6, 0.3))   # template (0) (0,0) (1) (0,0,0)
    d.reset([1, 5])
    assert d.propose([1, 5], 4) == DraftTree.empty()                     # nothing learned yet
    logits = ranked_logits([[7, 2], [9, 3]], vocab=12)                   # after 5: 7, 2; after 7: 9, 3
    d.update([1, 5, 7], 0, logits, [5, 7])
    assert d.adjacency[5].tolist() == [7, 2] and d.adjacency[7].tolist() == [9, 3]
    assert (d.adjacency[[0, 1, 2, 3, 4, 6, 8, 9, 10, 11, 12]] == -1).all()
    # root 5: (0) -> 7, (0,0) -> adj[7][0] = 9, (1) -> 2, (0,0,0) -> adj[9] unknown: dropped
    assert d.propose([1, 5, 7, 5], 4) == DraftTree([7, 9, 2], [-1, 0, -1])
    assert d.propose([1, 5, 7, 5], 2) == DraftTree([7, 9], [-1, 0])      # the budget truncates the template
    assert d.propose([1, 5, 7, 3], 4) == DraftTree.empty()               # unseen root


def test_children_of_a_dropped_node_are_dropped():
    d = TokenRecyclingDrafter(k=2, num_nodes=6, rank_probs=(0.6, 0.3))
    d.reset([0])
    d.update([0, 1], 0, ranked_logits([[1, 2], [3, 4]], 8), [0, 1])       # adj[0] = 1, 2 ; adj[1] = 3, 4
    tree = d.propose([0], 6)
    # template: (0)=1, (0,0)=3, (1)=2, (0,0,0)=adj[3] none, (0,1)=4, (1,0)=adj[2] none
    assert tree == DraftTree([1, 3, 2, 4], [-1, 0, -1, 0])


def test_repeated_token_last_row_wins_and_reset_keeps_matrix():
    d = TokenRecyclingDrafter(k=2)
    d.reset([4])
    d.update([4, 6], 0, ranked_logits([[1, 2], [3, 5], [6, 7]], 9), [4, 8, 4])
    assert d.adjacency[4].tolist() == [6, 7] and d.adjacency[8].tolist() == [3, 5]
    d.reset([0, 4])
    assert d.propose([0, 4], 3).tokens[:2] == [6, 7]     # learned state survives a new prompt
    d.clear()
    assert d.propose([0, 4], 3) == DraftTree.empty()


def test_vocab_grows_and_edge_cases():
    d = TokenRecyclingDrafter(k=8, vocab_size=4)
    d.reset([1])
    d.update([1, 2], 0, None, [1])                       # no logits: nothing to learn
    assert (d.adjacency == -1).all()
    d.update([1, 2, 3], 0, ranked_logits([[2, 3]], 6)[None], [2])   # [1, n+1, V] is accepted, V grew to 6
    assert d.adjacency.shape == (7, 8)
    assert d.adjacency[2, :2].tolist() == [2, 3] and sorted(d.adjacency[2].tolist()) == [-1, -1, 0, 1, 2, 3, 4, 5]
    assert d.adjacency.dtype == np.int32


def test_a_fork_shares_the_table_and_acceptance_but_not_the_sequence():
    d = TokenRecyclingDrafter(k=2, num_nodes=4, rank_probs=(0.6, 0.3))
    twin = d.fork()                                      # before anything is learned: the table is made later
    d.reset([1, 5])
    twin.reset([3, 8, 8])
    twin.update([3, 8, 8, 5], 0, ranked_logits([[7, 2]], 12), [5])   # the twin learns: after 5, 7 then 2
    assert d.adjacency is twin.adjacency and d.adjacency[5].tolist() == [7, 2]
    assert d.propose([1, 5], 4).tokens[:2] == [7, 2]    # the origin drafts from what its twin learned
    assert d.history == [1, 5] and twin.history == [3, 8, 8, 5]
    assert d.acceptance is twin.acceptance
    d.update([1, 5, 7, 9], 1, ranked_logits([[7, 2], [9, 3], [4, 6]], 12), [5, 7, 2])   # 7 accepted
    assert twin.acceptance.counts == d.acceptance.counts and d.acceptance.counts
