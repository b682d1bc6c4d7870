"""The array-backed Constraint against outlines-core's own dict automaton: same states, edges, distances and
masks for every budget (the reference below is the dict version the arrays replaced)."""
from __future__ import annotations

import json
import random
from collections import deque

import outlines_core
import pytest
import torch

from tachy.decoding.regex_child import UNREACHABLE, dense_automaton, source_regex
from tachy.decoding.structured import WHITESPACE, Constraint, eos_ids, response_format_source, vocabulary
from tests.decoding.helpers import smollm_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # 49k-wide tensor ops spin two threads on 2 cores
V = 49152
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc"]}, "maxItems": 2},
    "city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["name", "age", "city"]}
SOURCES = [
    ("regex", "(cat|dog|bird)s?"),
    ("regex", r"[0-9]{3}-[0-9]{4} (yes|no)"),
    ("regex", "a{30}"),   # longer than small budgets: the fallback path
    ("regex", r"(\+|-)?[0-9]+(\.[0-9]+)?"),
    ("schema", json.dumps(PERSON)),
    ("schema_or_text", json.dumps(PERSON)),
    response_format_source({"type": "json_object"}),   # 0.8M transitions, states with ~49k edges
]


class DictReference:
    """The dict-based Constraint as it was: {state: {token: next}}, BFS distances, masks built in Python."""

    FAR = 1 << 30

    def __init__(self, index: outlines_core.Index, eos: list[int], vocab_size: int):
        self.eos, self.vocab_size = eos, vocab_size
        self.initial, self.transitions = index.get_initial_state(), index.get_transitions()
        self.finals, self.masks = set(index.get_final_states()), {}
        back: dict[int, set[int]] = {}
        for s, edges in self.transitions.items():
            for t in edges.values():
                back.setdefault(t, set()).add(s)
        self.distance = {s: 0 for s in self.finals}
        todo = deque(self.finals)
        while todo:
            s = todo.popleft()
            for p in back.get(s, ()):
                if p not in self.distance:
                    self.distance[p] = self.distance[s] + 1
                    todo.append(p)

    def next_state(self, state, token):
        return None if state is None else self.transitions.get(state, {}).get(token)

    def mask(self, state, budget) -> torch.Tensor:
        """A pure function of (state, budget), memoized here only because walks come back to states."""
        if (state, budget) not in self.masks:
            self.masks[state, budget] = self._mask(state, budget)
        return self.masks[state, budget]

    def _mask(self, state, budget) -> torch.Tensor:
        far, allowed = self.FAR, torch.zeros(self.vocab_size, dtype=torch.bool)
        if state is None:
            ids = list(self.eos)
        else:
            edges = self.transitions.get(state, {})
            ids = [t for t, s in edges.items() if t not in self.eos and t < self.vocab_size
                   and self.distance.get(s, far) <= budget - 1]
            if state in self.finals:
                ids += self.eos
            if not ids:
                best = min(self.distance.get(s, far) for s in edges.values())
                ids = [t for t, s in edges.items() if self.distance.get(s, far) == best and t < self.vocab_size]
        allowed[torch.tensor(ids, dtype=torch.long)] = True
        return allowed


@pytest.fixture(scope="module")
def tokenizer():
    return smollm_tokenizer()


def pair(tokenizer, source, vocab_size=V) -> tuple[DictReference, Constraint]:
    """The reference from outlines-core directly, and the Constraint as the library compiles it (or, for a
    narrower logits width than the vocabulary compiled, from the same arrays)."""
    eos = eos_ids(tokenizer)
    table = outlines_core.Vocabulary(eos[0], vocabulary(tokenizer, V))
    index = outlines_core.Index(source_regex(*source, WHITESPACE), table)
    ref = DictReference(index, eos, vocab_size)
    if vocab_size == V:
        return ref, Constraint.compile(source, tokenizer, V)
    automaton = dense_automaton(index.get_initial_state(), index.get_transitions(), index.get_final_states())
    return ref, Constraint(automaton, eos, vocab_size)


