"""Registry, the shared Drafter plumbing (sync, overlap copy), doctests, and conformance of every drafter."""
from __future__ import annotations

import doctest
import importlib
import random
import time

import pytest

from tachy.errors import InvalidArgumentError, UnknownNameError
from tachy.speculative.drafters import (DRAFTERS, Datastore, Drafter, available_drafters, make_drafter,
                                        overlap_copy)
from tachy.speculative.tree import DraftTree

from .helpers import check_tree, make_stream, run_engine

MODULES = ["__init__", "base", "prompt_lookup", "suffix_automaton", "token_recycling", "aded", "datastore", "fallback",
           "lookahead"]
VOCAB = 40
STREAM = make_stream(1200, VOCAB, seed=1)
# drafters that run a model of their own need a target engine (tests in test_draft_model.py and test_engine.py)
MODEL_FREE = sorted(name for name, cls in DRAFTERS.items() if not cls.needs_target)


def build(name: str) -> Drafter:
    if name == "rest":  # without a datastore it never drafts: give it one over the stream's first half
        return make_drafter(name, datastore=Datastore.build(STREAM[:600]))
    return make_drafter(name)


# ------------------------------------------------------------------------------------------------ registry

def test_registry_names():
    assert {"default", "pld", "sam", "recycling", "trigram", "rest", "lookahead"} <= set(DRAFTERS)
    assert {"default", "model-free", "gated", "pld", "sam", "recycling", "trigram", "rest", "lookahead"} <= set(MODEL_FREE)
    assert available_drafters() == sorted(DRAFTERS)
    for name, cls in DRAFTERS.items():
        assert cls.name == name
        assert issubclass(cls, Drafter)


def test_unknown_name_lists_available():
    with pytest.raises(UnknownNameError) as info:
        make_drafter("no-such-drafter")
    msg = str(info.value)
    assert "no-such-drafter" in msg
    for name in DRAFTERS:
        assert name in msg


def test_make_drafter_passes_options():
    d = make_drafter("pld", max_ngram=2, min_ngram=2)
    assert (d.max_ngram, d.min_ngram) == (2, 2)
    with pytest.raises(InvalidArgumentError):
        make_drafter("pld", no_such_option=1)


def test_drafter_spec_strings():
    d = make_drafter("pld:max_ngram=2,max_matches=3")
    assert (d.max_ngram, d.max_matches) == (2, 3)
    assert make_drafter("pld:max_ngram=2", max_ngram=3).max_ngram == 3      # explicit kwargs win
    with pytest.raises(InvalidArgumentError):
        make_drafter("pld:max_ngram")
    with pytest.raises(UnknownNameError):
        make_drafter("nope:a=1")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    name = "tachy.speculative.drafters" + ("" if module == "__init__" else f".{module}")
    mod = importlib.import_module(name)
    assert doctest.testmod(mod).failed == 0


# ------------------------------------------------------------------------------------------------ helpers

@pytest.mark.parametrize("history, start, n, expected", [
    ([7, 1, 2, 1, 2], 3, 5, [1, 2, 1, 2, 1]),
    ([1, 2, 3], 0, 2, [1, 2]),
    ([1, 2, 3], 2, 4, [3, 3, 3, 3]),
    ([1, 2, 3], 3, 4, []),
    ([1, 2, 3], 1, 0, []),
])
def test_overlap_copy(history, start, n, expected):
    assert overlap_copy(history, start, n) == expected


