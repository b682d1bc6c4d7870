"""The Drafter base class: the protocol the engine calls, plus the incremental bookkeeping every drafter shares.

The engine drives a drafter like this (see docs/architecture.md, "Drafter protocol")::

    drafter.reset(prompt_ids)
    while generating:
        tree = drafter.propose(ids, max_tokens)        # ids: every committed token, root last
        ... one target forward over [root] + tree.tokens, verification ...
        drafter.update(ids, accepted, logits, tokens)  # ids has grown by accepted + 1

``ids`` grows by ``accepted + 1`` tokens per step, so a drafter must never rescan it: :class:`Drafter` keeps
its own copy (``self.history``) and hands only the newly committed tokens to the subclass hook
:meth:`Drafter._consume`. When ``ids`` does not extend the history (a new prompt without ``reset``, or a
rewound conversation) the drafter starts over from ``ids``.

A subclass implements up to four small hooks, all optional but ``_draft``:

* ``_restart()``: forget per-sequence state (``reset`` calls it, then feeds the prompt).
* ``_consume(start)``: ``self.history[start:]`` was just committed; index it.
* ``_draft(max_tokens) -> DraftTree``: propose from the current state (the result is truncated to
  ``max_tokens`` nodes by ``propose``, so a drafter may return more, best nodes first).
* ``_learn(accepted, logits, tokens)``: feedback from the verify forward (after ``_consume``).

Wrappers that delegate to other drafters (fallback, adaptive length) override ``reset/propose/update`` directly.
"""
from __future__ import annotations

import copy

from typing import ClassVar, Sequence

from torch import Tensor

from ...generation import COST_CONTEXT
from ..tree import DraftTree


def as_token_list(ids: Sequence[int] | Tensor) -> list[int]:
    """``ids`` as a plain list of Python ints (accepts lists, tuples, numpy arrays and 1-D tensors)."""
    if isinstance(ids, list):
        return ids
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:
        out = tolist()
        return out if isinstance(out, list) else [out]
    return [int(t) for t in ids]


def as_documents(corpus) -> list[list[int]]:
    """A corpus given as one token sequence or as several documents -> a list of documents (token lists).

    Accepts lists/tuples of ints, lists of such lists, numpy arrays and tensors (1-D: one document, 2-D: rows).

    >>> as_documents([1, 2, 3]), as_documents([[1, 2], (3,)]), as_documents([])
    ([[1, 2, 3]], [[1, 2], [3]], [])
    """
    ndim = getattr(corpus, "ndim", None)
    if ndim is not None:
        return [as_token_list(corpus)] if ndim == 1 else [as_token_list(row) for row in corpus]
    corpus = list(corpus)
    if not corpus:
        return []
    first = corpus[0]
    if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) >= 1:
        return [[int(t) for t in as_token_list(doc)] for doc in corpus]
    return [[int(t) for t in corpus]]


def overlap_copy(history: Sequence[int], start: int, n: int) -> list[int]:
    """``n`` tokens copied from ``history[start:]``, continuing the copy into its own output past the end.

    This is LZ77-style copying: when a match ends right before the present, the text since the match is
    assumed to repeat (a period of ``len(history) - start`` tokens).

    >>> overlap_copy([7, 1, 2, 1, 2], 3, 5)   # history[3:] = [1, 2], then the copy repeats itself
    [1, 2, 1, 2, 1]
    >>> overlap_copy([7, 1, 2], 1, 1)
    [1]
    """
    end = len(history)
    if start >= end or n <= 0:
        return []
    out = list(history[start:start + n])
    period = end - start
    while len(out) < n:  # only reached when the copy ran into the present
        out.append(out[len(out) - period])
    return out


SYNC_CHECK = 8  # trailing tokens compared by Drafter.sync to recognise a continuation of the history


class Acceptance:
    """How often a drafter's nodes are accepted once their parent is, learned online per key: the drafter
    gives each node a key of its features (match length, candidate rank, depth...) and a prior guess, and
    every verified step adds its evidence. ``prior_weight`` is the prior's worth in observations."""

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        self.counts: dict = {}   # key -> [accepted, offered]

    def estimate(self, key, prior: float) -> float:
        accepted, offered = self.counts.get(key, (0, 0))
        return (accepted + prior * self.prior_weight) / (offered + self.prior_weight)

    def record(self, tree: DraftTree, keys: Sequence, accepted_nodes: set[int]) -> None:
        """A verified ``tree``: every node whose parent was accepted (or that hangs off the root) was
        offered; ``accepted_nodes`` were accepted."""
        for i, par in enumerate(tree.parents):
            if par < 0 or par in accepted_nodes:
                counts = self.counts.setdefault(keys[i], [0, 0])
                counts[1] += 1
                counts[0] += i in accepted_nodes


