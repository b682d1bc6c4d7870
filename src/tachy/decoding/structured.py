"""Structured output: constrain generation to a JSON schema or a regular expression by masking logits.

The automaton is outlines-core's (Rust): a regex (from ``build_regex_from_schema`` for a schema) is compiled
against the tokenizer's vocabulary into an ``Index``, a DFA whose transitions are whole tokens; a state's
allowed tokens are those that keep the text a prefix of some match, and EOS is allowed in accepting states.

The mask is a pure function of each row's own context (the generated tokens after the prompt), so the
processor works unchanged in speculative verification: a draft token the constraint forbids gets logit
-inf and is rejected like any other mismatch, i.e. drafts are masked and the output stays exactly the
constrained distribution. States are memoized per generated prefix, so a step costs one DFA transition.

Termination within the token budget: every state knows the fewest tokens to an accepting state (a backwards
breadth-first search over the Index, run where it is compiled: regex_child.dense_automaton); once the budget
runs low only tokens that can still finish in time are allowed, so a constrained generation always closes its
JSON before ``max_new_tokens`` (if the budget allows it at all).

``response_format`` (OpenAI's shape): ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema",
"json_schema": {"schema": {...}}}`` (or the schema directly under ``"schema"``), or ``{"type": "regex",
"regex": "..."}``; a plain string is taken as a regex.
"""
from __future__ import annotations

import json
from bisect import bisect_left
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from outlines_core.json_schema import build_regex_from_schema
from torch import Tensor

from ..errors import InvalidArgumentError
from ..sampling import LogitsProcessor
from .base import row_contexts
from .regex_child import ARRAYS, compile_automaton, source_regex

if TYPE_CHECKING:
    from ..engine import Engine
    from .config import GenerationConfig
    from ..tokenizer import Tokenizer

# What {"type": "json_object"} means here: a JSON object whose values are scalars, or arrays / objects of
# scalars (a regex cannot count brackets, so nesting is bounded; two levels compile in 0.6 s against a 49k
# vocabulary, outlines' own three-level {"type": "object"} takes 17 s).
_SCALARS = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
JSON_OBJECT_SCHEMA = {"type": "object", "additionalProperties": {"anyOf": _SCALARS + [
    {"type": "array", "items": {"anyOf": _SCALARS}},
    {"type": "object", "additionalProperties": {"anyOf": _SCALARS}}]}}
WHITESPACE = r"[ ]?"   # between JSON tokens: at most one space (no runaway whitespace from a small model)


MAX_PATTERN_CHARS = 100_000   # a regex or schema text longer than this is refused before any compiling
# masks a Constraint keeps (~3 MB at a 49k vocabulary): a pattern that enters a new state at every token kept a
# 49 KB mask per generated token, for as long as the constraint lived (a server caches 64 constraints); a mask
# is rebuilt in ~35 us (smollm2's vocabulary), against a decode step's ~4 ms
MAX_MASKS = 64


def response_format_source(response_format: dict | str) -> tuple[str, str] | None:
    """What a response_format asks for, as ("regex", pattern) or ("schema", JSON text); None for plain text.

    Only the shape is checked here, in microseconds; whether the pattern compiles (and how long that takes)
    is the compiler's business: in process for library calls, in a child process with a budget in the server
    (constraint_compiler.py). InvalidArgumentError if the shape is wrong.
    """
    if isinstance(response_format, str):
        source = ("regex", response_format)
    elif not isinstance(response_format, dict) or "type" not in response_format:
        raise InvalidArgumentError(f"response_format must be a dict with a 'type' (json_object, json_schema or "
                                   f"regex) or a regex string, got {str(response_format)[:200]!r}")
    elif response_format["type"] == "json_object":
        source = ("schema", json.dumps(JSON_OBJECT_SCHEMA))
    elif response_format["type"] in ("json_schema", "json_schema_or_text"):   # the latter: tool calls' "auto"
        holder = response_format.get("json_schema", response_format)
        schema = holder.get("schema") if isinstance(holder, dict) else None
        if schema is None:
            raise InvalidArgumentError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        kind = "schema" if response_format["type"] == "json_schema" else "schema_or_text"
        source = (kind, _schema_text(schema))
    elif response_format["type"] == "regex":
        regex = response_format.get("regex")
        if not isinstance(regex, str):
            raise InvalidArgumentError("response_format regex needs {'type': 'regex', 'regex': '...'}")
        source = ("regex", regex)
    elif response_format["type"] == "text":
        return None
    else:
        raise InvalidArgumentError(f"unknown response_format type {str(response_format['type'])[:80]!r}; "
                                   f"use json_object, json_schema or regex")
    if not source[1]:
        return None
    if len(source[1]) > MAX_PATTERN_CHARS:
        raise InvalidArgumentError(f"the response_format {source[0]} has {len(source[1])} characters, over the "
                                   f"limit of {MAX_PATTERN_CHARS}")
    return source


