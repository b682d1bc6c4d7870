"""Continuous batching: several independent generations share one target forward per step.

Decode on a CPU is bound by the bytes of weights read, and a forward over B sequences reads them once: B rows
cost little more than one, so serving B requests together multiplies aggregate tokens/s (the server's
scheduler uses this when requests overlap, server/scheduler.py).

* A sequence **joins** between steps: its prompt is prefilled alone (``Engine._prefill`` into its own cache,
  the same as a lone generation), its first token chosen, and its keys copied into a free row of a
  :class:`~tachy.cache.BatchKVCache` (grown to the longest row's need).
* Each **step** runs ONE forward over the active rows (one token each, at each row's own position and length)
  and then picks every row's next token with its own config: logits processor (penalties, strategy
  processors, structured output, watermark), greedy or sampled with its own generator; its own text stream
  (EOS, token budget, stop strings; ``engine.TextStream``).
* A row **leaves** when it finishes or is removed (a cancelled request): its cache row is free at once.

Rows decode plainly (no drafts). Exactness: a row's attention reads its own ``key_bucket(length + 1)`` keys
and the linear layers are row-invariant (models/quant.py), so greedy output inside a batch is token for token
the output of the request decoded alone, and a seeded sampling row draws from its generator exactly as a lone
plain (``drafter="none"``) generation does. Configs that drive the model otherwise (a search strategy, a
press, a prediction) cannot be rows (:func:`batchable`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .cache import BatchKVCache
from .decoding import GenerationConfig
from .engine import Engine, TextStream
from .generation import GenerationResponse, GenerationStats, Step
from .errors import InvalidArgumentError
from .speculative.tree import DraftTree
from .speculative.verify import verify_greedy, verify_sampling

Event = tuple["Row", GenerationResponse]


def batchable(config: GenerationConfig) -> bool:
    """Whether a generation can be a batch row: plain next-token decoding (the drafter is ignored)."""
    return not config.decoding.is_search and config.press is None and config.prediction is None


@dataclass
class Row:
    """One generation inside the batch. ``tag`` is the caller's (the scheduler's job and choice index)."""

    tag: object
    config: GenerationConfig
    ids: list[int]
    stats: GenerationStats
    text: TextStream
    processor: object
    probs_fn: object
    generator: torch.Generator | None
    slot: int = -1          # cache row, -1 once left
    root: int = 0           # the last chosen token: the next forward's input
    limit: int = 0          # cache length at which the context window is full
    done: bool = False


class BatchDecoder:
    """Up to ``max_batch`` plain generations on ``engine``, stepped together (see the module docstring)."""

    def __init__(self, engine: Engine, max_batch: int = 8):
        if max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.rows: list[Row] = []           # active rows, in join order
        self.cache: BatchKVCache | None = None

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    @torch.inference_mode()
    def add(self, prompt_ids: Sequence[int], config: GenerationConfig, tag: object = None) -> list[Event]:
        """Prefill one generation and pick its first token; returns that token's piece (if any is sendable).
        The row then takes part in the following steps unless it already finished."""
        engine = self.engine
        if not self.free:
            raise InvalidArgumentError(f"the batch is full ({self.max_batch} rows)")
        if not batchable(config):
            raise InvalidArgumentError("search strategies, presses and predictions cannot run in a batch")
        prompt_ids = engine.check_prompt(prompt_ids)
        engine.warmup(1)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        row = Row(tag, config, list(prompt_ids), stats, TextStream(engine.tokenizer, config, stats),
                  *engine.token_choice(config, prompt_ids))
        start = time.perf_counter()
        # the cache a lone generation would prefill into (same capacity, hence the same bits)
        capacity = engine.cache_capacity(len(prompt_ids), config.max_new_tokens)
        single = engine.model.new_cache(capacity=capacity, fixed=True)
        logits = engine._prefill(row.ids, single)
        row.root = engine._choose(logits, row.ids, row.processor, row.probs_fn, row.generator)
        row.ids.append(row.root)
        row.limit = engine.max_context - 1
        stats.prefill_s = time.perf_counter() - start
        stats.generated_tokens = 1
        events = self._emit(row, Step([row.root], 0, 0))
        if not row.done and not self._budget_left(row, single.length):
            events += self._finish(row)
        if row.done:
            return events
        self._place(row, single)
        return events

    def remove(self, row: Row) -> None:
        """Drop a row (a cancelled request); its cache row is free for the next join."""
        if row in self.rows:
            self.rows.remove(row)
        row.slot, row.done = -1, True

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One forward over every active row; returns the pieces it made sendable (finished rows leave)."""
        if not self.rows:
            return []
        engine, cache, rows = self.engine, self.cache, list(self.rows)
        start = time.perf_counter()
        cache.rows = [r.slot for r in rows]
        positions = torch.tensor([cache.lengths[r.slot] for r in rows], device=engine.device)
        tokens = torch.tensor([[r.root] for r in rows], device=engine.device)
        logits = engine.model(tokens, positions, cache)     # [B, 1, V]
        empty = DraftTree.empty()
        elapsed = time.perf_counter() - start
        events: list[Event] = []
        for b, row in enumerate(rows):
            t = time.perf_counter()
            row_logits = logits[b]
            if row.processor is not None:  # the same calls as the engine's loop with an empty draft
                row_logits = row.processor(row_logits, empty.row_contexts(torch.tensor(row.ids, device=engine.device)))
            if row.probs_fn is None:
                _, token = verify_greedy(empty, row_logits)
            else:
                _, token = verify_sampling(empty, row.probs_fn(row_logits), row.generator)
            row.root = token
            row.ids.append(token)
            row.stats.forwards += 1
            row.stats.generated_tokens += 1
            row.stats.decode_s += elapsed + time.perf_counter() - t
            events += self._emit(row, Step([token], 0, 0))
            if not row.done and not self._budget_left(row, cache.lengths[row.slot]):
                events += self._finish(row)
        return events

    # -- internals --------------------------------------------------------------------------------------------
    def _budget_left(self, row: Row, length: int) -> bool:
        """The engine's loop condition: room in the context window and in the token budget."""
        return length + 1 < self.engine.max_context and row.stats.generated_tokens < row.config.max_new_tokens

    def _emit(self, row: Row, step: Step) -> list[Event]:
        piece = row.text.push(step)
        if piece is None:
            return []
        if piece.finish_reason is not None:
            self.remove(row)
        return [(row, piece)]

    def _finish(self, row: Row) -> list[Event]:
        """The steps ran out (context window full) before the text stream finished."""
        self.remove(row)
        return [(row, row.text.end())]

    def _place(self, row: Row, single) -> None:
        """Copy a prefilled sequence into a free cache row (growing the cache to the row's whole need)."""
        engine = self.engine
        need = engine.cache_capacity(single.length, row.config.max_new_tokens)
        if self.cache is None:
            cfg = engine.config
            self.cache = BatchKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, need, self.max_batch,
                                      dtype=engine.model.dtype, device=engine.device)
        self.cache.grow(need)
        used = {r.slot for r in self.rows}
        row.slot = next(s for s in range(self.max_batch) if s not in used)
        self.cache.load(row.slot, single)
        self.rows.append(row)
