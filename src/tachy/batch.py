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
* A row **leaves** when it finishes or is removed (a cancelled request): its cache row is free at once. A row
  whose own work raises (its logits processor, drafter or text stream) leaves alone, its error kept in
  ``BatchDecoder.failed`` for the caller; the other rows go on (a failed forward fails them all).
* A row may be **parked** (preempted) between steps to free its cache row for a waiting request: its K/V is
  copied out and everything else (drafter, text stream, sampler, structured-output state) stays with it;
  **resumed**, it gets a cache row again with those K/V copied back, so its tokens are those it would have
  made without the pause, bit for bit (the server's fairness: a huge ``max_tokens`` cannot hold a row for
  ever while others wait; server/scheduler.py decides when).

Two ways to run the rows:

* **Packed (the default): speculative rows, no padding.** Every row drafts with its own drafter instance, and
  ONE forward runs every row's ``[root] + draft`` tokens packed one after the other, each with its own KV
  write slots and positions (EMS-SD's padding-free layout: no row waits for a longer draft). Each row then
  verifies its own tokens (greedy or speculative sampling), keeps its accepted path in its cache row
  (``BatchKVCache.keep_row``) and moves on by its own number of tokens. A row whose drafter runs a model (a
  draft model, the int4 self-copy, which read one sequence's cache) drafts model-free instead; every row has
  its own drafter state, forked from the engine's drafter of that name (``_row_drafter``). By the forward:

  - **the C forward (models/cpu_forward.py)** takes each row's draft as a tree, with its own tree mask, and
    computes every token as the sequence alone would (row-invariant kernels). A joining prompt is not
    prefilled alone: it is split into chunks that ride in the same forwards as the running rows' tokens
    (DeepSpeed-FastGen's Dynamic SplitFuse), a chunk sized so that it costs about ``prefill_share`` times
    what the running rows' tokens cost (``StepCostFit``), so running streams keep flowing while a long
    prompt is read; with no running row, the prompt goes in chunks of ``PREFILL_CHUNK``.
  - **the PyTorch forward (e.g. CUDA)** is exact along a draft's leading chain only, so a row drafts and
    commits as the lone path on this forward does (``DraftTree.prune_to_spine``, ``commit_exact``): the
    tokens are batch entries of a ``BatchKVCache`` forward, a row's entries at consecutive slots, each
    reading its row's first ``key_bucket(slot + 1)`` keys, the committed ones and of this forward's its path
    (its tree mask), as the lone verify forward does (models/llama.py ``ragged_attention``): every token, a
    side node's too, gets the bits it gets there. A joining row is prefilled alone first, as the lone path
    prefills (the same chunks, hence the same bits).

  Either way each row's greedy output is token for token its lone output, with or without drafts, and a
  sampling row is an exact sample (a seeded one draws as its lone speculative run does).
* **Plain (``packed=False``, for comparison):** rows join after a prefill of their own and decode one token
  per step, no drafts. A row's attention reads its own ``key_bucket(length + 1)`` keys and the linear layers
  are row-invariant (models/quant.py, decoder.c), so greedy output is the request's lone output, and a seeded
  sampling row draws exactly as a lone plain (``drafter="none"``) generation does.

Configs that drive the model otherwise (a search strategy, a press) cannot be rows (:func:`batchable`); a
prediction (Predicted Outputs) is a row's drafter in the packed mode.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import kernels
from .cache import BatchKVCache
from .decoding import GenerationConfig
from .engine import Engine, TextStream
from .generation import PREFILL_CHUNK, GenerationResponse, GenerationStats, Handoff, Step
from .errors import InvalidArgumentError
from .prefix_cache import BLOCK_TOKENS, PrefixCache
from .speculative.drafters import Drafter
from .speculative.drafters.base import inner_drafters
from .speculative.tree import DraftTree
from .sampling import token_logprobs
from .speculative.verify import commit_exact, verify_greedy, verify_sampling

Event = tuple["Row", GenerationResponse]


def batchable(config: GenerationConfig, packed: bool = False) -> bool:
    """Whether a generation can be a batch row: next-token decoding, no press nor sparse attention; a
    prediction only where rows draft (``packed``, see the module docstring)."""
    return (not config.decoding.is_search and config.press is None and config.attention is None
            and config.passages is None
            and (packed or config.prediction is None))


def drafts_with_a_model(drafter: Drafter) -> bool:
    """Whether ``drafter`` (or one inside it) runs a draft model, which reads one sequence's own cache."""
    return drafter.needs_target or any(drafts_with_a_model(d) for d in inner_drafters(drafter))


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
    drafter: Drafter | None = None                     # packed mode: this row's own drafter
    pending: list[int] = field(default_factory=list)   # chunked prefill: prompt tokens not in the cache yet
    joined: float = 0.0                                # when add() was called (time to first token)
    prefix: PrefixCache | None = None                  # chunked prefill: the engine's prefix cache, if it may use it
    looked_up: bool = False                            # chunked prefill: the prefix cache was asked for the prompt
    since: int = 0                  # generated tokens when it (re)joined: what it made in its current turn
    saved: tuple[torch.Tensor, torch.Tensor] | None = None   # parked: its K/V [layers, kv heads, length, dim]
    parked_at: float = 0.0          # when it was parked (time.monotonic)

    @property
    def turn_tokens(self) -> int:
        """Tokens made since the row last (re)joined the batch (fairness: parked after a quantum of them)."""
        return self.stats.generated_tokens - self.since


@dataclass
class StepCostFit:
    """What a packed forward costs here, fitted to the forwards timed so far: ``row_scale`` times the engine's
    measured cost of a forward over one token per running row, plus ``prompt_token_s`` per prompt token
    riding with them (drafted tokens are taken at the measured marginal cost, ``draft_token_s``).

    Why fitted jointly: the engine's costs are one sequence's forwards after 128 tokens, while each batch row
    reads its own, longer context, so a forward of 8 rows takes about 2x ``costs[8]``. Charging all of that
    difference to the prompt chunk riding along (the earlier estimate: elapsed minus the predicted rows'
    cost, per prompt token) made a prompt token look several times its real cost; the chunks then shrank to
    the 4-token floor, whose few tokens kept the estimate high, and a joining row took ~60 forwards to read a
    250-token prompt, holding a batch row that made no tokens (docs/benchmarks.md section 7). A least-squares
    fit of both terms over recent forwards (exponentially forgotten) has no such feedback: the rows' cost
    varies from forward to forward, so it is told apart from the chunks' even when every forward has one.

    ``fit_drafts`` (the PyTorch forward, which reads no prompt chunks): the second term is the draft tokens,
    ``draft_token_s`` fitted from the engine's marginal cost as its prior. There a draft token in a batch
    forward can cost more than one in a lone verify forward (each is its own attention batch entry; measured
    on a CPU: 2.5-3.7 ms against 1.2-2.2 ms, 6-12 ms before the thread fix of ``on_kernel_threads``), and rows
    drafting at the lone cost made batches slower than plain rows (docs/benchmarks.md section 14)."""

    draft_token_s: float            # the engine's marginal cost of one more token (fitted with fit_drafts)
    prompt_prior_s: float           # a prompt token's cost before any is seen
    forget: float = 0.97            # weight of older forwards per new one (~30 forwards' memory)
    prior_weight: float = 0.5       # the priors (row_scale 1, the token's prior) count as half a forward each
    fit_drafts: bool = False
    row_scale: float = field(default=1.0, init=False)
    prompt_token_s: float = field(default=0.0, init=False)
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5, init=False, repr=False)   # xx xc cc xy cy

    def __post_init__(self) -> None:
        self.prompt_token_s = self.prompt_prior_s
        self._draft_prior_s = self.draft_token_s

    def observe(self, rows_s: float, drafted: int, chunk_tokens: int, elapsed: float) -> None:
        """One forward: ``rows_s`` the engine's cost of its running rows' roots, ``drafted`` their draft
        tokens, ``chunk_tokens`` prompt tokens, ``elapsed`` its seconds."""
        if self.fit_drafts:   # the prior as a forward with a few drafted tokens: a weak pull towards it
            y, c, prior, pc = elapsed, float(drafted), self._draft_prior_s, 4.0
        else:
            y, c, prior, pc = elapsed - self.draft_token_s * drafted, float(chunk_tokens), self.prompt_prior_s, 16.0
        f, x = self.forget, rows_s
        self._sums = [f * a + b for a, b in zip(self._sums, (x * x, x * c, c * c, x * y, c * y))]
        xx, xc, cc, xy, cy = self._sums
        w = self.prior_weight   # priors as pseudo-forwards of a typical size: rows_s alone, pc tokens
        px = max(rows_s, 1e-4)
        xx, xy = xx + w * px * px, xy + w * px * px * 1.0
        cc, cy = cc + w * pc * pc, cy + w * pc * pc * prior
        det = xx * cc - xc * xc
        if det <= 0:
            return
        scale, per_token = (xy * cc - cy * xc) / det, (cy * xx - xy * xc) / det
        self.row_scale = min(max(scale, 0.5), 8.0)
        per_token = min(max(per_token, 0.5 * self._draft_prior_s), 20 * self._draft_prior_s)
        if self.fit_drafts:
            self.draft_token_s = per_token
        else:
            self.prompt_token_s = per_token


def on_kernel_threads(method):
    """Run a BatchDecoder method with tachy's kernels on PyTorch's threads (kernels.threads_to_kernels) as a
    whole, not only its forwards: a PyTorch op on two threads between forwards (an argmax, a cache copy)
    leaves OpenMP's threads spinning into the next forward (benchmarks/thread_spin.py: a 2-token forward 6.1
    ms, 10.1 ms right after such an op; plain batching's p99 step 16-17 -> 13-16 ms in process). Also where
    GGUF blocks run through the PyTorch forward (``Engine.runs_kernels``): there 8 rows of 2 draft entries
    each took 146 ms per forward unguarded, 90 ms guarded (its linear layers 72 against 34 ms)."""
    @functools.wraps(method)
    def wrapped(self: "BatchDecoder", *args, **kwargs):
        with kernels.threads_to_kernels(self.engine.runs_kernels):
            return method(self, *args, **kwargs)
    return wrapped


class BatchDecoder:
    """Up to ``max_batch`` generations on ``engine``, stepped together (see the module docstring).

    prefill_share: chunked prefill (the C forward), how much a joining prompt's chunk may cost relative to the
    running rows' tokens in the same forward (their inter-token latency grows by about this fraction while a
    prompt joins). whole_prompt_tokens: chunked prefill, a joining prompt with at most this many tokens still
    to read is read whole in the next forward beside running rows, at most this many such tokens per forward:
    a short question's first token need not wait behind a long prompt read a chunk per forward (0: every
    prompt in chunks). min_chunk: the fewest prompt tokens a forward beside running rows carries (a floor
    under the ``prefill_share`` budget). Both trade the running streams' inter-token latency for the joiners'
    time to first token (docs/server.md has measurements).
    packed: False runs plain rows, one token each and no drafts (for comparison).
    """

    def __init__(self, engine: Engine, max_batch: int = 8, prefill_share: float = 0.5, packed: bool = True,
                 whole_prompt_tokens: int = 0, min_chunk: int = 4):
        if max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 < prefill_share < float("inf"):
            raise InvalidArgumentError(f"prefill_share must be > 0 and finite, got {prefill_share}")
        self.engine, self.max_batch, self.prefill_share = engine, max_batch, prefill_share
        if whole_prompt_tokens < 0 or min_chunk < 1:
            raise InvalidArgumentError(f"whole_prompt_tokens must be >= 0 and min_chunk >= 1, got "
                                       f"{whole_prompt_tokens} and {min_chunk}")
        self.whole_prompt_tokens, self.min_chunk = whole_prompt_tokens, min_chunk
        self.rows: list[Row] = []           # active rows, in join order
        self.parked: list[Row] = []         # preempted rows waiting for a cache row, oldest first
        self.cache: BatchKVCache | None = None
        self.packed = packed
        # packed rows on the C forward: exact draft trees, and joining prompts read in chunks beside running rows
        self.c_forward = packed and engine.model.cpu_forward is not None
        self._fit: StepCostFit | None = None   # what packed forwards cost here (made on first use: _step_fit)
        self.failed: list[tuple[Row, Exception]] = []        # rows that left on their own error (``_fail``)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    @torch.inference_mode()
    @on_kernel_threads
    def add(self, prompt_ids: Sequence[int], config: GenerationConfig, tag: object = None) -> list[Event]:
        """Prefill one generation and pick its first token; returns that token's piece (if any is sendable).
        The row then takes part in the following steps unless it already finished."""
        engine = self.engine
        self._check_joining(config)
        prompt_ids = engine.check_prompt(prompt_ids)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        row = Row(tag, config, list(prompt_ids), stats, TextStream(engine.tokenizer, config, stats),
                  *engine.token_choice(config, prompt_ids))
        start = row.joined = time.perf_counter()
        if self.packed:
            row.drafter = self._row_drafter(config)
        if self.c_forward:   # prefilled in chunks by the next steps, after what the prefix cache holds
            row.limit = engine.max_context - 1
            self._assign_slot(row, engine.cache_capacity(len(prompt_ids), config.max_new_tokens))
            row.prefix = engine.prefix_cache_for(config, self.cache)
            row.pending, row.ids = list(prompt_ids), []
            self.cache.lengths[row.slot] = 0
            return []
        engine.warmup(1)
        # the cache a lone generation would prefill into (same capacity, hence the same bits)
        capacity = engine.cache_capacity(len(prompt_ids), config.max_new_tokens)
        single = engine.model.new_cache(capacity=capacity, fixed=True)
        logits = engine._prefill(row.ids, single)
        row.root, logits = engine._choose(logits, row.ids, row.processor, row.probs_fn, row.generator)
        row.ids.append(row.root)
        if row.drafter is not None:
            row.drafter.reset(row.ids[:-1])
        row.limit = engine.max_context - 1
        stats.prefill_s = time.perf_counter() - start
        stats.generated_tokens = 1
        events = self._emit(row, Step([row.root], 0, 0, _logprobs(row, logits, [row.root])))
        if not row.done and not self._budget_left(row, single.length):
            events += self._finish(row)
        if row.done:
            return events
        self._place(row, single)
        return events

    @torch.inference_mode()
    @on_kernel_threads
    def adopt(self, handoff: Handoff, config: GenerationConfig, tag: object = None) -> Row:
        """Continue a lone generation that ``Engine.stream`` handed off between two steps as a row: its K/V is
        copied into a free cache row, and its sampler, logits processor and text stream go on as they stood,
        so its tokens are those it would have made alone (the rows' forwards give the lone path's bits); it
        drafts as a row does (``_row_drafter``). The PyTorch forward only: on the C forward every request
        is a row from its start."""
        if not handoff.taken or not self.packed or self.c_forward:
            raise InvalidArgumentError("adopt takes a handed-off generation, into packed rows on the PyTorch forward")
        self._check_joining(config)
        # since=0: its turn (``preemptible``) began when it started alone
        row = Row(tag, config, handoff.ids, handoff.stats, handoff.text, handoff.processor, handoff.probs_fn,
                  handoff.generator, root=handoff.ids[-1], limit=self.engine.max_context - 1,
                  joined=time.perf_counter(), since=0)
        row.drafter = self._row_drafter(config)
        if row.drafter is not None:
            row.drafter.reset(row.ids[:-1])
        self._place(row, handoff.cache)
        handoff.cache = None   # copied: the lone cache (up to the whole window) is not kept for the batch's life
        return row

    def _check_joining(self, config: GenerationConfig) -> None:
        """A row joining (``add``, ``adopt``) needs a free row and a config rows can run."""
        if not self.free:
            raise InvalidArgumentError(f"the batch is full ({self.max_batch} rows)")
        if not batchable(config, self.packed):
            raise InvalidArgumentError("search strategies, presses and sparse attention cannot run in a batch" +
                                       ("" if self.packed else "; nor predictions in plain rows"))

    @on_kernel_threads
    def remove(self, row: Row) -> None:
        """Drop a row (a cancelled request); its cache row is free for the next join, once the prefix cache
        has the blocks of its committed tokens."""
        if row in self.rows:
            self.rows.remove(row)
            self._store_prefix(row, self.cache.lengths[row.slot])
        if row in self.parked:
            self.parked.remove(row)
            row.saved = None
        row.slot, row.done = -1, True

    # -- preemption ---------------------------------------------------------------------------------------------
    def preemptible(self, quantum: int) -> Row | None:
        """The running row to park for a waiting request: among those that made at least ``quantum`` tokens
        in their current turn (a prompt still being read is never parked), the one that made the most."""
        rows = [r for r in self.rows if not r.pending and not r.done and r.turn_tokens >= quantum]
        return max(rows, key=lambda r: r.turn_tokens, default=None)

    @torch.inference_mode()
    @on_kernel_threads
    def park(self, row: Row) -> None:
        """Take ``row`` out of the batch until ``resume``: its committed K/V is copied out of its cache row
        (which is free at once); nothing else about it changes."""
        if row not in self.rows or row.pending:
            raise InvalidArgumentError("only a running row that has read its prompt can be parked")
        row.saved = self.cache.row_kv(row.slot)
        self.rows.remove(row)
        row.slot, row.parked_at = -1, time.monotonic()
        self.parked.append(row)

    @torch.inference_mode()
    @on_kernel_threads
    def resume(self) -> Row:
        """Put the longest-parked row back into a free cache row, its K/V as it left them."""
        if not self.parked or not self.free:
            raise InvalidArgumentError("nothing to resume, or no free cache row")
        row = self.parked.pop(0)
        self._assign_slot(row, self.engine.cache_capacity(row.stats.prompt_tokens, row.config.max_new_tokens))
        self.cache.load_kv(row.slot, *row.saved)
        row.saved, row.since = None, row.stats.generated_tokens
        return row

    def _reuse_prefix(self, row: Row) -> None:
        """Before a joining prompt's first chunk: start it after the blocks the prefix cache holds. Asked then,
        not when the row joined, so that a prompt queued behind another with the same prefix (a shared system
        prompt) finds the blocks that one stored when its prefill ended."""
        if row.looked_up:
            return
        row.looked_up = True
        if row.prefix is not None:
            k, v = self.cache.k[:, row.slot], self.cache.v[:, row.slot]
            cached = row.prefix.load(row.pending[:-1], k, v)
            row.stats.cached_tokens = self.cache.lengths[row.slot] = cached
            row.ids, row.pending = row.pending[:cached], row.pending[cached:]

    def _store_prefix(self, row: Row, tokens: int) -> None:
        """Give the prefix cache the K/V of the row's first ``tokens`` tokens (all committed, in its cache row)."""
        if row.prefix is not None:
            k, v = self.cache.k[:, row.slot], self.cache.v[:, row.slot]
            row.prefix.store(row.ids[:tokens], k, v)

    @torch.inference_mode()
    @on_kernel_threads
    def step(self) -> list[Event]:
        """One forward over every active row; returns the pieces it made sendable (finished rows leave). A row
        whose own work raised leaves too, into ``failed`` (row, error), which the caller empties."""
        if not self.rows:
            return []
        if self.packed:
            return self._packed_step()
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
            try:
                events += self._decoded(row, logits[b], empty, elapsed)
            except Exception as e:  # noqa: BLE001 - its own processor or text stream failed: its request's alone
                self._fail(row, e)
        return events

    def _decoded(self, row: Row, row_logits: torch.Tensor, empty: DraftTree, elapsed: float) -> list[Event]:
        """Plain mode: choose one row's next token from its logits (the engine's loop with an empty draft)."""
        t = time.perf_counter()
        if row.processor is not None:
            row_logits = row.processor(row_logits, empty.row_contexts(torch.tensor(row.ids, device=self.engine.device)))
        if row.probs_fn is None:
            _, token = verify_greedy(empty, row_logits)
        else:
            _, token = verify_sampling(empty, row.probs_fn(row_logits), row.generator)
        row.root = token
        row.ids.append(token)
        row.stats.forwards += 1
        row.stats.generated_tokens += 1
        row.stats.decode_s += elapsed + time.perf_counter() - t
        events = self._emit(row, Step([token], 0, 0, _logprobs(row, row_logits, [token])))
        if not row.done and not self._budget_left(row, self.cache.lengths[row.slot]):
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

    def _fail(self, row: Row, error: Exception) -> None:
        """A row whose own work raised (its logits processor, drafter or text stream: code that runs per
        request) leaves the batch and its error waits in ``failed`` for the caller; the other rows go on. Its
        K/V does not go to the prefix cache: its state may be half updated."""
        if row in self.rows:
            self.rows.remove(row)
        row.slot, row.done = -1, True
        self.failed.append((row, error))

    def _place(self, row: Row, single) -> None:
        """Copy a prefilled sequence into a free cache row (growing the cache to the row's whole need)."""
        self._assign_slot(row, self.engine.cache_capacity(single.length, row.config.max_new_tokens))
        self.cache.load(row.slot, single)

    def _assign_slot(self, row: Row, need: int) -> None:
        """A free cache row for ``row`` (growing the cache to ``need`` slots per row); the row joins."""
        engine = self.engine
        if self.cache is None:   # chunked: the whole window at once, untouched pages cost nothing (lazy)
            cfg = engine.config
            self.cache = BatchKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                      engine.max_context if self.c_forward else need, self.max_batch,
                                      dtype=engine.model.dtype, device=engine.device, lazy=self.c_forward)
        self.cache.grow(need)
        used = {r.slot for r in self.rows}
        row.slot = next(s for s in range(self.max_batch) if s not in used)
        self.rows.append(row)

    # -- packed mode ------------------------------------------------------------------------------------------
    def _row_drafter(self, config: GenerationConfig) -> Drafter | None:
        """This row's own drafter: a fork of the engine's drafter of that name (model-free where it would run a
        model), which shares what the engine's drafter learned (``Drafter.fork``: the lone path keeps one
        drafter per name, and fresh ones drafted ~10% fewer tokens per forward at concurrency 1); a new one
        for a seeded sampling row, whose drafts, hence draws, may depend on its own text only. Wrapped by
        the prediction's drafter when the request has one."""
        engine, drafter, sampling = self.engine, config.drafter, config.sampling
        if isinstance(drafter, str):   # the lone path's instance: shared, or new for a seeded row
            drafter = engine._drafter(drafter, sampling)
        if drafter is not None and drafts_with_a_model(drafter):
            drafter = engine._drafter("model-free", sampling)
        if drafter is not None and not sampling.seeded:
            drafter = drafter.fork()
        drafter = engine.with_prediction(drafter, config)
        return drafter if config.max_draft_tokens else None

    def _decode_cost(self, tokens: int) -> float:
        """Seconds of one sequence's forward over ``tokens`` tokens (the engine's measured step costs,
        extended linearly past the widths it measured)."""
        costs = self.engine.step_costs()
        top = len(costs) - 1
        return costs[min(tokens, top)] + self._marginal_cost() * max(0, tokens - top)

    def _marginal_cost(self) -> float:
        costs = self.engine.step_costs()
        top = len(costs) - 1
        return max((costs[top] - costs[1]) / (top - 1), 1e-6)

    def _step_fit(self) -> StepCostFit:
        if self._fit is None:
            marginal = self._marginal_cost()
            self._fit = StepCostFit(draft_token_s=marginal, prompt_prior_s=marginal, fit_drafts=not self.c_forward)
        return self._fit

    def _rows_cost(self, rows: int, drafted: int = 0) -> float:
        """Seconds of a packed forward over ``rows`` running rows' roots and ``drafted`` draft tokens."""
        fit = self._step_fit()
        return fit.row_scale * self._decode_cost(rows) + fit.draft_token_s * drafted

    def _row_costs(self, rows: int) -> list[float]:
        """What a row's tokens cost inside a batch of ``rows``: its share of a forward over every row's root
        token, then the marginal cost of each drafted token. Each row's drafter weighs its draft against these
        (OPT-Tree, ``DraftTree.best_for_cost``), so in a big batch, where a row's share of the weight reads is
        small, only drafts likely to be accepted are sent. The share is the fitted one (``StepCostFit``): a
        row reading its own long context costs more than the engine's costs say, which makes drafts pay more.
        On the PyTorch forward a row alone too: its draft tokens cost batch entries' (fitted), not a lone
        verify forward's."""
        if rows == 1 and self.c_forward:   # a row alone drafts as the lone path does, against its measured costs
            return self.engine.step_costs()
        share, marginal = self._rows_cost(rows) / rows, self._step_fit().draft_token_s
        return [0.0] + [share + k * marginal for k in range(len(self.engine.step_costs()) - 1)]

    def _chunk_budget(self, rows: int, drafted: int = 0) -> int:
        """Prompt tokens a joining row may put in this forward: a whole chunk with nothing else running, else
        as many as cost about ``prefill_share`` times the running rows' tokens (``rows`` roots and
        ``drafted`` draft tokens), a prompt token's cost being fitted on the forwards so far (``StepCostFit``;
        it grows with the token's position, attention over every earlier token)."""
        if not rows:
            return PREFILL_CHUNK
        per_token = self._step_fit().prompt_token_s
        return max(self.min_chunk, int(self.prefill_share * self._rows_cost(rows, drafted) / per_token))

    def _observe_step(self, rows: int, drafted: int, chunk_tokens: int, elapsed: float) -> None:
        """Fit the step costs to one more forward that had running rows (``StepCostFit``)."""
        if rows:
            self._step_fit().observe(self._decode_cost(rows), drafted, chunk_tokens, elapsed)

    def _packed_step(self) -> list[Event]:
        engine, cache = self.engine, self.cache
        start = time.perf_counter()
        plan: list[tuple[Row, list[int], DraftTree | None]] = []   # (row, tokens, tree; None: a prompt chunk)
        decode_rows = drafted = 0
        costs = self._row_costs(sum(not r.pending for r in self.rows) or 1)
        for row in list(self.rows):
            if row.pending:
                continue
            try:
                tree = self._draft(row, costs)
            except Exception as e:  # noqa: BLE001 - its drafter failed: its request's failure alone
                self._fail(row, e)
                continue
            plan.append((row, [row.root] + tree.tokens, tree))
            decode_rows, drafted = decode_rows + 1, drafted + len(tree)
        budget = self._chunk_budget(decode_rows, drafted)
        whole = self.whole_prompt_tokens if decode_rows else 0
        reading: set[tuple[int, ...]] = set()   # first blocks of the prompts being read in this forward
        for row in self.rows:   # joining prompts, first come first served
            if not row.pending:
                continue
            if row.prefix is not None and not row.looked_up and tuple(row.pending[:BLOCK_TOKENS]) in reading:
                continue   # same start as a prompt being read: wait for its blocks in the prefix cache
            short = len(row.pending) <= whole   # a short prompt goes whole, beside the budget (whole_prompt_tokens)
            if not short and budget <= 0:
                continue
            self._reuse_prefix(row)
            if short:
                chunk = row.pending
                whole -= len(chunk)
            else:
                chunk = row.pending[:min(budget, PREFILL_CHUNK)]
                budget -= len(chunk)
            plan.append((row, chunk, None))
            reading.add(tuple((row.ids[:BLOCK_TOKENS] + row.pending[:BLOCK_TOKENS])[:BLOCK_TOKENS]))
        # chains and prompt chunks see the earlier new tokens of their own row: the forward's default (no mask)
        causal = all(tree is None or tree.is_chain for _, _, tree in plan)
        tokens, positions, rows, slots, prefix, blocks, logit_rows = [], [], [], [], [], [], []
        for row, toks, tree in plan:
            base = cache.lengths[row.slot]
            first = len(tokens)
            tokens += toks
            positions += tree.positions(base) if tree is not None else range(base, base + len(toks))
            rows += [row.slot] * len(toks)
            slots += range(base, base + len(toks))
            prefix += [base] * len(toks)
            if not causal:
                blocks.append(tree.attention_mask() if tree is not None else
                              torch.ones(len(toks), len(toks), dtype=torch.bool).tril())
            if tree is not None:
                logit_rows += range(first, first + len(toks))
            elif len(toks) == len(row.pending):   # the prompt's last token: its logits choose the first token
                logit_rows.append(first + len(toks) - 1)
        columns = torch.tensor([tokens, positions, rows, slots, prefix], dtype=torch.int64)   # one copy, five rows
        forward_start = time.perf_counter()
        if self.c_forward:
            logits = engine.model.cpu_forward.packed(cache, *columns, None if causal else torch.block_diag(*blocks),
                                                     torch.tensor(logit_rows, dtype=torch.int64))
        else:   # no prompt chunks: every token's logits
            logits = self._entries_forward(rows, *columns[:2].to(engine.device),
                                           None if causal else torch.block_diag(*blocks))
        elapsed = time.perf_counter() - start
        self._observe_step(decode_rows, drafted, sum(len(t) for _, t, tree in plan if tree is None),
                           time.perf_counter() - forward_start)
        events: list[Event] = []
        at = 0
        for row, toks, tree in plan:
            n = len(toks) if tree is not None else int(len(toks) == len(row.pending))   # its rows of logits
            try:
                if tree is None:
                    events += self._prefilled(row, toks, logits[at:at + 1] if n else None)
                else:
                    events += self._verified(row, toks, tree, logits[at:at + n], elapsed)
            except Exception as e:  # noqa: BLE001 - its processor, drafter or text stream: its request's alone
                self._fail(row, e)
            at += n
        return events

    def _entries_forward(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """The PyTorch forward over packed drafts: token t a batch entry of cache row ``rows[t]`` (a row's
        entries at consecutive slots from its length), seeing the entries ``mask`` [T, T] allows (None: its
        row's earlier ones; BatchKVCache.entry_mask). The rows' lengths stay as they were: ``_verified`` keeps
        each row's accepted tokens. Returns [T, V] logits."""
        cache = self.cache
        lengths = list(cache.lengths)
        cache.rows, cache.entry_mask = rows, mask
        try:
            return self.engine.model(tokens[:, None], positions, cache)[:, 0]
        finally:
            cache.lengths, cache.entry_mask = lengths, None

    def _draft(self, row: Row, costs: list[float]) -> DraftTree:
        """A running row's draft for this step (empty without a drafter or room for more tokens)."""
        if row.drafter is not None and not row.config.sampling.seeded:
            # a seeded sampling row keeps the lone costs: its drafts, hence its draws, are its lone run's
            _use_costs(row.drafter, costs)
        length = self.cache.lengths[row.slot]
        room = min(self.engine.max_context - length - 2, row.config.max_new_tokens - row.stats.generated_tokens - 1)
        if row.drafter is None or room <= 0:
            return DraftTree.empty()
        t = time.perf_counter()
        tree = row.drafter.propose(row.ids, min(row.config.max_draft_tokens, room))
        if not self.c_forward:   # the PyTorch forward: exact along the leading chain (see the module docstring)
            tree = tree.prune_to_spine()
        if len(tree) > room:
            tree = tree.truncate(room)
        row.stats.draft_s += time.perf_counter() - t
        return tree

    def _prefilled(self, row: Row, chunk: list[int], logits: torch.Tensor | None) -> list[Event]:
        """A prompt chunk is in the cache; after the last one, choose the first token (as Engine._prefill)."""
        self.cache.lengths[row.slot] += len(chunk)
        row.ids += chunk
        row.pending = row.pending[len(chunk):]
        if logits is None:
            return []
        engine = self.engine
        self._store_prefix(row, len(row.ids))   # the whole prompt: requests that share it need not wait
        row.root, logits = engine._choose(logits, row.ids, row.processor, row.probs_fn, row.generator)
        row.ids.append(row.root)
        if row.drafter is not None:
            row.drafter.reset(row.ids[:-1])
        row.stats.prefill_s = time.perf_counter() - row.joined
        row.stats.generated_tokens = 1
        events = self._emit(row, Step([row.root], 0, 0, _logprobs(row, logits, [row.root])))
        if not row.done and not self._budget_left(row, self.cache.lengths[row.slot]):
            events += self._finish(row)
        return events

    def _verified(self, row: Row, tokens: list[int], tree: DraftTree, logits: torch.Tensor,
                  elapsed: float) -> list[Event]:
        """Verify one row's draft (the engine's loop body, without the forward) and keep its accepted path."""
        t = time.perf_counter()
        device = self.engine.device
        if row.processor is not None:   # penalties: each node sees its own path as context
            logits = row.processor(logits, tree.row_contexts(torch.tensor(row.ids, device=device)))
        if row.probs_fn is None:
            accepted, bonus = verify_greedy(tree, logits)
        else:
            accepted, bonus = verify_sampling(tree, row.probs_fn(logits), row.generator)
        if not self.c_forward:
            accepted, bonus = commit_exact(tree, accepted, bonus)
        base = self.cache.lengths[row.slot]
        self.cache.keep_row(row.slot, [base] + [base + 1 + j for j in accepted])
        new = [tree.tokens[j] for j in accepted] + [bonus]
        row.ids += new
        row.root = bonus
        if row.drafter is not None:
            row.drafter.update(row.ids, len(accepted), logits if row.drafter.needs_logits else None, tokens)
        stats = row.stats
        stats.forwards += 1
        stats.drafted += len(tree)
        stats.accepted += len(accepted)
        stats.generated_tokens += len(new)
        stats.decode_s += elapsed + time.perf_counter() - t
        logprobs = None
        if row.config.logprobs is not None:   # the path's rows of logits: a copy of 49k floats or more each
            logprobs = _logprobs(row, logits[[0] + [1 + j for j in accepted]], new)
        events = self._emit(row, Step(new, len(accepted), len(tree), logprobs))
        if not row.done and not self._budget_left(row, self.cache.lengths[row.slot]):
            events += self._finish(row)
        return events


def _use_costs(drafter: Drafter, costs: list[float]) -> None:
    """Give a drafter and the drafters inside it the forward costs to weigh drafts against."""
    drafter.costs = costs
    for inner in inner_drafters(drafter):
        _use_costs(inner, costs)


def _logprobs(row: Row, logits: torch.Tensor, tokens: list[int]):
    """The tokens' log-probabilities (rows of processed logits), when the row's config asks for them."""
    top = row.config.logprobs
    return None if top is None else token_logprobs(logits, tokens, top)
