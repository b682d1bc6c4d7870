"""The server's constraint compiler: same automaton as in process, and a budget no pattern can exceed."""
from __future__ import annotations

import threading
import time

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
    assert (child.initial, child.transitions, child.finals) == (local.initial, local.transitions, local.finals)
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
