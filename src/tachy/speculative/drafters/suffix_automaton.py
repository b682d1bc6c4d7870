"""SAM-Decoding: draft the continuation of the longest suffix match, found with suffix automata.

Reference: Y. Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton" (2024),
https://arxiv.org/abs/2411.10666.

A suffix automaton (Blumer et al., 1985) over a token sequence recognizes exactly its substrings with at most
``2n`` states; it is built online, one token at a time in O(1) amortized. Two automata are used:

* a **dynamic** one over the prompt and the generated tokens, extended as tokens are committed. Extending it
  with token ``t`` already computes, for free, the longest suffix of the new text that occurred *earlier*
  (see :meth:`SuffixAutomaton.extend`), so the current match costs nothing extra;
* an optional **static** one over a corpus (``corpus_ids``), through which the text is walked with the
  classic matching transitions (follow suffix links on a mismatch), again O(1) amortized per token.

The draft is the text that followed an occurrence of the longer of the two matches (ties go to the dynamic
one: the context is more specific than a corpus), when that match is at least ``min_match_len`` long.

Which occurrence: every state records the end position of one occurrence of its strings (``end``). The
dynamic automaton refreshes it with recency in mind: while the match keeps extending along the occurrence it
follows, that occurrence is kept; the state the text was matched in at the previous position is stamped with
that position, so a later match in the same state continues from the most recent occurrence. (The paper keeps
the earliest end position; the most recent one suits the local repetition typical of generation.) A
continuation that runs into the present repeats itself (:func:`~tachy.speculative.drafters.base.overlap_copy`).

Example: after ``[1, 2, 3, 9, 1, 2]`` the longest earlier suffix is ``[1, 2]`` (ending at position 1), so
the draft is ``[3, 9, 1, 2]`` and then, running into the present, ``3, 9, ...`` again:

>>> SuffixAutomatonDrafter().propose([1, 2, 3, 9, 1, 2], max_tokens=5).tokens
[3, 9, 1, 2, 3]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..tree import DraftTree
from .base import Drafter, as_documents, overlap_copy


class SuffixAutomaton:
    """Online suffix automaton over int tokens (states are ints, 0 = the empty string).

    ``next[s]`` (token -> state), ``link[s]`` (suffix link), ``length[s]`` (longest string of the state) and
    ``end[s]`` (the end position, as an index into ``tokens``, of one occurrence of the state's strings).

    >>> sam = SuffixAutomaton([1, 2, 1])
    >>> sam.extend(2)          # text [1, 2, 1, 2]: the suffix [1, 2] occurred before, ending at position 1
    (2, 2)
    >>> sam.end[2], sam.contains([2, 1, 2]), sam.contains([2, 2])
    (1, True, False)
    """

    __slots__ = ("next", "link", "length", "end", "last", "tokens")

    def __init__(self, tokens: Iterable[int] = ()):
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.end: list[int] = [-1]
        self.last = 0
        self.tokens: list[int] = []
        for t in tokens:
            self.extend(t)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_states(self) -> int:
        return len(self.length)

    def extend(self, token: int) -> tuple[int, int]:
        """Append ``token``; return ``(state, length)`` of the longest suffix of the new text that also
        occurs ending earlier (``(0, 0)`` if ``token`` is new). ``end[state]`` is such an earlier end.

        This is the standard construction: the suffix-link walk from the previous ``last`` stops at the first
        state ``p`` with a ``token`` transition, whose longest string ``+ token`` is exactly that match.
        """
        nxt, link, length, end = self.next, self.link, self.length, self.end
        pos = len(self.tokens)
        self.tokens.append(token)
        cur = len(length)
        nxt.append({})
        link.append(0)
        length.append(length[self.last] + 1)
        end.append(pos)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        self.last = cur
        if p == -1:
            return 0, 0
        q = nxt[p][token]
        if length[p] + 1 == length[q]:
            link[cur] = q
            return q, length[q]
        clone = len(length)  # split q: the clone takes q's strings of length <= length[p] + 1
        nxt.append(dict(nxt[q]))
        link.append(link[q])
        length.append(length[p] + 1)
        end.append(end[q])
        while p != -1 and nxt[p].get(token) == q:
            nxt[p][token] = clone
            p = link[p]
        link[q] = link[cur] = clone
        return clone, length[clone]

    def step(self, state: int, length: int, token: int) -> tuple[int, int]:
        """Matching transition: from the match ``(state, length)`` of some text, the match of text + token
        (the longest suffix of it that is a substring of this automaton's tokens)."""
        nxt, link = self.next, self.link
        while state and token not in nxt[state]:
            state = link[state]
            length = self.length[state]
        state = nxt[state].get(token, -1)
        return (0, 0) if state < 0 else (state, length + 1)

    def contains(self, pattern: Sequence[int]) -> bool:
        """Whether ``pattern`` is a substring of the tokens."""
        state = 0
        for t in pattern:
            state = self.next[state].get(t, -1)
            if state < 0:
                return False
        return True


def longest_previous_matches(tokens: Sequence[int]) -> list[tuple[int, int]]:
    """For each position ``i``: ``(length, end)`` of the longest suffix of ``tokens[:i + 1]`` that also occurs
    ending at some ``end < i`` (``(0, -1)`` if none), computed online with a :class:`SuffixAutomaton`.

    >>> longest_previous_matches([1, 2, 1, 2, 3])
    [(0, -1), (0, -1), (1, 0), (2, 1), (0, -1)]
    """
    sam = SuffixAutomaton()
    out = []
    for t in tokens:
        state, length = sam.extend(int(t))
        out.append((length, sam.end[state] if length else -1))
    return out


class DraftMatch:
    """The longest match in the context of the context's text followed by a draft still being built, walked one
    draft token at a time (O(1) amortized each), and what followed that match in the context.

    A draft model checks this guessed continuation in one forward instead of decoding it token by token
    (:class:`~tachy.speculative.drafters.draft_model.DraftModelDrafter`, ``guess_len``)."""

    __slots__ = ("sam", "state", "length", "end")

    def __init__(self, drafter: "SuffixAutomatonDrafter"):
        self.sam = drafter.sam
        self.state, self.length, self.end = drafter.match_state, drafter.match_len, drafter.match_end

    def push(self, token: int) -> None:
        tokens, length = self.sam.tokens, self.length
        self.state, self.length = self.sam.step(self.state, length, token)
        if self.length == length + 1 and 0 <= self.end < len(tokens) - 1 and tokens[self.end + 1] == token:
            self.end += 1         # the occurrence followed so far goes on (the most recent one, see _consume)
        else:
            self.end = self.sam.end[self.state] if self.length else -1

    def continuation(self, max_tokens: int, min_match_len: int) -> list[int]:
        """Up to ``max_tokens`` tokens that followed the match in the context; none for a shorter match."""
        if self.length < min_match_len:
            return []
        return self.sam.tokens[self.end + 1:self.end + 1 + max_tokens]


@dataclass(repr=False)
class SuffixAutomatonDrafter(Drafter):
    """SAM-Decoding drafter: a chain copied after the longest suffix match (context first, then corpus).

    Args:
        min_match_len: no draft when the longest match is shorter (1 drafts after any repeated token).
        corpus_ids: optional corpus for the static automaton (a token list, or a list of documents, which are
            never matched across). Built once in the constructor, about 2 states and a few microseconds per
            token in Python: meant for up to a few million tokens (use ``rest`` for larger corpora).
    """

    min_match_len: int = 1
    corpus_ids: Sequence[int] | Sequence[Sequence[int]] | None = None

    name = "sam"

    def __post_init__(self) -> None:
        if self.min_match_len < 1:
            raise ValueError(f"min_match_len must be >= 1, got {self.min_match_len}")
        self.static: SuffixAutomaton | None = None
        if self.corpus_ids is not None:
            self.static = SuffixAutomaton()
            for i, doc in enumerate(as_documents(self.corpus_ids)):
                if i:
                    self.static.extend(-1)  # separator: never matched (tokens are >= 0)
                for t in doc:
                    self.static.extend(t)
            self.corpus_ids = None  # the automaton keeps its own copy

    def _restart(self) -> None:
        self.sam = SuffixAutomaton()
        self.match_state, self.match_len, self.match_end = 0, 0, -1  # dynamic match: state, length, end pos
        self.static_state, self.static_len = 0, 0

    def _consume(self, start: int) -> None:
        sam, h = self.sam, self.history
        ends = sam.end
        state, length, end = self.match_state, self.match_len, self.match_end
        for pos in range(start, len(h)):
            t = h[pos]
            if length:
                ends[state] = pos - 1  # the match ended at pos - 1: the latest occurrence for a later match
            state, new_length = sam.extend(t)
            if not new_length:
                end = -1
            elif new_length == length + 1 and 0 <= end < pos - 1 and h[end + 1] == t:
                end += 1  # the occurrence we were following goes on
            else:
                end = ends[state]
            length = new_length
        self.match_state, self.match_len, self.match_end = state, length, end
        if self.static is not None:
            s_state, s_len, step = self.static_state, self.static_len, self.static.step
            for pos in range(start, len(h)):
                s_state, s_len = step(s_state, s_len, h[pos])
            self.static_state, self.static_len = s_state, s_len

    def _draft(self, max_tokens: int) -> DraftTree:
        if self.match_len >= max(self.min_match_len, self.static_len):
            self._source = ("context", self.match_len)
            return DraftTree.chain(overlap_copy(self.history, self.match_end + 1, max_tokens))
        if self.static is not None and self.static_len >= self.min_match_len:
            self._source = ("corpus", self.static_len)
            corpus = self.static.tokens
            start = self.static.end[self.static_state] + 1
            cont = corpus[start:start + max_tokens]
            if -1 in cont:
                cont = cont[:cont.index(-1)]
            return DraftTree.chain(cont)
        return DraftTree.empty()

    def _node_keys(self, tree: DraftTree) -> list:
        """A copied token's acceptance once the one before it was accepted depends on how long a match the copy
        continues (longer: likelier a real copy); one rate per match length serves every depth, so what short
        accepted copies teach carries to longer ones."""
        source, length = self._source
        bucket = length if length <= 4 else 6 if length <= 8 else 12 if length <= 16 else 24
        return [(source, bucket)] * len(tree)

    def _prior(self, key) -> float:
        return min(0.9, 0.3 + 0.05 * key[1])
