"""Token Recycling: reuse the target's own top-k predictions, from every verify row, as future drafts.

Reference: X. Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with
Token Recycling" (2024), https://arxiv.org/abs/2408.08696.

Every verify forward computes, for each fed token ``tokens[j]`` (the root and every draft node), the target's
distribution over the token that follows it (``logits[j]``). Most of these rows are thrown away (rejected
branches); Token Recycling keeps their top-k ids in an adjacency matrix ``adjacency[token] -> k candidate
next tokens`` (latest row wins) and drafts by expanding a static tree template from the root token: a node
with token ``t`` at template rank ``r`` under its parent gets token ``adjacency[parent_token][r]``.

The template (:func:`make_template`) is the best ``num_nodes`` rank paths under a prior acceptance
probability per rank (``rank_probs``), numbered best first, so truncating it to the step's node budget keeps
the most promising nodes: a deep top-1 chain with shorter side branches, like the paper's hand-tuned tree.
Tokens never seen as a verify input have no adjacency row: their subtree is dropped.

The matrix is learned state, kept across prompts (``reset`` does not clear it; ``clear()`` does), like the
paper's hot start. Update cost: one ``topk`` over the verify logits and one scatter into the matrix.

Example: after a verify of ``tokens=[5, 7]`` whose logits rank ``[7, 2, ...]`` after 5 and ``[9, 3, ...]``
after 7, a root ``5`` drafts ``7`` then ``9`` (top-1 chain) with ``2`` and ``3`` as side branches.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ... import kernels
from ..tree import DraftTree
from .base import Drafter, as_token_list

DEFAULT_RANK_PROBS = (0.5, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)


def make_template(num_nodes: int, rank_probs: Sequence[float] = DEFAULT_RANK_PROBS,
                  max_depth: int = 12) -> tuple[list[int], list[int]]:
    """A static draft-tree template: ``(parents, ranks)`` of its nodes, best first.

    A node is a path of child ranks from the root; its prior score is the product of ``rank_probs[r]`` along
    the path (each in (0, 1), so a node scores below its parent and ``parents[i] < i``). The ``num_nodes``
    best nodes (ties: first discovered) of depth at most ``max_depth`` are returned in score order.

    >>> make_template(4, rank_probs=(0.6, 0.3))   # (0) .36=(0,0) .3=(1) .216=(0,0,0)
    ([-1, 0, -1, 1], [0, 0, 1, 0])
    """
    if any(not 0.0 < p < 1.0 for p in rank_probs):
        raise ValueError(f"rank_probs must lie in (0, 1), got {list(rank_probs)}")
    parents: list[int] = []
    ranks: list[int] = []
    counter = 0
    heap: list[tuple[float, int, int, int, int]] = []  # (-score, discovery order, parent, rank, depth)
    for r, p in enumerate(rank_probs):
        heap.append((-p, counter, -1, r, 1))
        counter += 1
    heapq.heapify(heap)
    while heap and len(parents) < num_nodes:
        neg_score, _, parent, rank, depth = heapq.heappop(heap)
        node = len(parents)
        parents.append(parent)
        ranks.append(rank)
        if depth < max_depth:
            for r, p in enumerate(rank_probs):
                heapq.heappush(heap, (neg_score * p, counter, node, r, depth + 1))
                counter += 1
    return parents, ranks


def expand_template(adjacency: np.ndarray, root: int, parents: Sequence[int], ranks: Sequence[int],
                    return_kept: bool = False):
    """Fill a template from ``root``: node ``i`` gets ``adjacency[token of parents[i]][ranks[i]]``.

    ``adjacency`` is ``[V + 1, k]`` with ``-1`` for unknown entries and a last row of ``-1`` (so that a
    ``-1`` parent token indexes it). Nodes whose token is unknown are dropped with their subtrees, the rest
    renumbered in template order. Returns the DraftTree, and with ``return_kept`` also the template index of
    each of its nodes. A plain loop over the nodes (``parents[i] < i``, so a parent is filled before its
    children): a step's template has at most a few dozen nodes, where numpy's per-call cost dominated (42 vs
    12 us for 16 nodes).
    """
    unknown = adjacency.shape[0] - 1
    toks = [root if 0 <= root < unknown else -1]      # slot 0 = root, slot i + 1 = node i
    new_index: list[int] = []                          # node i's index in the tree, -1 if dropped
    kept: list[int] = []
    tokens: list[int] = []
    tree_parents: list[int] = []
    for i, (parent, rank) in enumerate(zip(parents, ranks)):
        token = int(adjacency[toks[parent + 1], rank])   # an unknown parent (-1) reads the row of -1
        toks.append(token)
        if token < 0:
            new_index.append(-1)
            continue
        new_index.append(len(kept))
        tree_parents.append(-1 if parent < 0 else new_index[parent])
        kept.append(i)
        tokens.append(token)
    tree = DraftTree(tokens, tree_parents) if kept else DraftTree.empty()
    return (tree, np.asarray(kept, dtype=np.int64)) if return_kept else tree


@dataclass(repr=False)
class TokenRecyclingDrafter(Drafter):
    """Token Recycling: adjacency matrix of top-k next tokens, fed by every verify row.

    Args:
        k: candidates stored per token (the widest branching the template may use).
        num_nodes: size of the static template (the step's ``max_tokens`` truncates it further).
        rank_probs: prior acceptance probability of a candidate by rank, shapes the template
            (its length caps the branching; at most ``k``).
        max_depth: deepest template level.
        vocab_size: allocate the matrix up front; otherwise it is sized by the first logits seen.
    """

    k: int = 8
    num_nodes: int = 48
    rank_probs: Sequence[float] = DEFAULT_RANK_PROBS
    max_depth: int = 12
    vocab_size: int | None = None

    name = "recycling"
    needs_logits = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        probs = tuple(self.rank_probs)[:self.k]
        parents, ranks = make_template(self.num_nodes, probs, self.max_depth)
        self._parents, self._ranks = parents, ranks
        self._table: list[np.ndarray | None] = [None]   # the adjacency matrix, in a box its forks share
        if self.vocab_size is not None:
            self._allocate(self.vocab_size)

    @property
    def adjacency(self) -> np.ndarray | None:
        """[vocab + 1, k] int32: each token's top-k successors from the last verify logits that had it."""
        return self._table[0]

    @adjacency.setter
    def adjacency(self, table: np.ndarray | None) -> None:
        self._table[0] = table

    def clear(self) -> None:
        """Forget everything learned (the adjacency matrix)."""
        if self.adjacency is not None:
            self.adjacency.fill(-1)

    def _allocate(self, vocab_size: int) -> None:
        adj = np.full((vocab_size + 1, self.k), -1, dtype=np.int32)  # last row: the "unknown token" row
        if self.adjacency is not None:
            rows = min(vocab_size, self.adjacency.shape[0] - 1)
            adj[:rows] = self.adjacency[:rows]
        self.adjacency = adj

    def _draft(self, max_tokens: int) -> DraftTree:
        if self.adjacency is None or not len(self._parents):
            return DraftTree.empty()
        n = min(max_tokens, len(self._parents))
        tree, self._filled = expand_template(self.adjacency, self.history[-1], self._parents[:n], self._ranks[:n],
                                             return_kept=True)
        return tree

    def _node_keys(self, tree: DraftTree) -> list:
        """A node's acceptance once its parent is accepted depends mostly on its candidate rank."""
        return [("rank", int(self._ranks[i])) for i in self._filled[:len(tree)]]

    def _prior(self, key) -> float:
        probs = tuple(self.rank_probs)
        return probs[key[1]] if key[1] < len(probs) else probs[-1]

    def _learn(self, accepted: int, logits: Tensor | None, tokens: Sequence[int] | None) -> None:
        if logits is None or tokens is None:
            return
        logits = logits.reshape(-1, logits.shape[-1])
        vocab = logits.shape[-1]
        if self.adjacency is None or self.adjacency.shape[0] - 1 < vocab:
            self._allocate(vocab)
        k = min(self.k, vocab)
        top = kernels.topk_ids(logits, k).to(device="cpu", dtype=torch.int32).numpy()
        rows = np.asarray(as_token_list(tokens), dtype=np.int64)[:len(top)]
        ok = (rows >= 0) & (rows < self.adjacency.shape[0] - 1)
        self.adjacency[rows[ok], :k] = top[:len(rows)][ok]  # repeated tokens: the last row wins