def test_as_documents_accepts_arrays_and_tensors():
    import numpy as np
    import torch
    from tachy.speculative.drafters.base import as_documents

    assert as_documents(np.array([1, 2, 3])) == [[1, 2, 3]]
    assert as_documents(torch.tensor([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert as_documents([np.array([1, 2]), torch.tensor([3])]) == [[1, 2], [3]]
    assert as_documents(torch.tensor([5, 6]).unbind()) == [[5, 6]]    # a list of 0-d tensors: one document
    assert as_documents(range(3)) == [[0, 1, 2]]


class Recorder(Drafter):
    """Records what the sync hooks see."""
    name = "recorder"

    def _restart(self):
        self.events = getattr(self, "events", []) + ["restart"]

    def _consume(self, start):
        self.events.append(tuple(self.history[start:]))


def test_sync_feeds_only_new_tokens_and_restarts_on_divergence():
    d = Recorder()
    d.reset([1, 2, 3])
    d.propose([1, 2, 3, 4], 4)
    d.update([1, 2, 3, 4, 5, 6], 1)
    d.propose([1, 2, 3, 4, 5, 6], 4)           # nothing new
    assert d.events == ["restart", (1, 2, 3), (4,), (5, 6)]
    d.propose([1, 2, 9, 4, 5, 6, 7], 4)        # not a continuation: start over from these ids
    assert d.events[-2:] == ["restart", (1, 2, 9, 4, 5, 6, 7)]
    d.propose([1, 2], 4)                       # shorter: start over
    assert d.events[-2:] == ["restart", (1, 2)]
    assert d.history == [1, 2]


def test_propose_without_reset_and_tensor_ids():
    import torch
    d = make_drafter("pld")
    tree = d.propose(torch.tensor([1, 2, 3, 1, 2]), 3)    # no reset: starts from ids
    assert tree.tokens == [3, 1, 2]
    assert d.propose([1, 2, 3, 1, 2], 0) == DraftTree.empty()


# ----------------------------------------------------------------------------------------- conformance

@pytest.mark.parametrize("name", MODEL_FREE)
def test_conformance_engine_loop(name):
    """Every drafter, driven like the engine on a repetitive stream: valid trees within the budget, and
    some drafts accepted."""
    for max_tokens in (1, 5, 16):
        stats = run_engine(build(name), STREAM, prompt_len=300, steps=60, max_tokens=max_tokens, vocab=VOCAB)
        assert stats.steps == 60
        assert stats.accepted > 0, (name, max_tokens, stats)


@pytest.mark.parametrize("name", MODEL_FREE)
def test_conformance_random_inputs(name):
    """Random contexts, budgets (0 included), tiny prompts and prompt switches without reset."""
    rng = random.Random(hash(name) % 1000)
    d = build(name)
    d.reset([rng.randrange(VOCAB)])
    for _ in range(40):
        ids = [rng.randrange(6) for _ in range(rng.randint(1, 50))]
        if rng.random() < 0.5:
            d.reset(ids)
        budget = rng.randint(0, 20)
        tree = d.propose(ids, budget)
        check_tree(tree, budget, VOCAB)
        d.update(ids + [rng.randrange(6)], 0, None, None)


@pytest.mark.parametrize("name", MODEL_FREE)
def test_step_cost_sanity(name):
    """Not a timed assertion: a few hundred steps on a 4k-token context must stay cheap (prints us/step)."""
    stream = make_stream(6000, 2000, seed=3)
    d = make_drafter(name, datastore=Datastore.build(stream[:3000])) if name == "rest" else make_drafter(name)
    t0 = time.perf_counter()
    stats = run_engine(d, stream, prompt_len=4000, steps=150, max_tokens=16, vocab=2000, check=False)
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed / max(stats.steps, 1) * 1e6:.0f} us/step incl. fake target, "
          f"{stats.accepted / max(stats.steps, 1):.2f} accepted/step")
    assert elapsed < 20


def test_acceptance_counts_offered_and_accepted_nodes():
    from tachy.speculative.drafters.base import Acceptance

    table = Acceptance(prior_weight=2.0)
    tree = DraftTree([1, 2, 3, 4], [-1, 0, 0, -1])          # 1 -> (2, 3); 4 beside 1
    keys = ["a", "b", "c", "d"]
    table.record(tree, keys, {0, 1})                          # 1 then 2 accepted: 3 offered, rejected
    assert table.counts == {"a": [1, 1], "b": [1, 1], "c": [0, 1], "d": [0, 1]}
    table.record(tree, keys, set())                           # nothing accepted: 2 and 3 were never offered
    assert table.counts["b"] == [1, 1] and table.counts["a"] == [1, 2]
    assert table.estimate("a", prior=0.5) == pytest.approx((1 + 1.0) / (2 + 2.0))
    assert table.estimate("new", prior=0.3) == pytest.approx(0.3)


class _Costs:
    """A stand-in target whose forward costs grow slowly: drafts pay as far as they are accepted."""

    def step_costs(self):
        return [0.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0]


def test_a_keyed_drafter_learns_acceptance_and_drafts_only_what_pays():
    from tachy.speculative.drafters import SuffixAutomatonDrafter

    d = SuffixAutomatonDrafter(min_match_len=1)
    d.check_target(_Costs())
    text = [5, 6, 7, 8, 9] * 6
    d.reset(text)
    first = d.propose(text, 8)
    assert first.probs is not None and len(first) < 8        # the prior alone does not pay for 8 nodes
    ids = list(text)
    for _ in range(12):                                       # the text keeps repeating: every draft accepted
        tree = d.propose(ids, 8)
        step = [ids[len(ids) - 5 + (i % 5)] for i in range(len(tree) + 1)]
        ids += step
        d.update(ids, len(tree), None, [ids[-len(step) - 1]] + tree.tokens)
    assert len(d.propose(ids, 8)) > len(first)                # learned: long copies pay here
    assert max(v[1] for v in d.acceptance.counts.values()) > 5
