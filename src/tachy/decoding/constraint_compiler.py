"""Compile structured-output constraints for a server: in child processes, within a time and size budget.

outlines-core compiles a regex into a DFA over whole tokens, and some patterns explode: ``(a*)*b{1,100000}``
runs for minutes, in Rust code no Python thread can interrupt. So the server never compiles on its worker or
its event loop: :class:`ConstraintCompiler` sends each new pattern to a child process (regex_child.py, which
starts in a fraction of a second and holds the vocabulary), kills the child when the time budget runs out,
caps its memory, and refuses automata with more token transitions than the budget. Every answer is cached by
pattern, refusals too, so a client repeating a pathological pattern costs nothing the second time, and
compiles wait in a bounded line: past it a request is refused at once (:class:`CompilerBusy`, a 429).
"""
from __future__ import annotations

import collections
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from . import regex_child
from .structured import WHITESPACE, Constraint, compile_error, eos_ids, response_format_source, vocabulary

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

CHILD_SCRIPT = Path(regex_child.__file__)


class CompilerBusy(Exception):
    """Too many constraints are compiling or waiting to (answered 429)."""


class _ChildGone(Exception):
    """The child process died (out of its memory budget) or did not answer in time."""


class _Child:
    """One compiler process, fed the vocabulary once."""

    def __init__(self, setup: tuple):
        self.proc = subprocess.Popen([sys.executable, str(CHILD_SCRIPT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._send(setup)

    def ask(self, message: tuple, timeout_s: float) -> tuple:
        self._send(message)
        deadline = time.monotonic() + timeout_s
        (size,) = struct.unpack("<Q", self._read(8, deadline))
        return pickle.loads(self._read(size, deadline))   # a few bytes objects: milliseconds under the GIL

    def _send(self, obj: object) -> None:
        try:
            regex_child.write_message(self.proc.stdin, obj)
        except (BrokenPipeError, OSError):
            raise _ChildGone("the compiler process died") from None

    def _read(self, size: int, deadline: float) -> bytes:
        fd, chunks, got = self.proc.stdout.fileno(), [], 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size - got, 1 << 20))
            if not chunk:
                raise _ChildGone("the compiler process died")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ConstraintCompiler:
    """Turns a request's ``response_format`` into a :class:`Constraint` for one tokenizer, within a budget.

    timeout_s: wall time one compile may take; memory_mb: the child's address-space limit; max_transitions:
    the largest automaton accepted (``{"type": "json_object"}`` has ~0.8M on a 49k vocabulary); processes:
    compiles that run at once; max_waiting: compiles that may wait for a process (more: CompilerBusy).
    max_held_transitions: the token transitions that the compiled constraints in memory, cached or in use by
    requests, may hold together (8 bytes each in this process, as flat arrays: 16M is ~130 MB, plus up to
    MAX_MASKS token masks per constraint, ~3 MB at a 49k vocabulary); the cache keeps at most half of it, and
    while they hold it all a new compile is CompilerBusy. Without it, 64 cached constraints of 3M transitions
    each (a schema of 60 string properties: a 2 KB request) held 22 GB when a transition took ~116 bytes as
    Python dicts (1.5 GB as arrays). Errors: InvalidArgumentError (invalid, unsupported or over budget: a 400).
    """

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, timeout_s: float = 10.0, memory_mb: int = 4096,
                 max_transitions: int = 4_000_000, processes: int = 2, max_waiting: int = 8,
                 cache_size: int = 64, max_held_transitions: int = 16_000_000):
        if timeout_s <= 0 or memory_mb < 256 or max_transitions < 1 or processes < 1 or max_waiting < 0 \
                or max_held_transitions < 1:
            raise InvalidArgumentError("compile budget: timeout_s > 0, memory_mb >= 256, max_transitions >= 1, "
                                       "processes >= 1, max_waiting >= 0 and max_held_transitions >= 1")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.timeout_s, self.memory_mb, self.max_transitions = timeout_s, memory_mb, max_transitions
        self.processes, self.max_waiting, self.cache_size = processes, max_waiting, cache_size
        self.max_held_transitions = max_held_transitions
        self._held: weakref.WeakSet[Constraint] = weakref.WeakSet()   # every compiled constraint still alive
        self._cache: collections.OrderedDict[tuple[str, str], Constraint | InvalidArgumentError] = \
            collections.OrderedDict()
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="tachy-compile")
        self._closed = False

    # -- the API ---------------------------------------------------------------------------------------------
    def cached(self, response_format: dict | str) -> tuple[bool, Constraint | None]:
        """(found, constraint) without compiling: found is True for plain text and for cached patterns;
        a cached refusal raises its InvalidArgumentError again."""
        source = response_format_source(response_format)
        if source is None:
            return True, None
        with self._lock:
            if source not in self._cache:
                return False, None
            self._cache.move_to_end(source)
            return True, _unwrap(self._cache[source])

    def submit(self, response_format: dict | str) -> Future:
        """Compile on one of the pool's threads (each drives one child); the future holds the Constraint
        (or None for plain text) or the error. CompilerBusy at once when the line is full."""
        source = response_format_source(response_format)
        with self._lock:
            if self._closed:
                raise CompilerBusy("the server is shutting down")
            if self._pending >= self.processes + self.max_waiting:
                raise CompilerBusy(f"{self._pending} structured-output constraints are compiling or waiting; "
                                   f"retry later")
            held = sum(c.size for c in self._held)
            if held >= self.max_held_transitions:
                raise CompilerBusy(f"the structured-output constraints in memory hold {held} token transitions, "
                                   f"the limit is {self.max_held_transitions}; retry later")
            self._pending += 1
        future = self._pool.submit(self._compile, source)
        future.add_done_callback(self._done)
        return future

    def constraint(self, response_format: dict | str) -> Constraint | None:
        """Compile now, on the caller's thread (blocking, within the budget)."""
        found, constraint = self.cached(response_format)
        return constraint if found else self.submit(response_format).result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- inside the pool -------------------------------------------------------------------------------------
    def _done(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _compile(self, source: tuple[str, str] | None) -> Constraint | None:
        if source is None:
            return None
        with self._lock:
            if source in self._cache:
                return _unwrap(self._cache[source])
        eos = eos_ids(self.tokenizer)
        try:
            result = Constraint(self._ask_child(source), eos, self.vocab_size)
        except InvalidArgumentError as e:
            result = e
        with self._lock:
            if isinstance(result, Constraint):
                self._held.add(result)
            self._cache[source] = result
            while len(self._cache) > self.cache_size or self._cached_transitions() > self.max_held_transitions // 2:
                self._cache.popitem(last=False)
        return _unwrap(result)

    def _cached_transitions(self) -> int:
        return sum(c.size for c in self._cache.values() if isinstance(c, Constraint))

    def _ask_child(self, source: tuple[str, str]) -> tuple:
        with self._lock:
            child = self._idle.pop() if self._idle else None
        if child is None:
            setup = (eos_ids(self.tokenizer)[0], vocabulary(self.tokenizer, self.vocab_size), WHITESPACE,
                     self.max_transitions, self.memory_mb << 20)
            child = _Child(setup)
        try:
            status, payload = child.ask(source, self.timeout_s)
        except TimeoutError:
            child.kill()
            raise InvalidArgumentError(
                f"the response_format {source[0]} did not compile within {self.timeout_s:g} s (its automaton "
                f"grows too fast: nested or large counted repetitions?); simplify it") from None
        except _ChildGone:
            child.kill()
            raise InvalidArgumentError(
                f"compiling the response_format {source[0]} ran out of its {self.memory_mb} MB memory budget; "
                f"simplify it") from None
        with self._lock:
            if self._closed:
                child.kill()
            else:
                self._idle.append(child)
        if status == "ok":
            return payload
        if status == "too_large":
            raise InvalidArgumentError(f"{payload}; simplify the response_format {source[0]}")
        raise compile_error(*source, payload)


def _unwrap(result: Constraint | InvalidArgumentError | None) -> Constraint | None:
    if isinstance(result, InvalidArgumentError):
        raise InvalidArgumentError(str(result))
    return result
