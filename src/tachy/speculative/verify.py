"""Verification of a draft tree against one target forward: which draft tokens to keep, and one extra token.

Vocabulary (as in vLLM's rejection sampler):

- **draft tokens**: the tree's tokens, proposed by a drafter. Row 0 of the verify output is the target's
  distribution after the root, row ``i + 1`` its distribution after node ``i`` (given the path to it).
- **accepted tokens**: the draft tokens on the path the verifier keeps, returned as node indices from the root's
  child downwards (the engine keeps those cache slots).
- **recovered token**: when every child of the last accepted node (or of the root) is rejected, a token drawn
  from the *residual* distribution left after the rejections; it replaces the rejected drafts.
- **bonus token**: when the walk reaches a node without children (a leaf, or the root of an empty tree), a token
  drawn from the target distribution at that node, for free.

Both functions return ``(accepted, bonus)`` where ``bonus`` is the recovered or bonus token, whichever applies:
each step commits ``len(accepted) + 1`` tokens, and the committed text is distributed exactly as if the target
had generated it token by token (greedy: identical to argmax decoding).

Sampling verification is recursive rejection sampling over siblings (SpecInfer / "multi-draft" speculative
sampling). At node ``cur`` with target distribution ``p`` and children ``c1..cm`` tried in tree order, child
``c_k`` carrying token ``x`` drawn from ``q_k`` is accepted with probability ``min(1, p_k(x) / q_k(x))``; on
rejection ``p_{k+1} = normalize(max(p_k - q_k, 0))``; if all are rejected the recovered token is drawn from
``p_{m+1}``. By the standard one-step argument, whatever happens in step k, the token that ends up chosen at
``cur`` is distributed as ``p_k`` provided ``q_k`` is the distribution ``x`` was drawn from *given the siblings
tried before it*. Hence:

- point-mass drafts (``draft_probs=None``; n-gram, lookup and other model-free drafters): ``q_k`` is a point mass,
  so accept with probability ``p_k(x)`` and the residual is ``p_k`` with ``x`` zeroed, renormalized. Any tokens
  (wrong ones, duplicates) are fine.
- a draft model (``draft_probs[i]`` = the distribution node ``i``'s token was sampled from): siblings must be
  sampled i.i.d. from the same ``q`` (give each the same row), or sequentially without replacement with
  ``draft_probs[i]`` the renormalized distribution actually used for that sibling. A sibling chosen greedily
  (top-k of ``q``) is *not* a sample of ``q``; pass it as a point mass (a one-hot row) instead.

All randomness comes from the given generator (one uniform per node, drawn up front, plus one draw for the bonus
token), so a seeded run is reproducible.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tachy import kernels
from tachy.speculative.tree import DraftTree


def _check_rows(tree: DraftTree, table: Tensor, name: str) -> None:
    if table.dim() != 2 or table.shape[0] != len(tree) + 1:
        raise ValueError(f"{name} must be [n+1, V] = [{len(tree) + 1}, V] for a tree of {len(tree)} nodes, "
                         f"got {list(table.shape)}")


def verify_greedy(tree: DraftTree, logits: Tensor) -> tuple[list[int], int]:
    """Accept the path along which every draft token is the target's argmax; bonus = argmax after it.

    One argmax over all rows and one device->host transfer; the walk itself is plain Python.
    """
    _check_rows(tree, logits, "logits")
    targets: list[int] = kernels.argmax(logits)
    accepted: list[int] = []
    cur = -1
    while True:
        child = tree.child_with_token(cur, targets[cur + 1])
        if child is None:
            return accepted, targets[cur + 1]
        accepted.append(child)
        cur = child


def _draw(weights: Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalized nonnegative ``weights [V]``, on the generator's device."""
    if generator is not None and weights.device != generator.device:
        weights = weights.to(generator.device)
    return int(torch.multinomial(weights, 1, generator=generator))


