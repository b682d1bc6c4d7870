"""Structured output: constrain generation to a JSON schema or a regular expression by masking logits.

The automaton is outlines-core's (Rust): a regex (from ``build_regex_from_schema`` for a schema) is compiled
against the tokenizer's vocabulary into an ``Index``, a DFA whose transitions are whole tokens; a state's
allowed tokens are those that keep the text a prefix of some match, and EOS is allowed in accepting states.

The mask is a pure function of each row's own context (the generated tokens after the prompt), so the
processor works unchanged in speculative verification: a draft token the constraint forbids gets logit
-inf and is rejected like any other mismatch, i.e. drafts are masked and the output stays exactly the
constrained distribution. States are memoized per generated prefix, so a step costs one DFA transition.

Termination within the token budget: every state knows the fewest tokens to an accepting state (a backwards
breadth-first search over the Index); once the budget runs low only tokens that can still finish in time are
allowed, so a constrained generation always closes its JSON before ``max_new_tokens`` (if the budget allows it
at all).

``response_format`` (OpenAI's shape): ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema",
"json_schema": {"schema": {...}}}`` (or the schema directly under ``"schema"``), or ``{"type": "regex",
"regex": "..."}``; a plain string is taken as a regex.
"""
from __future__ import annotations

import json
from collections import deque
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from ..sampling import LogitsProcessor
from .base import row_contexts

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


def _import_outlines():
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError as e:  # pragma: no cover - a core dependency
        raise InvalidArgumentError(f"structured output needs the outlines-core package ({e})") from e
    return outlines_core, build_regex_from_schema


def response_format_regex(response_format: dict | str) -> str:
    """The regular expression a response_format stands for; InvalidArgumentError if it is malformed."""
    if isinstance(response_format, str):
        return response_format
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise InvalidArgumentError(f"response_format must be a dict with a 'type' (json_object, json_schema or "
                                   f"regex) or a regex string, got {response_format!r}")
    kind = response_format["type"]
    if kind == "json_object":
        schema = JSON_OBJECT_SCHEMA
    elif kind == "json_schema":
        holder = response_format.get("json_schema", response_format)
        schema = holder.get("schema") if isinstance(holder, dict) else None
        if schema is None:
            raise InvalidArgumentError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
    elif kind == "regex":
        regex = response_format.get("regex")
        if not isinstance(regex, str):
            raise InvalidArgumentError("response_format regex needs {'type': 'regex', 'regex': '...'}")
        return regex
    elif kind == "text":
        return ""
    else:
        raise InvalidArgumentError(f"unknown response_format type {kind!r}; use json_object, json_schema or regex")
    return schema_regex(schema)


def schema_regex(schema: dict | str) -> str:
    """A JSON schema (dict or JSON text) -> regex; InvalidArgumentError naming the problem if it is invalid."""
    _, build = _import_outlines()
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        if not isinstance(json.loads(text), dict):
            raise ValueError("a JSON schema is an object")
        return build(text, WHITESPACE)
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"invalid JSON schema: {e}") from None


def check_response_format(response_format: dict | str | None) -> None:
    """Validate early (GenerationConfig), so a bad schema or regex fails before any model work."""
    if response_format is None:
        return
    regex = response_format_regex(response_format)
    if regex:
        _check_regex(regex)


@lru_cache(maxsize=64)
def _check_regex(regex: str) -> None:
    outlines_core, _ = _import_outlines()
    try:   # compiling against a one-token vocabulary is a cheap syntax and support check
        outlines_core.Index(regex, outlines_core.Vocabulary(1, {b"a": [0]}))
    except ValueError as e:
        if "token" in str(e).lower() and "error building" not in str(e).lower():
            return   # the regex is fine; it just cannot be written with the dummy vocabulary
        raise InvalidArgumentError(f"invalid or unsupported regular expression {regex!r}: {e}") from None


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


class Constraint:
    """A compiled regex over one tokenizer's vocabulary: states, allowed-token masks and distances to the end.

    Shapes: ``mask(state)`` -> BoolTensor [V] (True = allowed), V = the model's vocabulary (logits width).
    """

    def __init__(self, regex: str, tokenizer: "Tokenizer", vocab_size: int):
        outlines_core, _ = _import_outlines()
        self.eos = list(tokenizer.eos_token_ids)
        if not self.eos:
            raise InvalidArgumentError("structured output needs a tokenizer with an EOS token")
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tokenizer)[:vocab_size]):
            if b:  # empty or special tokens could loop forever without progress
                table.setdefault(b, []).append(i)
        try:
            self.index = outlines_core.Index(regex, outlines_core.Vocabulary(self.eos[0], table))
        except ValueError as e:
            raise InvalidArgumentError(f"cannot compile the constraint {regex[:80]!r}: {e}") from None
        self.vocab_size = vocab_size
        self.initial = self.index.get_initial_state()
        self.transitions: dict[int, dict[int, int]] = self.index.get_transitions()
        self.finals = set(self.index.get_final_states())
        self.distance = self._distances()
        self._masks: dict[tuple[int, int], Tensor] = {}

    def _distances(self) -> dict[int, int]:
        """Fewest tokens from each state to an accepting state (0 for accepting states)."""
        back: dict[int, set[int]] = {}
        for s, edges in self.transitions.items():
            for t in edges.values():
                back.setdefault(t, set()).add(s)
        dist = {s: 0 for s in self.finals}
        todo = deque(self.finals)
        while todo:
            s = todo.popleft()
            for p in back.get(s, ()):
                if p not in dist:
                    dist[p] = dist[s] + 1
                    todo.append(p)
        return dist

    def next_state(self, state: int | None, token: int) -> int | None:
        """The state after ``token``; None once the text left the language (or after EOS)."""
        if state is None:
            return None
        return self.transitions.get(state, {}).get(token)

    def mask(self, state: int | None, budget: int) -> Tensor:
        """Allowed next tokens in ``state`` when ``budget`` tokens remain, this one included: a token is allowed
        if its next state can still reach an accepting state within ``budget - 1`` tokens (EOS need not fit:
        an accepting state at the budget's end is a complete match)."""
        far = 1 << 30
        if state is None:   # left the language (cannot happen through the mask): only EOS
            key = (-1, 0)
        else:
            edges = self.transitions.get(state, {})
            worst = max((self.distance.get(s, far) for s in edges.values()), default=0)
            key = (state, min(budget, worst + 1))   # budgets above this all give the same mask
        if key not in self._masks:
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            if state is None:
                ids = list(self.eos)
            else:
                ids = [t for t, s in edges.items() if t not in self.eos and t < self.vocab_size
                       and self.distance.get(s, far) <= budget - 1]
                if state in self.finals:
                    ids += self.eos
                if not ids:   # cannot finish in time whatever we do: walk the shortest way towards the end
                    best = min(self.distance.get(s, far) for s in edges.values())
                    ids = [t for t, s in edges.items() if self.distance.get(s, far) == best and t < self.vocab_size]
            allowed[torch.tensor(ids, dtype=torch.long)] = True
            self._masks[key] = allowed
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
def _constraint(regex: str, tokenizer: "Tokenizer", vocab_size: int) -> Constraint:
    return Constraint(regex, tokenizer, vocab_size)


def make_structured_processor(engine: "Engine", config: "GenerationConfig",
                              prompt_ids: Sequence[int]) -> LogitsProcessor | None:
    if config.response_format is None:
        return None
    regex = response_format_regex(config.response_format)
    if not regex:
        return None
    constraint = _constraint(regex, engine.tokenizer, engine.config.vocab_size)
    return StructuredProcessor(constraint, len(prompt_ids), config.max_new_tokens)
