"""Compile a regex or JSON schema into a token-level automaton, in this process or as a child process.

Imported, :func:`compile_automaton` is the in-process compiler. Run as a script (by path, so that only the
standard library and outlines-core are imported: it starts in a fraction of a second), it is the child that
:class:`tachy.decoding.constraint_compiler.ConstraintCompiler` talks to, so that a pathological pattern
(``(a*)*b{1,100000}`` runs for minutes inside outlines-core, where no Python thread can stop it) costs at
most a time budget of a process that can be killed, never the server's worker or its event loop.

Protocol on stdin/stdout: length-prefixed pickles (parent and child are the same installation). The first
message is ``(eos_id, vocabulary, whitespace, max_transitions, memory_bytes)``, then each message is
``(kind, text)`` with kind "regex", "schema" or "schema_or_text", answered ``("ok", automaton)`` (the flat
arrays of :func:`dense_automaton`), ``("too_large", message)`` or ``("error", message)``.
"""
from __future__ import annotations

import pickle
import struct
import sys
from array import array
from collections import deque
from collections.abc import Iterable

import outlines_core
from outlines_core.json_schema import build_regex_from_schema


# the automaton's arrays and their item types (array typecodes, which numpy reads the same way: "i" int32,
# "q" int64, "B" uint8); offsets are int64 so that an in-process compile has no edge limit
ARRAYS = {"offsets": "q", "tokens": "i", "targets": "i", "finals": "B", "distance": "i"}
UNREACHABLE = 1 << 30   # the distance of a state from which no accepting state can be reached


class AutomatonTooLarge(ValueError):
    """The automaton has more token transitions than the budget allows."""


def source_regex(kind: str, text: str, whitespace: str) -> str:
    """The regex of a constraint source: a regex as is, a JSON schema's (outlines-core's builder), or for
    "schema_or_text" a JSON value of the schema or free text that does not begin with "{"."""
    if kind == "regex":
        return text
    regex = build_regex_from_schema(text, whitespace)
    return regex if kind == "schema" else f"(?:{regex})|(?:[^{{][\\s\\S]*)"


def compile_automaton(kind: str, text: str, eos_id: int, vocabulary: dict[bytes, list[int]], whitespace: str,
                      max_transitions: int | None = None) -> dict[str, int | bytes]:
    """The token automaton of a regex or JSON schema over a vocabulary, as :func:`dense_automaton`'s flat
    arrays; ValueError (with outlines-core's message) if the pattern is invalid or unsupported."""
    index = outlines_core.Index(source_regex(kind, text, whitespace), outlines_core.Vocabulary(eos_id, vocabulary))
    transitions = index.get_transitions()
    size = sum(len(edges) for edges in transitions.values())
    if max_transitions is not None and size > max_transitions:
        raise AutomatonTooLarge(f"the constraint compiles to {size} token transitions, over the limit of "
                                f"{max_transitions}")
    return dense_automaton(index.get_initial_state(), transitions, index.get_final_states())


def dense_automaton(initial: int, transitions: dict[int, dict[int, int]],
                    finals: Iterable[int]) -> dict[str, int | bytes]:
    """outlines-core's ``(initial, {state: {token: next state}}, finals)`` as flat arrays (CSR), with the
    states renumbered 0..S-1 (the initial one 0) and each state's distance to the end computed here.

    Why: as dicts a transition costs ~116 bytes in the server, and unpickling 3M of them held its GIL for a
    quarter of a second; a few bytes objects take 8 bytes a transition and unpickle in milliseconds (the
    parent reads them with ``np.frombuffer``, no copy), and the breadth-first search runs in the child.
    Keys (item types in ARRAYS): "initial" (0); "offsets" (S+1: state s's edges are offsets[s]:offsets[s+1]);
    "tokens" (E, ascending within a state); "targets" (E, the next states); "finals" (S, 1 = accepting);
    "distance" (S, fewest tokens to an accepting state, 0 for one, UNREACHABLE if none can be reached).
    """
    finals = set(finals)
    states = {initial} | set(transitions) | finals
    for edges in transitions.values():
        states.update(edges.values())
    order = [initial] + sorted(states - {initial})
    number = {s: i for i, s in enumerate(order)}
    offsets, tokens, targets = array(ARRAYS["offsets"], [0]), array(ARRAYS["tokens"]), array(ARRAYS["targets"])
    back: list[list[int]] = [[] for _ in order]   # predecessors, once per (state, next state) pair
    for i, s in enumerate(order):
        edges = transitions.get(s, {})
        ordered = sorted(edges)
        tokens.fromlist(ordered)
        targets.fromlist(list(map(number.__getitem__, map(edges.__getitem__, ordered))))
        offsets.append(len(tokens))
        for t in set(edges.values()):
            back[number[t]].append(i)
    distance = array(ARRAYS["distance"], [UNREACHABLE]) * len(order)
    flags = array(ARRAYS["finals"], [0]) * len(order)
    todo = deque(sorted(number[s] for s in finals))
    for s in todo:
        distance[s], flags[s] = 0, 1
    while todo:   # breadth first over the reversed edges, from the accepting states
        s = todo.popleft()
        for p in back[s]:
            if distance[p] == UNREACHABLE:
                distance[p] = distance[s] + 1
                todo.append(p)
    return {"initial": 0, "offsets": offsets.tobytes(), "tokens": tokens.tobytes(), "targets": targets.tobytes(),
            "finals": flags.tobytes(), "distance": distance.tobytes()}


def read_message(stream) -> object:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def write_message(stream, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _die_with_parent() -> None:
    """Linux: be killed when the parent dies, even mid-compile (when stdin is not being read)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve() -> None:
    _die_with_parent()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    eos_id, vocabulary, whitespace, max_transitions, memory_bytes = read_message(stdin)
    if memory_bytes:
        import resource

        # an automaton that outgrows this fails to allocate and kills only this process
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while True:
        try:
            kind, text = read_message(stdin)
        except EOFError:
            return
        try:
            write_message(stdout, ("ok", compile_automaton(kind, text, eos_id, vocabulary, whitespace, max_transitions)))
        except AutomatonTooLarge as e:
            write_message(stdout, ("too_large", str(e)))
        except (ValueError, TypeError, MemoryError) as e:
            write_message(stdout, ("error", str(e)))


if __name__ == "__main__":
    _serve()
