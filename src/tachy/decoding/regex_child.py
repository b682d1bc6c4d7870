"""Compile a regex or JSON schema into a token-level automaton, in this process or as a child process.

Imported, :func:`compile_automaton` is the in-process compiler. Run as a script (by path, so that only the
standard library and outlines-core are imported: it starts in a fraction of a second), it is the child that
:class:`tachy.decoding.constraint_compiler.ConstraintCompiler` talks to, so that a pathological pattern
(``(a*)*b{1,100000}`` runs for minutes inside outlines-core, where no Python thread can stop it) costs at
most a time budget of a process that can be killed, never the server's worker or its event loop.

Protocol on stdin/stdout: length-prefixed pickles (parent and child are the same installation). The first
message is ``(eos_id, vocabulary, whitespace, max_transitions, memory_bytes)``, then each message is
``(kind, text)`` with kind "regex", "schema" or "schema_or_text", answered ``("ok", (initial, transitions, finals))`` or
``("error", message)``.
"""
from __future__ import annotations

import pickle
import struct
import sys

import outlines_core
from outlines_core.json_schema import build_regex_from_schema


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
                      max_transitions: int | None = None) -> tuple[int, dict[int, dict[int, int]], set[int]]:
    """(initial state, {state: {token: next state}}, accepting states) of a regex or JSON schema over a
    vocabulary; ValueError (with outlines-core's message) if the pattern is invalid or unsupported."""
    index = outlines_core.Index(source_regex(kind, text, whitespace), outlines_core.Vocabulary(eos_id, vocabulary))
    transitions = index.get_transitions()
    size = sum(len(edges) for edges in transitions.values())
    if max_transitions is not None and size > max_transitions:
        raise AutomatonTooLarge(f"the constraint compiles to {size} token transitions, over the limit of "
                                f"{max_transitions}")
    return index.get_initial_state(), transitions, set(index.get_final_states())


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