def verify_sampling(tree: DraftTree, probs: Tensor, generator: torch.Generator | None,
                    draft_probs: Tensor | None = None) -> tuple[list[int], int]:
    """Lossless speculative sampling over a draft tree (see the module docstring).

    probs: ``[n+1, V]`` target distributions (rows sum to 1, e.g. from ``make_probs_fn``) for ``[root] + tokens``.
    draft_probs: ``[n, V]``, row i = the distribution node i's token was drawn from; None = point-mass drafts.
    Returns (accepted node indices along the path, recovered-or-bonus token).
    """
    _check_rows(tree, probs, "probs")
    n = len(tree)
    if n == 0:
        return [], _draw(probs[0], generator)
    if draft_probs is not None and (draft_probs.dim() != 2 or draft_probs.shape[0] != n
                                    or draft_probs.shape[1] != probs.shape[1]):
        raise ValueError(f"draft_probs must be [n, V] = [{n}, {probs.shape[1]}], got {list(draft_probs.shape)}")

    # Everything the walk needs as scalars, in one transfer: p(token | parent) per node, q(token) per node,
    # and one uniform per node (each node's accept test uses its own).
    device = probs.device
    toks = torch.tensor(tree.tokens, dtype=torch.long, device=device)
    rows = torch.tensor(tree.parents, dtype=torch.long, device=device) + 1
    parts = [probs[rows, toks].float()]
    if draft_probs is not None:
        parts.append(draft_probs.to(device)[torch.arange(n, device=device), toks].float())
    gen_device = generator.device if generator is not None else device
    parts.append(torch.rand(n, generator=generator, device=gen_device).to(device))
    scalars = torch.cat(parts).tolist()
    p_tok, u = scalars[:n], scalars[-n:]

    if draft_probs is None:
        return _walk_point_mass(tree, probs, generator, p_tok, u)
    return _walk_draft_probs(tree, probs, draft_probs.to(device), generator, p_tok, scalars[n:2 * n], u)


def _walk_point_mass(tree: DraftTree, probs: Tensor, generator: torch.Generator | None,
                     p_tok: list[float], u: list[float]) -> tuple[list[int], int]:
    """Point-mass drafts: scalar bookkeeping only; the residual vector is built once, if all children fail."""
    accepted: list[int] = []
    cur = -1
    while True:
        kids = tree.children(cur)
        if not kids:  # leaf: bonus token from the target
            return accepted, _draw(probs[cur + 1], generator)
        rejected: list[int] = []  # distinct rejected tokens
        rejected_mass = 0.0
        chosen = None
        for child in kids:
            tok = tree.tokens[child]
            if tok in rejected:  # zero probability under the residual: rejected without a draw
                continue
            # accept with probability residual(tok) = p(tok) / (1 - mass already rejected)
            if u[child] * (1.0 - rejected_mass) < p_tok[child]:
                chosen = child
                break
            rejected.append(tok)
            rejected_mass += p_tok[child]
        if chosen is None:  # recovered token from the residual
            row = probs[cur + 1]
            residual = row.clone()
            residual[rejected] = 0
            # an all-zero residual only arises from rounding (the rejected tokens held all the mass)
            residual = torch.where(residual.sum() > 0, residual, row)
            return accepted, _draw(residual, generator)
        accepted.append(chosen)
        cur = chosen


def _walk_draft_probs(tree: DraftTree, probs: Tensor, draft_probs: Tensor, generator: torch.Generator | None,
                      p_tok: list[float], q_tok: list[float], u: list[float]) -> tuple[list[int], int]:
    """Drafts sampled from ``draft_probs``: the first child at a node needs only scalars; after a rejection the
    residual ``normalize(max(p - q, 0))`` is kept as a vector."""
    accepted: list[int] = []
    cur = -1
    while True:
        kids = tree.children(cur)
        if not kids:
            return accepted, _draw(probs[cur + 1], generator)
        residual: Tensor | None = None  # None = the target row itself
        chosen = None
        for child in kids:
            tok = tree.tokens[child]
            p_x = p_tok[child] if residual is None else float(residual[tok])
            if u[child] * q_tok[child] < p_x:  # u < p(x) / q(x)
                chosen = child
                break
            base = probs[cur + 1].float() if residual is None else residual
            new = (base - draft_probs[child].float()).clamp_(min=0.0)
            total = new.sum()
            # total == 0 means p == q up to rounding (acceptance was certain): keep p
            residual = torch.where(total > 0, new / total.clamp(min=1e-30), base)
        if chosen is None:
            return accepted, _draw(residual, generator)
        accepted.append(chosen)
        cur = chosen


def commit_exact(tree: DraftTree, accepted: list[int], bonus: int) -> tuple[list[int], int]:
    """Cut a verification result to what one-token decoding would provably have produced.

    Rows of spine nodes (``DraftTree.spine_length``) are bit-identical to one-token decoding; a side node's row
    is not. The walk is exact up to the first accepted side node: its token was chosen by an exact row (its
    parent's), so it is committed, as the new root (the returned token), and its cache slot and row are
    dropped. The cut depends only on the tree's shape, so sampled output keeps the target distribution.
    Returns ``(accepted spine nodes, next root token)``.
    """
    spine = tree.spine_length
    for k, node in enumerate(accepted):
        if node >= spine:
            return accepted[:k], tree.tokens[node]
    return accepted, bonus