def _schema_text(schema: dict | str) -> str:
    try:
        value = json.loads(schema) if isinstance(schema, str) else schema
        if not isinstance(value, dict):
            raise ValueError("a JSON schema is an object")
        return schema if isinstance(schema, str) else json.dumps(schema)
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidArgumentError(f"invalid JSON schema: {e}") from None


def schema_regex(schema: dict | str) -> str:
    """A JSON schema (dict or JSON text) -> the regex outlines-core builds for it (whitespace: WHITESPACE)."""
    try:
        return build_regex_from_schema(_schema_text(schema), WHITESPACE)
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"invalid JSON schema: {e}") from None


def response_format_regex(response_format: dict | str) -> str:
    """The regular expression a response_format stands for ("" for plain text)."""
    source = response_format_source(response_format)
    if source is None:
        return ""
    if source[0] == "regex":
        return source[1]
    try:
        return source_regex(*source, WHITESPACE)
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"invalid JSON schema: {e}") from None


def check_response_format(response_format: "dict | str | Constraint | None") -> None:
    """Validate the shape early (GenerationConfig); the pattern itself is checked when it is compiled."""
    if response_format is not None and not isinstance(response_format, Constraint):
        response_format_source(response_format)


def compile_error(kind: str, text: str, message: str) -> InvalidArgumentError:
    """The error a client sees for a pattern outlines-core refused."""
    if kind != "regex":
        return InvalidArgumentError(f"invalid JSON schema (or one outlines-core does not support): {message}")
    return InvalidArgumentError(f"invalid or unsupported regular expression {text[:80]!r}: {message}")


# ---------------------------------------------------------------------------------------------- vocabulary

def token_bytes(tokenizer: "Tokenizer") -> list[bytes | None]:
    """The bytes each token id stands for (None for special/added tokens, which constraints never allow).

    Byte-level BPE (GPT-2 style) spells bytes as printable characters; SentencePiece-style vocabularies use
    ``▁`` for a space and ``<0xNN>`` byte-fallback tokens.
    """
    backend = tokenizer.backend
    special = set(backend.get_added_tokens_decoder())
    byte_level = "ByteLevel" in type(backend.decoder).__name__ or "ByteLevel" in str(backend.decoder)
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        piece = backend.id_to_token(i)
        if piece is None or i in special:
            out.append(None)
        elif byte_level:
            try:
                out.append(bytes(inverse[c] for c in piece))
            except KeyError:
                out.append(piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def eos_ids(tokenizer: "Tokenizer") -> list[int]:
    if not tokenizer.eos_token_ids:
        raise InvalidArgumentError("structured output needs a tokenizer with an EOS token")
    return list(tokenizer.eos_token_ids)


@lru_cache(maxsize=4)
def vocabulary(tokenizer: "Tokenizer", vocab_size: int) -> dict[bytes, list[int]]:
    """bytes -> token ids, for outlines-core (empty and special tokens left out: they could loop forever
    without progress)."""
    table: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tokenizer)[:vocab_size]):
        if b:
            table.setdefault(b, []).append(i)
    return table