def state_map(ref: DictReference, new: Constraint) -> dict[int, int]:
    """Walk every edge of the reference from its initial state: the arrays must hold the same automaton (one
    state for each, the same edges, accepting states and distances), whatever the numbering; {ref: new}."""
    states = {ref.initial: new.initial}
    todo = deque([ref.initial])
    while todo:
        r = todo.popleft()
        n = states[r]
        assert bool(new.finals[n]) == (r in ref.finals)
        assert int(new.distance[n]) == ref.distance.get(r, UNREACHABLE)
        for token, r_next in ref.transitions.get(r, {}).items():
            n_next = new.next_state(n, token)
            assert n_next is not None
            if r_next not in states:
                states[r_next] = n_next
                todo.append(r_next)
            assert states[r_next] == n_next
    everything = set(ref.transitions) | ref.finals | {t for edges in ref.transitions.values() for t in edges.values()}
    assert len(set(states.values())) == len(states) and len(new.finals) == len(everything)   # outlines-core keeps
    assert new.size == sum(len(edges) for edges in ref.transitions.values())             # unreachable states too
    return states


def check_state(ref, new, states, r, rng, vocab_size) -> None:
    """Masks for budgets around the state's distance, and next_state for allowed, forbidden and odd tokens."""
    n = states[r] if r is not None else None
    d = ref.distance.get(r, 5) if r is not None else 5
    for budget in sorted({-1, 0, 1, 2, 3, d - 1, d, d + 1, d + 2, 2 * d + 7, 10_000, 1 << 40}):
        assert torch.equal(new.mask(n, budget), ref.mask(r, budget)), (r, budget)
    allowed = ref.mask(r, 10_000).nonzero().flatten().tolist()
    tokens = rng.sample(allowed, min(20, len(allowed))) + [rng.randrange(vocab_size) for _ in range(20)]
    for token in tokens + ref.eos + [0, vocab_size - 1, V, -1, 1 << 40]:
        r_next, n_next = ref.next_state(r, token), new.next_state(n, token)
        assert (n_next is None and r_next is None) or n_next == states[r_next], (r, token)


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: f"{s[0]}:{s[1][:24]}")
def test_arrays_answer_what_the_dicts_answered(tokenizer, source):
    ref, new = pair(tokenizer, source)
    states = state_map(ref, new)
    rng = random.Random(0)
    # states on random and greedy (lowest id) walks under a shrinking budget, then a sample of all states
    for walk in range(4):
        r, budget = ref.initial, rng.choice([4, 12, 40])
        while r is not None and budget > 0:
            check_state(ref, new, states, r, rng, V)
            allowed = ref.mask(r, budget).nonzero().flatten().tolist()
            token = allowed[0] if walk == 0 else rng.choice(allowed)
            if token in ref.eos:
                break
            r, budget = ref.next_state(r, token), budget - 1
    for r in rng.sample(sorted(states), min(25, len(states))):
        check_state(ref, new, states, r, rng, V)
    check_state(ref, new, states, None, rng, V)   # off the language: EOS only, and it stays off


def test_tokens_past_the_logits_width_are_never_allowed(tokenizer):
    """A constraint used with a narrower vocabulary than its tokens (30000 of 49152) keeps the dict rules."""
    ref, new = pair(tokenizer, response_format_source({"type": "json_object"}), vocab_size=30_000)
    states = state_map(ref, new)
    rng = random.Random(1)
    for r in rng.sample(sorted(states), 25):
        check_state(ref, new, states, r, rng, 30_000)


def test_arrays_are_flat_and_read_without_a_copy():
    """7 (initial) -1-> 5, -2-> 4, -3-> 6, -EOS-> 4; 5 -1-> 5 (a loop that never ends); 4 and 6 accept.
    Numbered: the initial state first, then the others in order (7, 4, 5, 6 -> 0, 1, 2, 3)."""
    automaton = dense_automaton(7, {7: {3: 6, 1: 5, 9: 4, 2: 4}, 5: {1: 5}}, [4, 6])
    assert all(isinstance(v, bytes) for k, v in automaton.items() if k != "initial")
    new = Constraint(automaton, [9], 16)
    assert new.initial == 0 and new.size == 5 and not new.tokens.flags.writeable   # views of the bytes
    assert new.offsets.tolist() == [0, 4, 4, 5, 5] and new.tokens.tolist() == [1, 2, 3, 9, 1]
    assert new.targets.tolist() == [2, 1, 3, 1, 2] and new.finals.tolist() == [False, True, False, True]
    assert new.distance.tolist() == [1, 0, UNREACHABLE, 0]
    assert [new.next_state(0, t) for t in (1, 2, 3, 4, 9)] == [2, 1, 3, None, 1] and new.next_state(1, 1) is None
    assert new.mask(0, 10).nonzero().flatten().tolist() == [2, 3]   # 1 never ends; EOS only where accepting
    assert new.mask(1, 10).nonzero().flatten().tolist() == [9]
    assert new.mask(2, 10).nonzero().flatten().tolist() == [1]   # nothing fits: the shortest way, as before
