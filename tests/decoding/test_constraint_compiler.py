"""The server's constraint compiler: same automaton as in process, and a budget no pattern can exceed."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tachy import InvalidArgumentError
from tachy.decoding.constraint_compiler import CompilerBusy, ConstraintCompiler
from tachy.decoding.structured import Constraint, response_format_source
from tests.decoding.helpers import smollm_tokenizer

PATHOLOGICAL = {"type": "regex", "regex": "(a*)*b{1,100000}"}   # minutes inside outlines-core


@pytest.fixture(scope="module")
def tokenizer():
    return smollm_tokenizer()


@pytest.fixture()
def compiler(tokenizer):
    c = ConstraintCompiler(tokenizer, 49152, timeout_s=60)   # room for a loaded CI machine
    yield c
    c.close()


@pytest.fixture()
def strict(tokenizer):
    """A 1.5 s budget: what the pathological pattern runs into."""
    c = ConstraintCompiler(tokenizer, 49152, timeout_s=1.5)
    yield c
    c.close()


@pytest.mark.parametrize("response_format", [{"type": "regex", "regex": "(cat|dog|bird)s?"},
                                             {"type": "json_object"}])
def test_child_compiles_what_the_process_compiles(compiler, tokenizer, response_format):
    child = compiler.constraint(response_format)
    local = Constraint.compile(response_format_source(response_format), tokenizer, 49152)
    assert child.initial == local.initial and child.size == local.size > 0
    for name in ("offsets", "tokens", "targets", "finals", "distance"):
        assert np.array_equal(getattr(child, name), getattr(local, name)), name
    assert compiler.cached(response_format) == (True, child)


def test_text_needs_no_constraint(compiler):
    assert compiler.constraint({"type": "text"}) is None


def test_pathological_regex_is_refused_within_the_budget_and_remembered(strict):
    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="did not compile within 1.5 s"):
        strict.constraint(PATHOLOGICAL)
    assert time.monotonic() - start < 5
    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="did not compile"):
        strict.constraint(PATHOLOGICAL)       # the refusal is cached: no second child burns 1.5 s
    assert time.monotonic() - start < 0.2
    assert strict.constraint({"type": "regex", "regex": "yes|no"}) is not None   # a fresh child works


def test_invalid_patterns_get_outlines_message(compiler):
    with pytest.raises(InvalidArgumentError, match="regular expression '\\(\\('"):
        compiler.constraint({"type": "regex", "regex": "(("})
    with pytest.raises(InvalidArgumentError, match="invalid JSON schema"):
        compiler.constraint({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}})


def test_automaton_size_budget(tokenizer):
    small = ConstraintCompiler(tokenizer, 49152, max_transitions=1000)
    try:
        with pytest.raises(InvalidArgumentError, match="over the limit of 1000"):
            small.constraint({"type": "json_object"})
        assert small.constraint({"type": "regex", "regex": "yes|no"}) is not None
    finally:
        small.close()


def test_full_line_is_refused_at_once(tokenizer):
    """One process, nobody may wait: while the pathological pattern compiles, another new one is a 429."""
    busy = ConstraintCompiler(tokenizer, 49152, timeout_s=1.5, processes=1, max_waiting=0)
    try:
        slow = busy.submit(PATHOLOGICAL)
        with pytest.raises(CompilerBusy):
            busy.submit({"type": "regex", "regex": "x+"})
        with pytest.raises(InvalidArgumentError):
            slow.result()
        assert busy.constraint({"type": "regex", "regex": "x+"}) is not None   # the line is free again
    finally:
        busy.close()


def test_close_kills_the_children(tokenizer):
    c = ConstraintCompiler(tokenizer, 49152)
    c.constraint({"type": "regex", "regex": "a|b"})
    children = list(c._idle)
    assert children and all(ch.proc.poll() is None for ch in children)
    c.close()
    assert all(ch.proc.poll() is not None for ch in children)


def test_concurrent_callers_share_the_cache(compiler):
    results = []
    threads = [threading.Thread(target=lambda: results.append(compiler.constraint({"type": "regex",
                                                                                   "regex": "[0-9]{3}"})))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is not None for r in results)
    assert compiler.cached({"type": "regex", "regex": "[0-9]{3}"})[0]


def test_bad_budget_is_refused(tokenizer):
    with pytest.raises(InvalidArgumentError, match="compile budget"):
        ConstraintCompiler(tokenizer, 49152, timeout_s=0)


def test_memory_held_by_constraints_is_bounded(tokenizer):
    """64 cached constraints of 3M transitions (a schema of 60 string properties, a 2 KB request) held 22 GB
    as dicts (1.5 GB as arrays, 8 bytes a transition). The cache keeps at most half of
    ``max_held_transitions``, and while the constraints alive hold all of it a new compile is a 429
    (CompilerBusy), until they go."""
    import gc

    schemas = [{"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
        f"{name}{i}": {"type": "string"} for i in range(3)}, "required": [f"{name}{i}" for i in range(3)]}}}
        for name in "abcdefgh"]
    c = ConstraintCompiler(tokenizer, 49152, timeout_s=60, max_held_transitions=1_000_000)
    try:
        kept = [c.constraint(schema) for schema in schemas[:7]]
        size = {id(k): k.size for k in kept}
        assert all(k.size == len(k.tokens) == len(k.targets) == k.offsets[-1] for k in kept)
        assert all(k.tokens.nbytes + k.targets.nbytes == 8 * k.size for k in kept)   # what the docstrings say
        assert sum(size.values()) >= 1_000_000
        assert sum(size[id(k)] for schema, k in zip(schemas, kept) if c.cached(schema)[0]) <= 500_000
        with pytest.raises(CompilerBusy, match="token transitions"):
            c.submit(schemas[7])
        del kept
        gc.collect()
        assert c.constraint(schemas[7]) is not None
    finally:
        c.close()


def test_a_large_automaton_reaches_the_server_as_a_few_bytes_objects(compiler, monkeypatch):
    """3M transitions (a schema of 60 string properties) pickled as dicts took one 0.25-0.35 s pickle.loads,
    holding the GIL: the event loop and the generating thread stalled. The answer is now a handful of flat
    bytes objects (a few opcodes, 8 bytes a transition), which unpickle in milliseconds whatever the size."""
    import pickle
    import pickletools

    from tachy.decoding import constraint_compiler

    answers = []

    class Recording:
        @staticmethod
        def loads(data: bytes):
            answers.append(data)
            return pickle.loads(data)

    monkeypatch.setattr(constraint_compiler, "pickle", Recording)
    constraint = compiler.constraint({"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60)},
        "required": [f"p{i}" for i in range(60)]}}})
    assert constraint.size > 3_000_000 and len(answers) == 1
    opcodes = list(pickletools.genops(answers[0]))
    assert len(opcodes) < 40, [op.name for op, _, _ in opcodes]
    status, automaton = pickle.loads(answers[0])
    assert status == "ok" and len(automaton) == 6
    assert all(isinstance(v, bytes) for k, v in automaton.items() if k != "initial")
    assert len(answers[0]) < 8 * constraint.size + 64 * len(constraint.finals) + 1000


def test_a_constraint_keeps_a_bounded_number_of_masks(compiler):
    """Each (state, budget) mask is 49 KB; a pattern that enters a new state at every token kept one per
    generated token, as long as the (cached) constraint lived."""
    from tachy.decoding.structured import MAX_MASKS

    constraint = compiler.constraint({"type": "regex", "regex": "[0-9]{3000}"})
    state = constraint.initial
    for _ in range(MAX_MASKS + 200):
        allowed = constraint.mask(state, 10_000)
        state = constraint.next_state(state, int(allowed.nonzero()[0, 0]))
    assert len(constraint._masks) <= MAX_MASKS