def inner_drafters(drafter: "Drafter") -> list["Drafter"]:
    """The drafters a wrapper drafts with: its ``inner`` one or its list of ``drafters`` (the convention every
    wrapper follows)."""
    inner = getattr(drafter, "inner", None)
    return list(getattr(drafter, "drafters", ())) + ([inner] if isinstance(inner, Drafter) else [])


class Drafter:
    """Base class of all drafters (subclasses are usually dataclasses: fields = constructor options).

    ``name`` is the registry key and ``needs_logits`` tells the engine to pass the verify logits to
    :meth:`update`. Per-sequence state lives in attributes created by :meth:`_restart`; learned state that
    should survive new prompts (e.g. Token Recycling's adjacency matrix) is created lazily or in
    ``__post_init__`` and left alone by ``_restart``.
    """

    name: ClassVar[str] = "base"
    needs_logits: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False   # drafts with a model: propose needs check_target(engine) first

    # ------------------------------------------------------------------------------------- protocol

    costs: list[float] | None = None   # seconds of a target forward over T tokens, costs[T] (check_target)
    key_cost: float = 0.0              # seconds each cached token past COST_CONTEXT adds to each row (check_target)

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """Start a new sequence whose committed tokens so far are ``prompt_ids``."""
        self.history: list[int] = []
        self.last_tree: DraftTree = DraftTree.empty()
        self.last_keys: list | None = None
        self._restart()
        self.sync(prompt_ids)

    def propose(self, ids: Sequence[int], max_tokens: int) -> DraftTree:
        """A draft tree of at most ``max_tokens`` nodes continuing ``ids`` (all committed tokens, root last).

        A drafter that keys its nodes (``_node_keys``) gets each node's acceptance estimated from what was
        accepted before (``self.acceptance``), and, once it knows the target's forward costs, only the nodes
        that pay for their verification (``DraftTree.best_for_cost``; possibly none)."""
        self.sync(ids)
        tree, keys = DraftTree.empty(), None
        if max_tokens > 0 and self.history:
            tree = self._draft(max_tokens).truncate(max_tokens)
            keys = self._node_keys(tree) if len(tree) else None
            if keys is not None:
                table = self.__dict__.setdefault("acceptance", Acceptance())
                tree = DraftTree(tree.tokens, tree.parents, [table.estimate(k, self._prior(k)) for k in keys])
                if self.costs:
                    kept = tree.best_nodes_for_cost(self.costs_at(len(ids)))
                    tree, keys = tree.subtree(kept), [keys[i] for i in kept]
        self.last_tree, self.last_keys = tree, keys
        return tree

    def update(self, ids: Sequence[int], accepted: int, logits: Tensor | None = None,
               tokens: Sequence[int] | None = None) -> None:
        """Feedback after a verify step: ``ids`` are the committed tokens (bonus last), ``accepted`` the
        number of draft tokens accepted; ``logits [n+1, V]`` and ``tokens`` (``[root] + tree.tokens``) of the
        verify forward when ``needs_logits``."""
        if getattr(self, "last_keys", None) and self.proposed(tokens):
            path, node = set(), -1
            for tok in as_token_list(ids[len(ids) - accepted - 1:len(ids) - 1]):
                node = self.last_tree.child_with_token(node, int(tok))
                if node is None:
                    break
                path.add(node)
            self.acceptance.record(self.last_tree, self.last_keys, path)
        self.sync(ids)
        self._learn(accepted, logits, tokens)

    def fork(self) -> Drafter:
        """A drafter for another sequence decoded beside this one (a row of a batch): the same options, its own
        per-sequence state (which ``reset`` makes anew), and this one's learned state shared by reference
        (Token Recycling's table, the acceptance counts), so that rows learn from earlier requests and from
        each other as the lone path's one drafter per engine does. The rows of a batch use their drafters on
        one thread, one at a time. Wrappers keep their inner drafters in ``inner`` or ``drafters``: those
        are forked too."""
        self.__dict__.setdefault("acceptance", Acceptance())   # made lazily: make it shared before copying
        twin = copy.copy(self)
        if isinstance(getattr(self, "inner", None), Drafter):
            twin.inner = self.inner.fork()
        if isinstance(getattr(self, "drafters", None), list):
            twin.drafters = [d.fork() for d in self.drafters]
        return twin

    def check_target(self, target) -> None:
        """Called once by the engine that adopts this drafter (a draft model loads beside the target). The base
        class takes the target's forward costs, which ``propose`` weighs drafts against."""
        step_costs = getattr(target, "step_costs", None)
        self.costs = step_costs() if step_costs is not None else None
        key_cost = getattr(target, "key_cost", None)
        self.key_cost = key_cost() if key_cost is not None and self.costs else 0.0

    def costs_at(self, context: int) -> list[float]:
        """The target's forward costs with ``context`` cached tokens: ``costs`` (measured after COST_CONTEXT)
        plus ``key_cost`` per further token and row. At 8k tokens a verify forward's rows each read every key,
        so 8 rows cost ~7x one row where at 128 tokens they cost ~1.3x: drafts that paid there do not here."""
        extra = context - COST_CONTEXT
        if not self.key_cost or extra <= 0:
            return self.costs
        return [c + self.key_cost * extra * T for T, c in enumerate(self.costs)]

    def attach_cache(self, cache) -> None:
        """Called after prefill and ``reset`` with this sequence's target cache (a self-draft reads it)."""

    @property
    def model_s(self) -> float:
        """Seconds spent in draft-model forwards since ``reset`` (0 without a draft model): the engine reports
        them apart from the rest of the drafter's time, which is the drafting logic's own overhead."""
        return 0.0

    # ------------------------------------------------------------------------------ shared helpers

    def sync(self, ids: Sequence[int]) -> None:
        """Bring ``self.history`` up to ``ids``, feeding only the new tokens to :meth:`_consume`.

        ``ids`` is trusted to extend the history when it is at least as long and agrees with it on the first
        token and the last ``SYNC_CHECK`` known tokens (an O(1) check, so a step never rescans the context);
        otherwise the drafter restarts on ``ids`` as on a new prompt.
        """
        if not hasattr(self, "history"):
            self.reset(ids)
            return
        h = self.history
        n = len(h)
        if n and (len(ids) < n or int(ids[0]) != h[0]
                  or as_token_list(ids[max(0, n - SYNC_CHECK):n]) != h[-SYNC_CHECK:]):
            self.history = h = []
            self.last_tree = DraftTree.empty()
            self._restart()
            n = 0
        if len(ids) > n:
            h.extend(as_token_list(ids[n:]))
            self._consume(n)

    def proposed(self, tokens: Sequence[int] | None) -> bool:
        """True when ``tokens`` (the verify forward's ``[root] + tree.tokens``) is this drafter's last
        non-empty proposal, i.e. when ``accepted`` measures this drafter (inside a fallback or combination,
        another drafter's tree may have been verified)."""
        tree = getattr(self, "last_tree", None)
        if tokens is None or tree is None or not len(tree) or len(tokens) != len(tree) + 1:
            return False
        return as_token_list(tokens[1:]) == tree.tokens

    # ------------------------------------------------------------------------------- subclass hooks

    def _restart(self) -> None:
        """Forget per-sequence state (``self.history`` has just been emptied)."""

    def _consume(self, start: int) -> None:
        """``self.history[start:]`` are newly committed tokens."""

    def _draft(self, max_tokens: int) -> DraftTree:
        """Propose from the current state (``self.history`` is non-empty, root last)."""
        return DraftTree.empty()

    def _learn(self, accepted: int, logits: Tensor | None, tokens: Sequence[int] | None) -> None:
        """Verify feedback, called after the committed tokens were consumed."""

    def _node_keys(self, tree: DraftTree) -> list | None:
        """Optional: a hashable key per node of ``tree`` (the draft just made) naming what predicts its
        acceptance; drafters that give keys get calibrated node probabilities and cost-aware trimming."""
        return None

    def _prior(self, key) -> float:
        """The acceptance guessed for a key before any evidence."""
        return 0.5

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k, f in fields.items() if f.init and f.repr)
        return f"{type(self).__name__}({opts})"


class Wrapper(Drafter):
    """A drafter that drafts through another one, ``inner`` (set by the subclass): it decides how much is
    drafted or by which drafter, and hands the rest of the engine's calls on to ``inner`` (what the engine
    learns about the target, the cache a self-draft reads, its draft-model time). Subclasses override only
    what they change; ``Drafter.fork`` forks ``inner`` with them."""

    inner: Drafter

    @property
    def needs_logits(self) -> bool:   # type: ignore[override]
        return self.inner.needs_logits

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self.inner.reset(prompt_ids)

    def check_target(self, target) -> None:
        self.inner.check_target(target)

    def attach_cache(self, cache) -> None:
        self.inner.attach_cache(cache)

    @property
    def model_s(self) -> float:
        return self.inner.model_s

    def propose(self, ids: Sequence[int], max_tokens: int) -> DraftTree:
        self.last_tree = self.inner.propose(ids, max_tokens)
        return self.last_tree

    def update(self, ids: Sequence[int], accepted: int, logits: Tensor | None = None,
               tokens: Sequence[int] | None = None) -> None:
        self.inner.update(ids, accepted, logits, tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
