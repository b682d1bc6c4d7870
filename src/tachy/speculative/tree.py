"""DraftTree: the tokens a drafter proposes, as a tree hanging off the root (the last committed token).

Nodes are numbered 0..n-1 in the order given; ``parents[i] < i`` (-1 = child of the root), so every prefix
of the node list is itself a valid tree and index order is a topological order. The verify forward feeds
``[root] + tokens``: row/slot 0 is the root, row/slot ``i + 1`` is node ``i``.

A tree is immutable after construction; masks and lookups are computed once and cached (it is built every
decode step, n is small: up to ~64 nodes).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor


class DraftTree:
    """Draft tokens with parent links. ``DraftTree.chain(tokens)`` for a plain sequence,
    ``DraftTree.from_paths(paths)`` to merge several candidate continuations into a trie."""

    __slots__ = ("tokens", "parents", "probs", "depths", "_children", "_by_token", "_mask")

    def __init__(self, tokens: Sequence[int], parents: Sequence[int], probs: Sequence[float] | None = None):
        """probs: optionally, each node's estimated probability of being accepted once its parent is (the
        drafter's own calibration, see Drafter.acceptance): what ``best_for_cost`` ranks nodes by."""
        tokens = [int(t) for t in tokens]
        parents = [int(p) for p in parents]
        if len(tokens) != len(parents):
            raise ValueError(f"DraftTree: {len(tokens)} tokens but {len(parents)} parents")
        if probs is not None and len(probs) != len(tokens):
            raise ValueError(f"DraftTree: {len(tokens)} tokens but {len(probs)} probabilities")
        self.probs: list[float] | None = None if probs is None else [float(p) for p in probs]
        depths: list[int] = []
        children: list[list[int]] = [[] for _ in range(len(tokens) + 1)]
        for i, (tok, par) in enumerate(zip(tokens, parents)):
            if not -1 <= par < i:
                raise ValueError(f"DraftTree: parents[{i}] = {par}, must satisfy -1 <= parent < {i}")
            if tok < 0:
                raise ValueError(f"DraftTree: tokens[{i}] = {tok} is negative")
            depths.append(1 if par < 0 else depths[par] + 1)
            children[par + 1].append(i)
        self.tokens: list[int] = tokens
        self.parents: list[int] = parents
        self.depths: list[int] = depths  # root children have depth 1
        self._children: list[tuple[int, ...]] = [tuple(c) for c in children]  # index = node + 1
        self._by_token: list[dict[int, int]] | None = None
        self._mask: Tensor | None = None

    # ----------------------------------------------------------------------------------------- builders

    @classmethod
    def chain(cls, tokens: Sequence[int], probs: Sequence[float] | None = None) -> DraftTree:
        """A plain sequence: node i's parent is node i-1."""
        return cls(tokens, list(range(-1, len(tokens) - 1)), probs)

    @classmethod
    def empty(cls) -> DraftTree:
        """No draft: the verify forward is an ordinary one-token decode step."""
        return cls([], [])

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> DraftTree:
        """Merge candidate continuations into a trie: shared prefixes become one branch, siblings are unique.

        Nodes are numbered in first-seen order (path by path), so a drafter that lists its paths best first
        gets a tree whose ``truncate`` keeps its best candidates.
        """
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for path in paths:
            parent = -1
            for tok in path:
                tok = int(tok)
                node = index.get((parent, tok))
                if node is None:
                    node = len(tokens)
                    index[(parent, tok)] = node
                    tokens.append(tok)
                    parents.append(parent)
                parent = node
        return cls(tokens, parents)

    def truncate(self, max_nodes: int, breadth_first: bool = False) -> DraftTree:
        """Keep at most ``max_nodes`` nodes, always a prefix-closed subtree (every kept node's parent is kept).

        Default: the first ``max_nodes`` nodes in index order, i.e. the drafter's own priority order (valid
        because ``parents[i] < i``); node indices are unchanged. ``breadth_first=True`` keeps the shallowest
        nodes instead (ties by index), renumbered in that order.
        """
        if max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, got {max_nodes}")
        n = len(self.tokens)
        if max_nodes >= n:
            return self
        if not breadth_first:
            return self.subtree(list(range(max_nodes)))
        return self.subtree(sorted(range(n), key=lambda i: (self.depths[i], i))[:max_nodes])

    def subtree(self, keep: Sequence[int]) -> DraftTree:
        """The nodes ``keep`` (every kept node's parent kept too), renumbered in the given order (which must
        list parents before children); probabilities go with their nodes."""
        index = {old: new for new, old in enumerate(keep)}
        return DraftTree([self.tokens[i] for i in keep], [-1 if self.parents[i] < 0 else index[self.parents[i]]
                                                         for i in keep],
                         None if self.probs is None else [self.probs[i] for i in keep])

    def path_probs(self) -> list[float]:
        """Each node's probability of being accepted: the product of ``probs`` along its path."""
        if self.probs is None:
            raise ValueError("this draft tree carries no probabilities")
        out: list[float] = []
        for i, par in enumerate(self.parents):
            out.append(self.probs[i] * (1.0 if par < 0 else out[par]))
        return out

    def best_for_cost(self, costs: Sequence[float]) -> DraftTree:
        """The subtree that commits the most tokens per second, from the node probabilities and ``costs[T]``,
        the seconds of a target forward over T tokens (costs[1]: plain decoding, the no-draft option).

        OPT-Tree (Wang et al. 2024, https://arxiv.org/abs/2406.17276): the expected number of accepted tokens of
        a subtree is the sum of its nodes' path probabilities, so among subtrees of n nodes the n most probable
        nodes are best, and they form a subtree (a node is never more probable than its parent). Here n is
        chosen too, maximising (1 + expected accepted) / costs[n + 1]: n = 0 when no draft pays for its
        verification. Ties go to fewer nodes, then to lower node index.

        >>> t = DraftTree([5, 6, 7], [-1, 0, -1], probs=[0.9, 0.5, 0.3])   # path probs .9 .45 .3
        >>> t.best_for_cost([0, 1.0, 1.05, 1.1, 1.6]).tokens               # 1.9/1.05 < 2.35/1.1 > 2.65/1.6
        [5, 6]
        >>> len(t.best_for_cost([0, 1.0, 2.0, 3.0, 4.0]))                 # every draft costs more than it saves
        0
        """
        return self.subtree(self.best_nodes_for_cost(costs))

    def best_nodes_for_cost(self, costs: Sequence[float]) -> list[int]:
        """The node indices ``best_for_cost`` keeps, ascending."""
        n_max = min(len(self.tokens), len(costs) - 2)
        if self.probs is None:
            return list(range(len(self.tokens)))
        probs = self.path_probs()
        order = sorted(range(len(self.tokens)), key=lambda i: (-probs[i], self.depths[i], i))
        best_n, best_rate, expected = 0, 1.0 / costs[1], 1.0
        for n in range(1, n_max + 1):
            expected += probs[order[n - 1]]
            rate = expected / costs[n + 1]
            if rate > best_rate * (1 + 1e-9):
                best_n, best_rate = n, rate
        return sorted(order[:best_n])

    # ------------------------------------------------------------------------------------------ structure

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DraftTree):
            return NotImplemented
        return self.tokens == other.tokens and self.parents == other.parents

    def __repr__(self) -> str:
        return f"DraftTree(tokens={self.tokens}, parents={self.parents})"

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def children(self, i: int) -> tuple[int, ...]:
        """Node indices of node ``i``'s children in tree order (``i = -1`` for the root)."""
        return self._children[i + 1]

    def child_with_token(self, i: int, token: int) -> int | None:
        """The first child of node ``i`` (-1 = root) carrying ``token``, or None."""
        if self._by_token is None:
            by_token: list[dict[int, int]] = [{} for _ in range(len(self.tokens) + 1)]
            for node, (tok, par) in enumerate(zip(self.tokens, self.parents)):
                by_token[par + 1].setdefault(tok, node)
            self._by_token = by_token
        return self._by_token[i + 1].get(token)

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to node ``i`` (empty for ``i = -1``)."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def leaves(self) -> list[int]:
        return [i for i in range(len(self.tokens)) if not self._children[i + 1]]

    def paths(self) -> list[list[int]]:
        """The token sequence from the root to each leaf, in leaf index order.

        For a trie (e.g. one built by ``from_paths``), ``DraftTree.from_paths(t.paths())`` rebuilds ``t``'s
        shape (node numbering may differ).
        """
        return [[self.tokens[j] for j in self.path(leaf)] for leaf in self.leaves()]

    @property
    def spine_length(self) -> int:
        """Length of the leading chain: nodes 0..s-1 with ``parents[i] == i - 1``.

        Spine nodes sit at the cache slots plain decoding would give them (root + depth), so their verify rows
        are computed exactly as one-token decoding would compute them; see ``prune_to_spine``.
        """
        s = 0
        while s < len(self.parents) and self.parents[s] == s - 1:
            s += 1
        return s

    def prune_to_spine(self) -> DraftTree:
        """Keep the spine and the spine's other children (siblings of spine nodes), drop everything deeper.

        Why: a node off the spine attends over keys at scattered slots, so its row is not bit-identical to
        one-token decoding. Its token can still be committed (its parent's row chose it), but nothing below it
        can, so those nodes would only cost compute. Node order is kept (spine first, then side nodes).
        """
        s = self.spine_length
        keep = [i for i, par in enumerate(self.parents) if i < s or par < s]
        if len(keep) == len(self.tokens):
            return self
        return self.subtree(keep)

    # ------------------------------------------------------------------------------- verify-forward inputs

    def attention_mask(self, device: torch.device | str | None = None) -> Tensor:
        """BoolTensor ``[n+1, n+1]`` over ``[root] + tokens``: row = query, column = key, True where the key is
        the query itself or one of its ancestors (the root is everyone's ancestor). The engine places it as the
        last n+1 columns of the model mask; all committed slots are visible to every row."""
        if self._mask is None:
            n = len(self.tokens)
            if self.is_chain:
                mask = torch.ones(n + 1, n + 1, dtype=torch.bool).tril_()
            else:
                m = np.zeros((n + 1, n + 1), dtype=bool)
                m[0, 0] = True
                for i, par in enumerate(self.parents):
                    m[i + 1] = m[par + 1]
                    m[i + 1, i + 1] = True
                mask = torch.from_numpy(m)
            self._mask = mask
        return self._mask.to(device) if device is not None and torch.device(device).type != "cpu" \
            else self._mask.clone()

    def positions(self, root: int = 0) -> list[int]:
        """Model position of each verify row when the root sits at ``root`` (a node: root + its depth). A list:
        the decode loops build their forward's tensors from it every step."""
        return [root] + [root + d for d in self.depths]

    def position_offsets(self, device: torch.device | str | None = None) -> Tensor:
        """LongTensor ``[n+1]``: position of each verify row relative to the root (root 0, node = its depth).
        The model positions are ``cache.length + position_offsets()``."""
        return torch.tensor(self.positions(), dtype=torch.long, device=device)

    def row_contexts(self, prefix: Tensor | Sequence[int]) -> list[Tensor]:
        """Per verify row, the text it continues: ``prefix`` (committed ids, root last) for row 0, and
        ``prefix + tokens on the path to node i`` for row i+1. Feed it to the logits processor so penalties
        see each node's own context."""
        prefix = torch.as_tensor(prefix, dtype=torch.long).reshape(-1)
        toks = torch.tensor(self.tokens, dtype=torch.long, device=prefix.device)
        rows = [prefix]
        for i in range(len(self.tokens)):
            rows.append(torch.cat([prefix, toks[self.path(i)]]))
        return rows
