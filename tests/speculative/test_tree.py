"""DraftTree: validation, structure, masks and positions for the verify forward, trie building, truncation."""
from __future__ import annotations

import random

import pytest
import torch

from tachy.speculative.tree import DraftTree


def naive_mask(parents: list[int]) -> torch.Tensor:
    """Ancestor-or-self over [root] + nodes, by walking parent links."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for q in range(-1, n):
        mask[q + 1, 0] = True
        node = q
        while node >= 0:
            mask[q + 1, node + 1] = True
            node = parents[node]
    return mask


def random_trees(count: int, max_nodes: int = 12, seed: int = 0) -> list[DraftTree]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(0, max_nodes)
        out.append(DraftTree([rng.randint(0, 5) for _ in range(n)], [rng.randint(-1, i - 1) for i in range(n)]))
    return out


def test_chain_and_empty():
    t = DraftTree.chain([7, 8, 9])
    assert t.tokens == [7, 8, 9] and t.parents == [-1, 0, 1] and len(t) == 3
    assert t.depths == [1, 2, 3] and t.is_chain and t.max_depth == 3
    assert torch.equal(t.attention_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert t.position_offsets().tolist() == [0, 1, 2, 3]
    assert t.paths() == [[7, 8, 9]]

    e = DraftTree.empty()
    assert len(e) == 0 and e.is_chain and e.paths() == [] and e.children(-1) == ()
    assert e.attention_mask().tolist() == [[True]] and e.position_offsets().tolist() == [0]


def test_branching_structure():
    #        root
    #       /    \
    #     0:5    3:6
    #    /   \      \
    #  1:7   2:8    4:7
    t = DraftTree([5, 7, 8, 6, 7], [-1, 0, 0, -1, 3])
    assert t.depths == [1, 2, 2, 1, 2] and not t.is_chain
    assert t.children(-1) == (0, 3) and t.children(0) == (1, 2) and t.children(1) == ()
    assert t.child_with_token(-1, 6) == 3 and t.child_with_token(0, 8) == 2 and t.child_with_token(0, 6) is None
    assert t.path(4) == [3, 4] and t.path(-1) == []
    assert t.leaves() == [1, 2, 4] and t.paths() == [[5, 7], [5, 8], [6, 7]]
    expected = torch.tensor([
        # root 0  1  2  3  4     (keys)
        [1, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0],  # 0
        [1, 1, 1, 0, 0, 0],  # 1
        [1, 1, 0, 1, 0, 0],  # 2
        [1, 0, 0, 0, 1, 0],  # 3
        [1, 0, 0, 0, 1, 1],  # 4
    ], dtype=torch.bool)
    assert torch.equal(t.attention_mask(), expected)
    assert t.position_offsets().tolist() == [0, 1, 2, 2, 1, 2]
    assert t.positions(10) == [10, 11, 12, 12, 11, 12]   # the root at position 10
    # the returned mask is a copy: callers may modify it
    t.attention_mask()[0, 0] = False
    assert t.attention_mask()[0, 0]


@pytest.mark.parametrize("tokens, parents", [([1, 2], [-1, 1]), ([1, 2], [-1, 5]), ([1], [-2]), ([1, 2], [-1]),
                                              ([-3], [-1])])
def test_invalid_trees_raise(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)


def test_from_paths_merges_prefixes():
    t = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [1, 5], [6], [], [1, 2, 3]])
    assert t.tokens == [1, 2, 3, 4, 5, 6] and t.parents == [-1, 0, 1, 1, 0, -1]
    assert t.paths() == [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    assert DraftTree.from_paths([[4, 5, 6]]) == DraftTree.chain([4, 5, 6])
    assert DraftTree.from_paths([]) == DraftTree.empty()


def test_truncate():
    t = DraftTree.from_paths([[1, 2, 3], [1, 4], [5, 6]])  # nodes: 1 2 3 4 5 6
    assert t.truncate(10) is t
    assert t.truncate(3) == DraftTree.chain([1, 2, 3])  # drafter's order: best path first
    assert t.truncate(0) == DraftTree.empty()
    bfs = t.truncate(4, breadth_first=True)  # depth 1: 1, 5; depth 2: 2, 4
    assert bfs.tokens == [1, 5, 2, 4] and bfs.parents == [-1, -1, 0, 0]
    with pytest.raises(ValueError):
        t.truncate(-1)


def test_row_contexts():
    t = DraftTree([5, 7, 6], [-1, 0, -1])
    rows = t.row_contexts(torch.tensor([1, 2]))
    assert [r.tolist() for r in rows] == [[1, 2], [1, 2, 5], [1, 2, 5, 7], [1, 2, 6]]
    assert [r.tolist() for r in DraftTree.empty().row_contexts([3])] == [[3]]


@pytest.mark.parametrize("t", random_trees(40), ids=repr)
def test_properties(t: DraftTree):
    n = len(t)
    mask = t.attention_mask()
    assert mask.shape == (n + 1, n + 1) and mask.dtype == torch.bool
    assert torch.equal(mask, naive_mask(t.parents))
    # depth = number of ancestors excluding the root = row count of the mask minus the root column
    assert t.position_offsets().tolist() == (mask.sum(1) - 1).tolist()
    # every prefix (and every BFS truncation) is a valid tree whose mask is the corresponding sub-mask
    for k in range(n + 1):
        assert torch.equal(t.truncate(k).attention_mask(), mask[: k + 1, : k + 1])
        bfs = t.truncate(k, breadth_first=True)
        assert len(bfs) == k and sorted(bfs.depths) == sorted(t.depths)[:k]
    # a trie rebuilt from the token paths has the same paths (minus those that became prefixes of others
    # through merging) and unique siblings
    paths = set(map(tuple, t.paths()))
    maximal = {p for p in paths if not any(len(q) > len(p) and q[: len(p)] == p for q in paths)}
    trie = DraftTree.from_paths(t.paths())
    assert sorted(map(tuple, trie.paths())) == sorted(maximal)
    for i in range(-1, len(trie)):
        toks = [trie.tokens[c] for c in trie.children(i)]
        assert len(toks) == len(set(toks))


# ---- OPT-Tree with a cost model ---------------------------------------------------------------------------------

def test_best_for_cost_worked_example():
    """By hand: root children A (p .8) and B (p .3); A's children C (.5) and D (.4); C's child E (.9).
    Path probabilities: A .8, B .3, C .4, D .32, E .36. Best subtrees by size (OPT-Tree: the n most probable
    nodes): {A} 0.8, {A,C} 1.2, {A,C,E} 1.56, {A,C,E,D} 1.88, all 2.18 expected accepted tokens.
    With forward costs 1, 1.1, 1.3, 1.6, 2.0, 2.6 (T = 1..6) the tokens per second are 1/1 = 1, 1.8/1.1 = 1.64,
    2.2/1.3 = 1.69, 2.56/1.6 = 1.6, 2.88/2.0 = 1.44, 3.18/2.6 = 1.22: two nodes, A and C, are best."""
    tree = DraftTree([10, 11, 12, 13, 14], [-1, -1, 0, 0, 2], probs=[0.8, 0.3, 0.5, 0.4, 0.9])
    assert [round(p, 4) for p in tree.path_probs()] == [0.8, 0.3, 0.4, 0.32, 0.36]
    costs = [0.0, 1.0, 1.1, 1.3, 1.6, 2.0, 2.6]
    best = tree.best_for_cost(costs)
    assert best.tokens == [10, 12] and best.parents == [-1, 0] and best.probs == [0.8, 0.5]
    assert len(tree.best_for_cost([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])) == 0        # no draft pays
    assert tree.best_for_cost([0.0] + [1.0] * 6).tokens == tree.tokens            # free verification: all


def _subtrees(tree: DraftTree, n: int):
    """Every prefix-closed node set of size n (brute force)."""
    import itertools
    for combo in itertools.combinations(range(len(tree)), n):
        chosen = set(combo)
        if all(tree.parents[i] < 0 or tree.parents[i] in chosen for i in combo):
            yield combo


def test_the_most_probable_nodes_are_the_best_subtree_of_their_size():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 8)
        parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
        tree = DraftTree(list(range(n)), parents, probs=[rng.random() for _ in range(n)])
        probs = tree.path_probs()
        for size in range(1, n + 1):
            costs = [0.0] + [1.0] * (size + 1) + [1e9] * (n - size)   # forwards up to size + 1 tokens are free
            kept = tree.best_nodes_for_cost(costs)
            best = max(sum(probs[i] for i in s) for s in _subtrees(tree, size))
            assert len(kept) == size and abs(sum(probs[i] for i in kept) - best) < 1e-12
