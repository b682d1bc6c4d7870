"""REST: retrieval-based drafts from a datastore of tokenized text, indexed by a suffix array.

Reference: Z. He et al., "REST: Retrieval-Based Speculative Decoding" (NAACL 2024),
https://arxiv.org/abs/2311.08252.

:class:`Datastore` holds a token corpus (documents joined by a ``-1`` separator, which no query contains, so
matches and continuations never cross documents) and its suffix array, the corpus positions sorted by the
tokens that follow them. Only the first ``depth`` tokens of each suffix are sorted on (ties by position),
which is all a lookup of at most ``depth`` tokens needs, so the array is built by ``log2(depth)`` rounds of
prefix doubling, each one vectorized numpy sort: about a second for a million tokens.

A lookup (:meth:`Datastore.lookup`) finds the longest suffix of the context, ``max_query_len`` down to
``min_query_len`` tokens, that occurs in the corpus (binary search on the length, since a suffix of an
occurring string occurs too; binary search in the suffix array for each length), then reads the tokens
that followed up to ``max_candidates`` of its occurrences (spread evenly over the matching range).
:func:`frequency_tree` merges those continuations into a trie and keeps the most frequent nodes, which is
REST's draft.

Example: with the documents ``[1, 2, 3, 4, 6]``, ``[1, 2, 3, 5]`` and ``[2, 3, 4, 7]``, a context ending in
``[9, 2, 3]`` has the longest match ``[2, 3]``, three times, followed by ``[4, 6]``, ``[5]`` and ``[4, 7]``: the
draft has ``4`` (in 2 continuations) and ``5`` under the root, ``6`` and ``7`` under ``4``.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from ...errors import InvalidArgumentError, TachyError
from ..tree import DraftTree
from .base import Drafter, as_documents

SEPARATOR = -1


def build_suffix_array(tokens: np.ndarray, depth: int = 32) -> np.ndarray:
    """Positions ``0..n-1`` sorted by their first ``depth`` tokens (a suffix running out of tokens sorts
    before its extensions). Prefix doubling actually sorts on the first ``d`` tokens, ``d`` the power of two
    ``>= depth`` (or until all suffixes differ), then by position.

    >>> build_suffix_array(np.array([2, 1, 2, 1]), depth=4).tolist()   # 1 | 1 2 1 | 2 1 | 2 1 2 1
    [3, 1, 2, 0]
    """
    tokens = np.asarray(tokens)
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, rank = np.unique(tokens, return_inverse=True)
    rank = rank.astype(np.int64).reshape(-1) + 1  # 0 is reserved for "past the end"
    sa = np.argsort(rank, kind="stable")
    k = 1
    while k < depth and int(rank.max()) < n:
        second = np.zeros(n, dtype=np.int64)
        second[:n - k] = rank[k:]
        key = rank * (n + 1) + second  # (rank of the first k tokens, rank of the next k tokens)
        sa = np.argsort(key, kind="stable")
        sorted_key = key[sa]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[sa] = np.concatenate(([1], 1 + np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        rank = new_rank
        k *= 2
    return sa.astype(np.int64)


def frequency_tree(continuations: Iterable[Sequence[int]], max_nodes: int) -> DraftTree:
    """Merge continuations into a trie and keep the ``max_nodes`` nodes that most continuations pass through
    (ties: shallower first, then first seen), numbered in that order (parents come first).

    >>> frequency_tree([[4, 1], [5], [4, 7], [4, 1]], max_nodes=3)   # counts 4:3, 4>1:2, 5:1, 4>7:1
    DraftTree(tokens=[4, 1, 5], parents=[-1, 0, -1])
    """
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    counts: list[int] = []
    depths: list[int] = []
    for cont in continuations:
        parent = -1
        for tok in cont:
            node = index.get((parent, tok))
            if node is None:
                node = index[(parent, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
                counts.append(0)
                depths.append(1 if parent < 0 else depths[parent] + 1)
            counts[node] += 1
            parent = node
    keep = sorted(range(len(tokens)), key=lambda i: (-counts[i], depths[i], i))[:max(max_nodes, 0)]
    new_index = {old: new for new, old in enumerate(keep)}
    return DraftTree([tokens[i] for i in keep], [-1 if parents[i] < 0 else new_index[parents[i]] for i in keep])


class Datastore:
    """A token corpus and its (depth-limited) suffix array; build, save/load (npz) and look up.

    >>> ds = Datastore.build([[1, 2, 3, 4], [1, 2, 3, 5]])
    >>> ds.lookup([9, 2, 3], max_depth=2)   # longest match [2, 3], continuations of its two occurrences
    (2, [[4], [5]])
    """

    def __init__(self, tokens: np.ndarray, suffix_array: np.ndarray, depth: int):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.suffix_array = np.asarray(suffix_array, dtype=np.int64)
        self.depth = int(depth)
        if len(self.tokens) != len(self.suffix_array):
            raise InvalidArgumentError("datastore: tokens and suffix array differ in length")
        self._tok_list: list[int] | None = None  # Python lists: fast slicing/comparison in binary searches
        self._sa_list: list[int] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Datastore({len(self)} tokens, depth={self.depth})"

    @classmethod
    def build(cls, token_ids: Sequence[int] | Sequence[Sequence[int]], depth: int = 32) -> Datastore:
        """From one token list, or a list of documents (joined with a separator no lookup matches across)."""
        if getattr(token_ids, "ndim", None) == 1:  # one flat array: no per-token conversion
            tokens = np.asarray(token_ids.tolist() if hasattr(token_ids, "numpy") else token_ids, dtype=np.int64)
        else:
            parts: list[np.ndarray] = []
            for doc in as_documents(token_ids):
                if parts:
                    parts.append(np.array([SEPARATOR], dtype=np.int64))
                parts.append(np.asarray(doc, dtype=np.int64).reshape(-1))
            tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if len(tokens) and int(tokens.min()) < SEPARATOR:
            raise InvalidArgumentError("datastore: token ids must be >= 0")
        return cls(tokens, build_suffix_array(tokens, depth), depth)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` file at exactly ``path``."""
        small = len(self.tokens) < 2**31 - 1
        with open(path, "wb") as f:
            np.savez(f, tokens=self.tokens.astype(np.int32 if small else np.int64),
                     suffix_array=self.suffix_array.astype(np.int32 if small else np.int64),
                     depth=np.array(self.depth), version=np.array(1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Datastore:
        try:
            with np.load(path) as data:
                return cls(data["tokens"], data["suffix_array"], int(data["depth"]))
        except FileNotFoundError:
            raise TachyError(f"datastore file not found: {path}") from None
        except (KeyError, ValueError, OSError) as e:
            raise TachyError(f"not a tachy datastore file: {path} ({e})") from None

    # ------------------------------------------------------------------------------------------ lookup

    def _lists(self) -> tuple[list[int], list[int]]:
        if self._tok_list is None:
            self._tok_list = self.tokens.tolist()
            self._sa_list = self.suffix_array.tolist()
        return self._tok_list, self._sa_list  # type: ignore[return-value]

    def find(self, query: Sequence[int]) -> tuple[int, int]:
        """``[lo, hi)``: the suffix-array range of the positions where ``query`` occurs (``len(query)`` must
        not exceed ``depth``)."""
        query = list(query)
        L = len(query)
        if L > self.depth:
            raise InvalidArgumentError(f"query of {L} tokens is longer than the datastore depth {self.depth}")
        toks, sa = self._lists()
        key = lambda s: toks[s:s + L]  # noqa: E731
        lo = bisect.bisect_left(sa, query, key=key)
        if lo == len(sa) or toks[sa[lo]:sa[lo] + L] != query:
            return lo, lo
        return lo, bisect.bisect_right(sa, query, lo=lo, key=key)

    def longest_match(self, context: Sequence[int], max_len: int = 16, min_len: int = 2) -> tuple[int, int, int]:
        """``(length, lo, hi)`` of the longest suffix of ``context`` with ``min_len <= length <= max_len``
        occurring in the corpus (``(0, 0, 0)`` if none): binary search on the length."""
        context = list(context[-max_len:])
        best = (0, 0, 0)
        lo_len, hi_len = min_len, min(max_len, len(context), self.depth)
        while lo_len <= hi_len:
            mid = (lo_len + hi_len) // 2
            lo, hi = self.find(context[len(context) - mid:])
            if hi > lo:
                best = (mid, lo, hi)
                lo_len = mid + 1
            else:
                hi_len = mid - 1
        return best

    def lookup(self, context: Sequence[int], max_len: int = 16, min_len: int = 2, max_candidates: int = 32,
               max_depth: int = 8) -> tuple[int, list[list[int]]]:
        """``(match length, continuations)``: up to ``max_depth`` tokens after up to ``max_candidates``
        occurrences of the longest matching suffix (evenly spread over its suffix-array range)."""
        length, lo, hi = self.longest_match(context, max_len, min_len)
        if not length:
            return 0, []
        toks, sa = self._lists()
        count = hi - lo
        take = min(count, max_candidates)
        out = []
        for j in range(take):
            start = sa[lo + (j * count) // take] + length
            cont = toks[start:start + max_depth]
            if SEPARATOR in cont:
                cont = cont[:cont.index(SEPARATOR)]
            if cont:
                out.append(cont)
        return length, out


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _encode(tokenizer: TokenizerLike, text: str) -> list[int]:
    try:  # tachy / Hugging Face tokenizers: no BOS inside a corpus
        return list(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[call-arg]
    except TypeError:
        return list(tokenizer.encode(text))


def build_datastore(corpus_text_files: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: TokenizerLike,
                    out_path: str | os.PathLike | None = None, depth: int = 32) -> Datastore:
    """Tokenize text files (each one a document; a directory means its ``*.txt`` files, recursively), build
    the datastore and save it to ``out_path`` when given. Used by ``tachy datastore build``."""
    if isinstance(corpus_text_files, (str, os.PathLike)):
        corpus_text_files = [corpus_text_files]
    files: list[Path] = []
    for f in corpus_text_files:
        p = Path(f)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.txt") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise TachyError(f"corpus file not found: {p}")
    if not files:
        raise TachyError("no corpus text files given (a directory is searched for *.txt)")
    docs = [_encode(tokenizer, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    ds = Datastore.build(docs, depth=depth)
    if out_path is not None:
        ds.save(out_path)
    return ds


@dataclass(repr=False)
class DatastoreDrafter(Drafter):
    """REST drafter: a frequency trie of corpus continuations of the longest matching context suffix.

    Args:
        datastore: a :class:`Datastore`, or the path of one saved with ``Datastore.save`` (None: no drafts).
        max_query_len / min_query_len: context suffix lengths tried (longest match wins).
        max_candidates: occurrences whose continuations are read.
        max_depth: continuation length read per occurrence (the tree's depth).

    >>> drafter = DatastoreDrafter(Datastore.build([[1, 2, 3, 4, 6], [1, 2, 3, 5], [2, 3, 4, 7]]))
    >>> drafter.propose([8, 9, 2, 3], max_tokens=4)
    DraftTree(tokens=[4, 5, 6, 7], parents=[-1, -1, 0, 0])
    """

    datastore: Datastore | str | os.PathLike | None = None
    max_query_len: int = 16
    min_query_len: int = 2
    max_candidates: int = 32
    max_depth: int = 8
    last_match_len: int = field(default=0, init=False)

    name = "rest"

    def __post_init__(self) -> None:
        if isinstance(self.datastore, (str, os.PathLike)):
            self.datastore = Datastore.load(self.datastore)
        if not 1 <= self.min_query_len <= self.max_query_len:
            raise ValueError("need 1 <= min_query_len <= max_query_len")

    def _draft(self, max_tokens: int) -> DraftTree:
        ds = self.datastore
        if ds is None or not len(ds):
            return DraftTree.empty()
        assert isinstance(ds, Datastore)
        length, conts = ds.lookup(self.history[-self.max_query_len:], self.max_query_len, self.min_query_len,
                                  self.max_candidates, min(self.max_depth, max_tokens))
        self.last_match_len = length
        return frequency_tree(conts, max_tokens)
