"""Two-stream contrastive methods: each step runs the model on two inputs and decodes from a mix of the logits.

* Contrastive decoding (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as Optimization"):
  expert = the model, amateur = a weaker model of the same tokenizer. Among the plausible tokens
  ``V_head = {v : p_exp(v) >= alpha * max p_exp}`` choose ``argmax log p_exp(v) - log p_ama(v)`` (the
  amateur's logits divided by ``amateur_temperature``). Without a small sibling model the amateur is the
  target truncated to its first ``amateur_layers`` layers (shared weights, its own cache; an early-exit
  amateur as in DoLa), built by ``truncated_model`` without copying weights.
* Context-aware decoding (Shi et al. 2023, "Trusting Your Evidence: Hallucinate Less with Context-aware
  Decoding"): the same model with and without the ``context``;
  ``logits = (1 + alpha) * logits(y | context, x) - alpha * logits(y | x)``, then greedy or sampling as
  configured. The prompt must contain the context text; the second stream's prompt is the prompt with the
  context removed.

Both streams keep their own KV cache and see the same generated tokens; one token per step (streams).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..generation import Step
from ..sampling import sample
from .base import Strategy, eos_ids, prefill, register
from .structured import make_structured_processor


def truncated_model(model, num_layers: int):
    """A view of ``model`` that runs only its first ``num_layers`` layers, then the final norm and head
    (weights shared, nothing copied; the original is untouched)."""
    if not 1 <= num_layers <= model.config.num_layers:
        raise InvalidArgumentError(f"amateur_layers must be in 1..{model.config.num_layers}, got {num_layers}")
    view = copy.copy(model)
    view._modules = dict(model._modules)     # copy.copy shares the module dict: give the view its own
    view.layers = nn.ModuleList(list(model.layers)[:num_layers])
    view.config = replace(model.config, num_layers=num_layers, layer_types=model.config.layer_types[:num_layers])
    view.cpu_forward = None   # the C forward runs every layer of the original: on the view's smaller cache it
    return view               # wrote past the end (heap corruption, the process aborted)


@dataclass
class _TwoStreams(Strategy):
    """Base of the two-stream methods: subclasses give the second stream and the mixing rule."""

    def streams(self, engine, prompt_ids: list[int]) -> tuple[object, list[int]]:
        """(model, prompt ids) of the second stream."""
        raise NotImplementedError

    def mix(self, main: Tensor, other: Tensor) -> Tensor:
        """Logits [1, V] of the two streams -> the logits to decode from [1, V]."""
        raise NotImplementedError

    def search(self, engine, prompt_ids, config, stats) -> Iterator:

        other_model, other_prompt = self.streams(engine, prompt_ids)
        eos = set(eos_ids(engine, config))
        max_new = min(config.max_new_tokens, engine.max_context - max(len(prompt_ids), len(other_prompt)) - 1)
        processor, probs_fn, generator = engine.token_choice(config, prompt_ids)
        constrain = make_structured_processor(engine, config, prompt_ids)   # before the mix: its cut-offs
        start = time.perf_counter()                                         # then count allowed tokens only
        runs = []
        for model, ids in ((engine.model, prompt_ids), (other_model, other_prompt)):
            cache = model.new_cache(capacity=len(ids) + max_new, fixed=False)
            runs.append((model, cache, prefill(model, ids, cache)))
        logits = [r[2] for r in runs]
        stats.prompt_tokens = len(prompt_ids)
        stats.prefill_s = time.perf_counter() - start
        ids = list(prompt_ids)
        for step in range(max_new):
            t = time.perf_counter()
            main = logits[0] if constrain is None else constrain(logits[0], ids)
            mixed = self.mix(main, logits[1])
            if processor is not None:
                mixed = processor(mixed, ids)
            token = int(mixed.argmax(-1)) if probs_fn is None else int(sample(probs_fn(mixed), generator))
            ids.append(token)
            stats.generated_tokens = step + 1
            if step:
                stats.forwards += 1
                stats.decode_s += time.perf_counter() - t
            yield Step([token], 0, 0)
            if token in eos or step + 1 == max_new:
                return
            t = time.perf_counter()
            tok = torch.tensor([[token]], device=engine.device)
            logits = [model(tok, torch.tensor([cache.length], device=engine.device), cache)[0]
                      for model, cache, _ in runs]
            stats.decode_s += time.perf_counter() - t


@register
@dataclass
class ContrastiveDecoding(_TwoStreams):
    """Contrastive decoding. alpha: plausibility cut-off relative to the top probability (0.1);
    amateur_layers: layers of the truncated amateur (default: a quarter of the model's, at least 1);
    amateur_temperature: divides the amateur's logits (1.0; the paper uses 0.5 with a small model).
    Deterministic (greedy over the contrastive score)."""

    name: ClassVar[str] = "contrastive_decoding"
    allows_sampling: ClassVar[bool] = False
    alpha: float = 0.1
    amateur_layers: int | None = None
    amateur_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise InvalidArgumentError(f"contrastive decoding alpha must be in (0, 1], got {self.alpha}")
        if not self.amateur_temperature > 0:
            raise InvalidArgumentError(f"amateur_temperature must be > 0, got {self.amateur_temperature}")

    def streams(self, engine, prompt_ids):
        layers = self.amateur_layers or max(1, engine.model.config.num_layers // 4)
        return truncated_model(engine.model, layers), prompt_ids

    def mix(self, main: Tensor, other: Tensor) -> Tensor:
        expert = torch.log_softmax(main.float(), dim=-1)
        amateur = torch.log_softmax(other.float() / self.amateur_temperature, dim=-1)
        plausible = expert >= expert.max(dim=-1, keepdim=True).values + math.log(self.alpha)
        return (expert - amateur).masked_fill(~plausible, float("-inf"))


@register
@dataclass
class ContextAwareDecoding(_TwoStreams):
    """Context-aware decoding. context: the evidence text, contained in the prompt (required);
    alpha: how much more to trust the context (0.5)."""

    name: ClassVar[str] = "context_aware"
    context: str = ""
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not self.context:
            raise InvalidArgumentError("context_aware needs strategy_options={'context': <the evidence text>}")
        if self.alpha < 0:
            raise InvalidArgumentError(f"context_aware alpha must be >= 0, got {self.alpha}")

    def streams(self, engine, prompt_ids):
        tok = engine.tokenizer
        text = tok.decode(prompt_ids)
        if self.context not in text:
            raise InvalidArgumentError("context_aware: the prompt does not contain the given context text")
        without = tok.encode(text.replace(self.context, "", 1), add_special_tokens=False)
        return engine.model, without or prompt_ids[:1]

    def mix(self, main: Tensor, other: Tensor) -> Tensor:
        return (1 + self.alpha) * main - self.alpha * other
