"""Decoding strategies: the shared base, the registry, and the logits-processor chain every strategy uses.

Two kinds of strategy, told apart by the methods they fill in:

* **processor strategies** (mirostat, FSD) only change the next-token distribution: ``processor()`` returns a
  callable ``(logits [rows, V], contexts) -> logits`` that the engine's ordinary loop applies, in plain and in
  speculative decoding alike (each verify row is processed with its own context, so drafts stay lossless);
* **search strategies** (beam, contrastive search, contrastive decoding, MBR) drive the model themselves:
  ``search()`` yields engine ``Step``s (a beam search commits one step, at the end) and, between forwards that
  commit nothing yet, ``generation.PROGRESS``, where the engine may stop a cancelled generation.

Structured output and the watermark are processors too, but they combine with any strategy, so they are
``GenerationConfig`` fields (``response_format``, ``watermark``) rather than strategies; ``logits_processor``
(config.py) chains them after the sampling penalties.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, UnknownNameError
from ..generation import PREFILL_CHUNK, GenerationStats, Step
from ..sampling import LogitsProcessor
from ..spec import parse_spec

if TYPE_CHECKING:
    from ..engine import Engine
    from .config import GenerationConfig

STRATEGIES: dict[str, type["Strategy"]] = {}


def register(cls: type["Strategy"]) -> type["Strategy"]:
    """Class decorator: add a strategy to ``STRATEGIES`` under its ``name``."""
    STRATEGIES[cls.name] = cls
    return cls


@dataclass
class Strategy:
    """Base of every decoding strategy; subclasses are dataclasses whose fields are the method's knobs."""

    name: ClassVar[str] = "default"
    allows_drafts: ClassVar[bool] = True      # False: state across steps, so no speculative verification
    allows_sampling: ClassVar[bool] = True    # False: the method is deterministic (temperature must be 0)

    def check(self, config: "GenerationConfig") -> None:
        """Reject combinations with the rest of the config that the method cannot honour (raise
        InvalidArgumentError); may turn the default drafter off for methods that cannot use drafts."""
        if not self.allows_sampling and config.temperature > 0:
            raise InvalidArgumentError(f"strategy {self.name!r} is deterministic; use temperature=0")
        if not self.allows_drafts or self.is_search:
            if config.drafter not in (None, "none", "default"):
                raise InvalidArgumentError(f"strategy {self.name!r} cannot run with speculative drafts "
                                           f"(drafter={config.drafter!r}); use drafter='none'")
            config.drafter = None
        if self.is_search and (getattr(config, "press", None) is not None or config.prediction is not None):
            raise InvalidArgumentError(f"strategy {self.name!r} runs its own search loop: KV presses and "
                                       "predictions apply to the default strategy only")

    @property
    def is_search(self) -> bool:
        return type(self).search is not Strategy.search

    def processor(self, engine: "Engine", config: "GenerationConfig",
                  prompt_ids: Sequence[int]) -> LogitsProcessor | None:
        """A fresh per-generation logits processor, or None (default decoding needs none)."""
        return None

    def search(self, engine: "Engine", prompt_ids: list[int], config: "GenerationConfig",
               stats: GenerationStats) -> Iterator[Step]:
        """Drive the model and yield the committed tokens (search strategies only)."""
        raise NotImplementedError


@register
@dataclass
class Default(Strategy):
    """Greedy or sampled decoding per the sampling fields, with speculative drafts (the engine's own loop)."""

    name: ClassVar[str] = "default"


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)


def make_strategy(name: str, **options) -> Strategy:
    """A strategy by registry name with its options (``"beam:num_beams=4"`` form accepted, as for drafters)."""
    if ":" in name:
        name, spec = parse_spec(name)
        options = {**spec, **options}
    cls = STRATEGIES.get(name)
    if cls is None:
        raise UnknownNameError(f"unknown decoding strategy {name!r}; available: {', '.join(available_strategies())}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise InvalidArgumentError(f"strategy {name!r} has no option {', '.join(sorted(unknown))}; "
                                   f"its options: {', '.join(sorted(known)) or 'none'}")
    try:
        return cls(**options)
    except TypeError as e:   # an option of the wrong type (from a request's JSON) failed a comparison
        raise InvalidArgumentError(f"strategy {name!r}: invalid option value ({e})") from None


def row_contexts(context, rows: int) -> list[list[int]]:
    """Per-row contexts as lists of ints, from any shape processors receive (one shared context, a list of
    per-row contexts, a LongTensor [L] or [rows, L]; see sampling.make_logits_processor)."""
    if isinstance(context, Tensor):
        return context.tolist() if context.dim() == 2 else [context.tolist()] * rows
    if len(context) and not isinstance(context[0], numbers.Integral) and not (
            isinstance(context[0], Tensor) and context[0].dim() == 0):
        return [c.tolist() if isinstance(c, Tensor) else list(c) for c in context]
    return [[int(t) for t in context]] * rows


def eos_ids(engine: "Engine", config: "GenerationConfig") -> list[int]:
    """The tokens that end a generation (none with ignore_eos, or for an engine without a tokenizer)."""
    return [] if config.ignore_eos else list(getattr(engine.tokenizer, "eos_token_ids", []) or [])


def prefill(model, prompt_ids: Sequence[int], cache, hidden: bool = False):
    """Forward a prompt in chunks (as the engine does) for any model view (e.g. a truncated amateur).
    Returns the last position's logits [1, V], and with ``hidden`` also every position's final hidden
    states [L, D] (contrastive search compares against them)."""
    states, logits = [], None
    for s in range(0, len(prompt_ids), PREFILL_CHUNK):
        chunk = list(prompt_ids[s:s + PREFILL_CHUNK])
        out = model(torch.tensor([chunk], device=model.device), torch.arange(s, s + len(chunk), device=model.device),
                    cache, last_only=not hidden, return_hidden=hidden)
        if hidden:
            out, h = out
            states.append(h[0])
        logits = out[0, -1:]
    return (logits, torch.cat(states)) if hidden else logits
