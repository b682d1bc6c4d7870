"""Prompt lookup decoding (PLD): draft by copying what followed an earlier occurrence of the last n tokens.

Reference: A. Saxena, "Prompt Lookup Decoding" (2023), https://github.com/apoorvumang/prompt-lookup-decoding,
also known as n-gram speculation (vLLM ``ngram``, transformers ``prompt_lookup_num_tokens``).

The suffix n-gram of the context (the last ``n`` tokens, ``n`` from ``max_ngram`` down to ``min_ngram``) is
looked up among its earlier occurrences; the tokens that followed the most recent occurrence are the draft.
Longer n-grams are tried first (more specific), and among equal n the most recent occurrence wins (local
repetition is the common case: code edits, lists, quoted text, loops).

Unlike a rescan, :class:`PromptLookupDrafter` keeps, per n, an index ``n-gram -> latest end position`` and a
chain from each occurrence to the previous one; it grows by ``max_ngram - min_ngram + 1`` dict updates per
committed token, so a step costs O(1) in the context length. :func:`find_ngram_continuations` is the
same rule as a pure function over a whole context (the test oracle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..tree import DraftTree
from .base import Drafter, overlap_copy


def find_ngram_continuations(context: Sequence[int], max_len: int, max_ngram: int = 4, min_ngram: int = 1,
                             max_matches: int = 1) -> list[list[int]]:
    """Continuations of earlier occurrences of the context's suffix n-grams, best first.

    For ``n = max_ngram .. min_ngram`` (longest first), the ``max_matches`` most recent earlier occurrences
    of ``context[-n:]`` (occurrences ending before the last token) each give the ``max_len`` tokens that
    followed them; a continuation that runs into the present keeps copying its own output
    (:func:`~tachy.speculative.drafters.base.overlap_copy`), so a repeating loop is drafted as repeating.
    Continuations starting at an already used position, or equal to an earlier one, are skipped; at most
    ``max_matches`` are returned.

    Worked example: in ``context = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2]`` the suffix 3-gram ``[5, 1, 2]`` never
    occurred before; the 2-gram ``[1, 2]`` occurred at 4 (followed by 3, 5, 1) and at 0 (followed by 3, 4, 1).
    With ``max_matches=3``, n = 1 adds nothing: the earlier 2s, at 5 and 1, are followed by positions 6 and
    2, already used. In ``[5, 6, 5, 6]`` the match ``[5, 6]`` at 0 runs into the present: the copy repeats.

    >>> context = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2]
    >>> find_ngram_continuations(context, max_len=3, max_ngram=3)
    [[3, 5, 1]]
    >>> find_ngram_continuations(context, max_len=3, max_ngram=3, max_matches=3)
    [[3, 5, 1], [3, 4, 1]]
    >>> find_ngram_continuations([5, 6, 5, 6], max_len=5)
    [[5, 6, 5, 6, 5]]
    """
    n_ctx = len(context)
    out: list[list[int]] = []
    used_starts: set[int] = set()
    seen: set[tuple[int, ...]] = set()
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = list(context[n_ctx - n:])
        found = 0
        for s in range(n_ctx - n - 1, -1, -1):  # occurrences ending before the last token, latest first
            if list(context[s:s + n]) != suffix:
                continue
            found += 1
            start = s + n
            if start not in used_starts:
                used_starts.add(start)
                cont = overlap_copy(context, start, max_len)
                if tuple(cont) not in seen:
                    seen.add(tuple(cont))
                    out.append(cont)
                    if len(out) >= max_matches:
                        return out
            if found >= max_matches:
                break
    return out


@dataclass(repr=False)
class PromptLookupDrafter(Drafter):
    """PLD with an incremental n-gram index.

    Args:
        max_ngram: longest suffix n-gram looked up (tried first).
        min_ngram: shortest n-gram; no draft when not even this one occurred before.
        max_matches: number of distinct continuations; 1 gives a chain, more give a tree (merged as a trie,
            shallow nodes kept first when over the budget, so each candidate gets some depth).

    Example: after ``[1, 2, 3, 4, 1, 2]`` the 2-gram ``[1, 2]`` occurred at position 0:

    >>> PromptLookupDrafter().propose([1, 2, 3, 4, 1, 2], max_tokens=3)
    DraftTree(tokens=[3, 4, 1], parents=[-1, 0, 1])
    """

    max_ngram: int = 4
    min_ngram: int = 1
    max_matches: int = 1

    name = "pld"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {self.max_matches}")

    def _restart(self) -> None:
        # Per n: latest[n-gram] = end position of its latest occurrence, and prev[p] = end position of the
        # previous occurrence of the n-gram ending at p (-1: none), a chain through all occurrences, latest
        # first. Plain ints: no per-key containers to allocate (or for the garbage collector to scan).
        k = self.max_ngram - self.min_ngram + 1
        self._latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(k)]
        self._prev: list[list[int]] = [[] for _ in range(k)]

    def _consume(self, start: int) -> None:
        h = self.history
        for i, n in enumerate(range(self.min_ngram, self.max_ngram + 1)):
            latest, prev = self._latest[i], self._prev[i]
            for p in range(start, len(h)):
                if p + 1 < n:
                    prev.append(-1)
                    continue
                key = tuple(h[p - n + 1:p + 1])
                prev.append(latest.get(key, -1))
                latest[key] = p

    def _draft(self, max_tokens: int) -> DraftTree:
        h = self.history
        end = len(h)
        out: list[list[int]] = []
        used_starts: set[int] = set()
        seen: set[tuple[int, ...]] = set()
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            prev = self._prev[n - self.min_ngram]
            p = prev[end - 1]  # the suffix n-gram ends at end - 1: its previous occurrences
            found = 0
            while p >= 0 and found < self.max_matches:
                found += 1
                if p + 1 not in used_starts:
                    used_starts.add(p + 1)
                    cont = overlap_copy(h, p + 1, max_tokens)
                    if tuple(cont) not in seen:
                        seen.add(tuple(cont))
                        out.append(cont)
                        if len(out) >= self.max_matches:
                            return self._tree(out, max_tokens)
                p = prev[p]
        return self._tree(out, max_tokens)

    @staticmethod
    def _tree(paths: list[list[int]], max_tokens: int) -> DraftTree:
        if len(paths) == 1:
            return DraftTree.chain(paths[0])
        return DraftTree.from_paths(paths).truncate(max_tokens, breadth_first=True)
