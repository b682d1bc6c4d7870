"""GenerationConfig: everything that shapes one generation, checked when it is made, and the chain of logits
processors it asks for.

It sits above the rest of tachy.decoding because checking it builds the decoding strategy and checks the
structured-output and watermark options; the engine reads it, and nothing below imports it but for types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from ..context.ape import APEConfig
from ..errors import InvalidArgumentError
from ..presses import Press, make_press
from ..sparse import SparseAttention, make_attention
from ..sampling import LogitsProcessor, SamplingConfig, chain, make_logits_processor
from ..speculative.drafters import Drafter
from .base import Strategy, make_strategy
from .structured import check_response_format, make_structured_processor
from .watermark import check_watermark, make_watermark_processor

if TYPE_CHECKING:
    from ..engine import Engine


@dataclass
class GenerationConfig:
    """Everything that shapes one generation. Sampling fields are validated by SamplingConfig."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit before choosing (OpenAI's)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    drafter: str | Drafter | None = "default"   # None or "none": plain decoding
    max_draft_tokens: int = 16                   # draft tree node budget per step
    # decoding toolbox (tachy.decoding): a strategy by name with its options, a JSON-schema/regex constraint
    # ({"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": ...}} / {"type": "regex",
    # "regex": ...}) and a green-list watermark (True or {"gamma": .., "delta": .., "key": ..})
    strategy: str = "default"
    strategy_options: dict = field(default_factory=dict)
    response_format: dict | None = None
    watermark: bool | dict | None = None
    prediction: str | list[int] | None = None    # expected output (Predicted Outputs): drafted from, losslessly
    logprobs: int | None = None                  # per-token log-probabilities with this many alternatives
    press: str | Press | None = None             # KV-cache compression after prefill (tachy.presses)
    compression_ratio: float = 0.0               # fraction of the prompt's KV the press removes
    attention: str | SparseAttention | None = None   # sparse attention (tachy.sparse), e.g. "quest", "minference"
    prefix_cache: bool = True                    # reuse K/V of earlier prompts/turns (tachy.prefix_cache)
    # APE (tachy.context.ape): retrieved passages, token ids, encoded one by one; they go between the prompt's
    # first ``passages_at`` tokens (the shared prefix) and the rest (the question)
    passages: list[list[int]] | None = None
    passages_at: int = 0
    ape_temperature: float = 0.9
    ape_scale: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_draft_tokens < 0:
            raise InvalidArgumentError(f"max_draft_tokens must be >= 0, got {self.max_draft_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.press == "none":
            self.press = None
        if isinstance(self.press, str):   # a Press object carries its own ratio
            self.press = make_press(self.press, self.compression_ratio)
        elif self.press is None and self.compression_ratio:
            raise InvalidArgumentError("compression_ratio needs a press (see tachy.presses.available_presses())")
        if isinstance(self.attention, str):
            self.attention = make_attention(self.attention)
        if self.attention is not None:
            self.attention.check_draft(self.max_draft_tokens)
        self.sampling = SamplingConfig(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            typical_p=self.typical_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            logit_bias=self.logit_bias)
        self.decoding = check_config(self)
        if self.passages is not None and (self.decoding.is_search or self.press is not None
                                          or self.prediction is not None):
            raise InvalidArgumentError("passages (APE) cannot be combined with a search strategy, a press or a "
                                       "prediction")
        self.ape = None if self.passages is None else APEConfig(self.ape_temperature, self.ape_scale)
        if self.passages is not None:
            check_passages(self.passages, self.passages_at)


def check_config(config: GenerationConfig) -> Strategy:
    """Build and validate the strategy of a GenerationConfig (called from its ``__post_init__``)."""
    strategy = config.strategy if isinstance(config.strategy, Strategy) else make_strategy(
        config.strategy, **(config.strategy_options or {}))
    strategy.check(config)
    if config.attention is not None and strategy.is_search:
        raise InvalidArgumentError(f"sparse attention is not available with the {strategy.name!r} strategy")
    if config.logprobs is not None:
        if not isinstance(config.logprobs, int) or not 0 <= config.logprobs <= 20:
            raise InvalidArgumentError(f"logprobs must be an integer in [0, 20] (alternatives per token), "
                                       f"got {config.logprobs!r}")
        if strategy.is_search:
            raise InvalidArgumentError(f"logprobs are not available with the {strategy.name!r} strategy")
    check_response_format(config.response_format)
    check_watermark(config.watermark)
    return strategy


def check_passages(passages, passages_at) -> None:
    """APE's inputs, with errors that say what to pass (the engine takes token ids; the server encodes text)."""
    if not isinstance(passages, (list, tuple)) or not passages or not all(
            isinstance(p, (list, tuple)) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in passages):
        raise InvalidArgumentError("passages must be a non-empty list of non-empty token-id lists, e.g. "
                                   "[engine.tokenizer.encode(text, add_special_tokens=False) for text in texts]")
    if isinstance(passages_at, bool) or not isinstance(passages_at, int) or passages_at < 1:
        raise InvalidArgumentError(f"passages_at must be the number of prompt tokens before the passages (the "
                                   f"shared prefix, at least 1), got {passages_at!r}")


def logits_processor(engine: Engine, config: GenerationConfig,
                     prompt_ids: Sequence[int]) -> LogitsProcessor | None:
    """Everything that edits logits for one generation: sampling penalties, the structured-output mask, the
    strategy's processor, the watermark bias. The mask comes before the strategy, which then chooses among
    the allowed tokens only (mirostat's surprise bound or FSD's top k could otherwise keep none of them), and
    again after it, so that nothing re-enables a forbidden token."""
    structured = make_structured_processor(engine, config, prompt_ids)
    strategy = config.decoding.processor(engine, config, prompt_ids)
    return chain(make_logits_processor(config.sampling), structured, strategy,
                 make_watermark_processor(config.watermark), structured if strategy is not None else None)