class Constraint:
    """A compiled regex over one tokenizer's vocabulary: states, allowed-token masks and distances to the end.

    The automaton is held as regex_child.dense_automaton's flat arrays (states 0..S-1, ~8 bytes per token
    transition, read without a copy), so that a server holds many and receives each from its compiler child
    in milliseconds. Shapes: ``mask(state)`` -> BoolTensor [V] (True = allowed), V = the model's vocabulary
    (logits width).
    """

    def __init__(self, automaton: dict[str, int | bytes], eos: Sequence[int], vocab_size: int):
        self.eos, self.vocab_size = list(eos), vocab_size
        self.initial: int = automaton["initial"]
        arrays = {name: np.frombuffer(automaton[name], dtype=code) for name, code in ARRAYS.items()}
        self.offsets, self.tokens, self.targets = arrays["offsets"], arrays["tokens"], arrays["targets"]
        self.finals, self.distance = arrays["finals"].view(np.bool_), arrays["distance"]
        # the same bytes as memoryviews: next_state's binary search (bisect) reads Python ints from them
        self._offsets, self._tokens, self._targets = (memoryview(automaton[name]).cast(ARRAYS[name])
                                                      for name in ("offsets", "tokens", "targets"))
        self.size = len(self.tokens)   # token transitions
        self._eos = np.array(self.eos, dtype=np.int64)
        self._masks: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def compile(cls, source: tuple[str, str], tokenizer: "Tokenizer", vocab_size: int) -> "Constraint":
        """Compile in this process (library calls; the server compiles in a child: constraint_compiler.py)."""
        eos = eos_ids(tokenizer)
        try:
            automaton = compile_automaton(*source, eos[0], vocabulary(tokenizer, vocab_size), WHITESPACE)
        except (ValueError, TypeError) as e:
            raise compile_error(*source, str(e)) from None
        return cls(automaton, eos, vocab_size)

    def next_state(self, state: int | None, token: int) -> int | None:
        """The state after ``token``; None once the text left the language (or after EOS)."""
        if state is None or not 0 <= state < len(self.finals):
            return None
        lo, hi = self._offsets[state], self._offsets[state + 1]
        i = bisect_left(self._tokens, token, lo, hi)
        return self._targets[i] if i < hi and self._tokens[i] == token else None

    def mask(self, state: int | None, budget: int) -> Tensor:
        """Allowed next tokens in ``state`` when ``budget`` tokens remain, this one included: a token is allowed
        if its next state can still reach an accepting state within ``budget - 1`` tokens (EOS need not fit:
        an accepting state at the budget's end is a complete match)."""
        if state is None:   # left the language (cannot happen through the mask): only EOS
            key = (-1, 0)
        else:
            lo, hi = self._offsets[state], self._offsets[state + 1]
            reach = self.distance[self.targets[lo:hi]]   # each edge's next state's distance to the end
            worst = int(reach.max()) if hi > lo else 0
            key = (state, min(budget, worst + 1))   # budgets above this all give the same mask
        if key not in self._masks:
            if len(self._masks) >= MAX_MASKS:
                del self._masks[next(iter(self._masks))]   # the oldest; a mask is rebuilt when needed again
            if state is None:
                ids = self._eos
            else:
                tokens = self.tokens[lo:hi]
                inside = tokens < self.vocab_size
                ids = tokens[inside & (reach <= max(key[1], 0) - 1) & ~np.isin(tokens, self._eos)]
                if self.finals[state]:
                    ids = np.concatenate([ids, self._eos])
                if not len(ids):   # cannot finish in time whatever we do: walk the shortest way towards the end
                    ids = tokens[(reach == reach.min()) & inside]
            allowed = np.zeros(self.vocab_size, dtype=np.bool_)   # numpy: no intra-op threads to wake
            allowed[ids] = True
            self._masks[key] = torch.from_numpy(allowed)
        return self._masks[key]


class StructuredProcessor:
    """Per-generation processor: each row's state follows its generated tokens (memoized by prefix)."""

    def __init__(self, constraint: Constraint, prompt_len: int, max_new_tokens: int):
        self.constraint, self.start, self.max_new = constraint, prompt_len, max_new_tokens
        self._states: dict[tuple[int, ...], int | None] = {(): constraint.initial}

    def state(self, generated: Sequence[int]) -> int | None:
        key = tuple(generated)
        if key not in self._states:
            self._states[key] = self.constraint.next_state(self.state(key[:-1]), key[-1])
        return self._states[key]

    def __call__(self, logits: Tensor, context) -> Tensor:
        contexts = row_contexts(context, logits.shape[0])
        masks = []
        for ctx in contexts:
            generated = ctx[self.start:]
            budget = self.max_new - len(generated)
            masks.append(self.constraint.mask(self.state(generated), budget))
        mask = torch.stack(masks).to(logits.device)
        if mask.shape[-1] != logits.shape[-1]:
            mask = torch.nn.functional.pad(mask, (0, logits.shape[-1] - mask.shape[-1]), value=False)
        return logits.masked_fill(~mask, float("-inf"))


@lru_cache(maxsize=16)
def _constraint(source: tuple[str, str], tokenizer: "Tokenizer", vocab_size: int) -> Constraint:
    return Constraint.compile(source, tokenizer, vocab_size)


def make_structured_processor(engine: "Engine", config: "GenerationConfig",
                              prompt_ids: Sequence[int]) -> LogitsProcessor | None:
    constraint = config.response_format
    if constraint is None:
        return None
    if not isinstance(constraint, Constraint):
        source = response_format_source(constraint)
        if source is None:
            return None
        constraint = _constraint(source, engine.tokenizer, engine.config.vocab_size)
    return StructuredProcessor(constraint, len(prompt_ids), config.max_new_tokens)
