"""REST datastore: suffix array against sorting, lookups against brute force, save/load, build from files."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from tachy.errors import TachyError
from tachy.speculative.drafters import (Datastore, DatastoreDrafter, build_datastore, build_suffix_array,
                                        frequency_tree)
from tachy.speculative.tree import DraftTree


@pytest.mark.parametrize("depth", [1, 2, 3, 8, 64])
def test_suffix_array_sorts_by_prefix_then_position(depth):
    rng = random.Random(depth)
    for _ in range(30):
        toks = [rng.randrange(3) for _ in range(rng.randint(0, 40))]
        sa = build_suffix_array(np.array(toks, dtype=np.int64), depth).tolist()
        d = 1 << (depth - 1).bit_length()  # prefix doubling sorts on a power-of-two prefix
        assert sa == sorted(range(len(toks)), key=lambda i: (toks[i:i + d], i))


def brute_longest(corpus_docs, context, max_len, min_len):
    """Longest suffix of context (min_len..max_len) inside some document, and its continuations."""
    for L in range(min(max_len, len(context)), min_len - 1, -1):
        q = context[len(context) - L:]
        conts = [doc[s + L:] for doc in corpus_docs for s in range(len(doc) - L + 1) if doc[s:s + L] == q]
        if conts:
            return L, conts
    return 0, []


def test_lookup_against_brute_force():
    rng = random.Random(5)
    for _ in range(40):
        docs = [[rng.randrange(4) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 3))]
        ds = Datastore.build(docs, depth=8)
        ctx = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        length, conts = ds.lookup(ctx, max_len=6, min_len=2, max_candidates=1000, max_depth=3)
        b_len, b_conts = brute_longest(docs, ctx, 6, 2)
        assert length == b_len
        assert sorted(conts) == sorted(c[:3] for c in b_conts if c)
        if length:
            lo, hi = ds.find(ctx[len(ctx) - length:])
            assert hi - lo == len(b_conts)


@pytest.mark.parametrize("conts, max_nodes, expected", [
    ([[4, 1], [5], [4, 7], [4, 1]], 3, DraftTree([4, 1, 5], [-1, 0, -1])),
    ([[4, 1], [5], [4, 7], [4, 1]], 10, DraftTree([4, 1, 5, 7], [-1, 0, -1, 0])),
    ([[1, 2, 3]], 2, DraftTree.chain([1, 2])),
    ([[2], [1]], 1, DraftTree.chain([2])),                 # equal counts: first seen
    ([], 4, DraftTree.empty()),
])
def test_frequency_tree(conts, max_nodes, expected):
    assert frequency_tree(conts, max_nodes) == expected


def test_drafter_and_matching_rules():
    ds = Datastore.build([[1, 2, 3, 4, 6], [1, 2, 3, 5], [2, 3, 4, 7]])
    d = DatastoreDrafter(ds)
    assert d.propose([8, 9, 2, 3], 4) == DraftTree([4, 5, 6, 7], [-1, -1, 0, 0])
    assert d.last_match_len == 2
    assert d.propose([8, 1, 2, 3], 4) == DraftTree([4, 5, 6], [-1, -1, 0])   # longer match [1, 2, 3]
    assert d.last_match_len == 3
    assert d.propose([8, 9, 3], 4) == DraftTree.empty()                     # [3] alone is below min 2
    assert DatastoreDrafter(ds, min_query_len=1).propose([8, 9, 3], 4).tokens == [4, 5, 6, 7]
    assert d.propose([3, 4], 4) == DraftTree([6, 7], [-1, -1])              # equal counts: first in order
    assert d.propose([4, 7], 4) == DraftTree.empty()                        # [4, 7] ends its document
    assert DatastoreDrafter().propose([1, 2, 3], 4) == DraftTree.empty()     # no datastore


def test_build_from_arrays():
    import torch

    flat = [1, 2, 3, 1, 2, 4]
    for corpus in (np.array(flat), torch.tensor(flat), flat, [flat]):
        assert Datastore.build(corpus).tokens.tolist() == flat
    two = Datastore.build(np.array([[1, 2, 3], [1, 2, 4]]))
    assert two.tokens.tolist() == [1, 2, 3, -1, 1, 2, 4]
    assert Datastore.build([]).lookup([1, 2]) == (0, [])


def test_save_load_roundtrip(tmp_path):
    ds = Datastore.build([[1, 2, 3, 4], [1, 2, 3, 5]], depth=16)
    path = tmp_path / "store.npz"
    ds.save(path)
    loaded = Datastore.load(path)
    assert loaded.depth == 16
    assert loaded.tokens.tolist() == ds.tokens.tolist()
    assert loaded.suffix_array.tolist() == ds.suffix_array.tolist()
    assert loaded.lookup([0, 1, 2]) == ds.lookup([0, 1, 2]) == (2, [[3, 4], [3, 5]])
    drafter = DatastoreDrafter(str(path))
    assert drafter.propose([1, 2], 3) == DraftTree([3, 4, 5], [-1, 0, 0])
    with pytest.raises(TachyError):
        Datastore.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TachyError):
        Datastore.load(tmp_path / "bad.npz")


class CharTokenizer:
    """encode(text) -> code points; accepts add_special_tokens like tachy's Tokenizer."""

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


class PlainTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]


def test_build_datastore_from_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world")
    (tmp_path / "corpus" / "b.txt").write_text("hello there")
    (tmp_path / "corpus" / "skip.bin").write_bytes(b"\0\1")
    out = tmp_path / "ds.npz"
    ds = build_datastore(tmp_path / "corpus", CharTokenizer(), out)
    assert out.exists() and len(ds) == len("hello world") + 1 + len("hello there")
    assert 0 not in ds.tokens.tolist()                       # no BOS inside the corpus
    length, conts = Datastore.load(out).lookup([ord(c) for c in "xhello "], max_depth=3)
    assert length == 6 and sorted(conts) == [[ord(c) for c in "the"], [ord(c) for c in "wor"]]
    ds2 = build_datastore([tmp_path / "corpus" / "a.txt"], PlainTokenizer())
    assert ds2.tokens.tolist() == [ord(c) for c in "hello world"]
    with pytest.raises(TachyError):
        build_datastore(tmp_path / "nope.txt", PlainTokenizer())


def test_build_size_sanity():
    """Not a timed assertion: ~300k tokens build well under a second here (prints the time)."""
    rng = np.random.default_rng(0)
    toks = (rng.zipf(1.3, 300_000) % 30_000).astype(np.int64)
    t0 = time.perf_counter()
    ds = Datastore.build(toks)
    print(f"built {len(ds)} tokens in {time.perf_counter() - t0:.2f} s")
    i = 12345
    length, conts = ds.lookup(toks[i - 20:i].tolist(), max_depth=4)
    assert length == 16 and toks[i:i + 4].tolist() in conts
