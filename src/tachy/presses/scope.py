"""SCOPE: separate KV budgets for the prefill and the decoding phase, so long generations stay bounded too.

Based on Wu et al. 2024, "SCOPE: Optimizing Key-Value Cache Compression in Long-context Generation"
(arXiv:2412.13649). Prompt presses compress the cache once, after prefill; a long answer then grows it again
by one entry per token, and the tokens that answer attends to (its heavy hitters) drift away from those the
prompt's last queries voted for. SCOPE gives each phase its own budget and its own method:

* prefill: a prompt press (``prefill``, default SnapKV) compresses the prompt once, at ``compression_ratio``.
  That part of the cache, with the prompt's last token, is never touched again.
* decoding: the generated tokens share ``decode_budget`` slots per kv head: the ``recent`` newest ones, plus
  the older ones that received the most attention from the generated tokens' queries so far (heavy hitters,
  accumulated as in H2O). Once they hold ``interval`` slots more than the budget, the selection runs and cuts
  them back to it. So the cache never holds more than the compressed prompt + 1 + ``decode_budget`` +
  ``interval`` slots per kv head, however long the generation runs.

The paper's three decoding strategies:

* ``slide``: a fixed decoding budget, re-selected every step (``interval`` 1);
* ``adaptive``: the heavy hitters' share grows with the output, one slot every ``delta`` tokens fed, up to
  ``decode_budget - recent`` (a short answer holds less than the budget), re-selected every step;
* ``discontinuous``: adaptive's budget, re-selected only every ``interval`` steps (default ``delta``), so the
  scoring and the gather run 1/``delta`` as often.

How: the decoding queries come through ``cache.observer`` (which, like any press, keeps decoding on the
PyTorch forward) and are scored in one batch at each selection. The queries since the last selection belong
to the newest slots, and nothing was evicted since they ran, so causal attention over the cache as it is then
is exactly what each of them saw (on a sliding-window layer, only the keys inside its window; the slots the
next query cannot see there are dropped first). Speculative decoding works: only the committed rows' queries
are kept (``committed``) and drafts stop at the next selection (base.py ``DecodingEviction``), so it gives
plain decoding's tokens. CLI: ``--press scope:decode_budget=256,strategy=slide --ratio 0.5``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import InvalidArgumentError
from .base import DecodingEviction, Press, make_press, protect, register
from .compose import ComposedPress

STRATEGIES = ("slide", "adaptive", "discontinuous")


def _count(name: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise InvalidArgumentError(f"scope: {name} must be a whole number >= {least}, got {value!r}")


@register
@dataclass
class SCOPEPress(Press):
    """prefill: the prompt press's name (options after a colon, e.g. ``snapkv:window=64``); decode_budget:
    slots per kv head for the generated tokens; recent: how many of them are the newest (default half);
    strategy: slide | adaptive | discontinuous; interval: tokens between selections (default 1, or ``delta``
    for discontinuous); delta: adaptive growth, one heavy-hitter slot per ``delta`` tokens."""

    prefill: str = "snapkv"
    decode_budget: int = 256
    recent: int | None = None
    strategy: str = "slide"
    interval: int | None = None
    delta: int = 16
    name = "scope"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise InvalidArgumentError(f"scope: strategy must be one of {', '.join(STRATEGIES)}, "
                                       f"got {self.strategy!r}")
        _count("decode_budget", self.decode_budget, 1)
        _count("delta", self.delta, 1)
        if self.recent is None:
            self.recent = self.decode_budget // 2
        _count("recent", self.recent, 0)
        if self.recent > self.decode_budget:
            raise InvalidArgumentError(f"scope: recent ({self.recent}) cannot exceed decode_budget "
                                       f"({self.decode_budget})")
        if self.interval is None:
            self.interval = self.delta if self.strategy == "discontinuous" else 1
        _count("interval", self.interval, 1)
        if not isinstance(self.prefill, str):
            raise InvalidArgumentError(f"scope: prefill must be a press name, got {self.prefill!r}")
        part = make_press(self.prefill, self.compression_ratio)
        if isinstance(part, (ComposedPress, SCOPEPress)) or not part.evicts or part.evict_every:
            raise InvalidArgumentError(f"scope: prefill must be one evicting prompt press (snapkv, pyramidkv, "
                                       f"h2o, ...), not a composition, a quantizer or a decoding-time one; "
                                       f"got {self.prefill!r}")
        self._prefill_press = part
        self._start = 0                              # first slot of the generated tokens
        self._pending: dict[int, Tensor] = {}        # layer -> the last forward's queries [B, H, T, D]
        self._decoded: dict[int, list[Tensor]] = {}  # layer -> committed queries since the last selection
        self._scores: Tensor | None = None           # [L, B, Hkv, n] attention the kept generated slots got
        self._windows: list[int | None] = []         # per layer: a sliding window (Gemma 3), or None

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self._prefill_press.query_window

    @property
    def evict_every(self) -> int:  # type: ignore[override]
        return self.interval

    @property
    def active(self) -> bool:
        return True      # the decoding budget applies even when the prompt is left whole (ratio 0)

    # -- prefill: the wrapped press ---------------------------------------------------------------------------
    def prepare(self, model) -> None:
        cfg = model.config
        self._windows = [cfg.sliding_window if kind == "sliding" else None for kind in cfg.layer_types]
        self._prefill_press.prepare(model)

    def apply(self, cache: KVCache, memo: dict | None = None) -> None:
        if self._prefill_press.active:
            self._prefill_press.adopt_queries(self.collected)
            self._prefill_press.apply(cache, memo)
        self._queries = {}

    # -- decoding: recent tokens + heavy hitters within the decoding budget --------------------------------
    def start_decoding(self, cache: KVCache) -> DecodingEviction:
        self._start, self._pending, self._decoded, self._scores = cache.length, {}, {}, None
        if self.scoring:
            cache.observer = self._watch
        return DecodingEviction(self, cache.length, cache.position)

    @property
    def sliding(self) -> bool:
        """Whether some layer reads only a sliding window (Gemma 3; known once ``prepare`` saw the model)."""
        return any(window is not None for window in self._windows)

    @property
    def scoring(self) -> bool:
        """False when the budget is all recent window (``recent == decode_budget``): nothing to score."""
        return self.recent < self.decode_budget

    def _watch(self, layer: int, q: Tensor) -> None:
        self._pending[layer] = q

    def committed(self, rows: list[int]) -> None:
        for layer, q in self._pending.items():
            self._decoded.setdefault(layer, []).append(q if q.shape[2] == len(rows) == 1 else q[:, :, rows])
        self._pending = {}

    def decoding_budget(self, start: int, decoded: int) -> int:
        if self.strategy == "slide":
            return start + self.decode_budget
        return start + min(self.decode_budget, self.recent + decoded // self.delta)

    def evict_while_decoding(self, cache: KVCache, budget: int) -> None:
        """Keep, per (layer, kv head), the ``recent`` newest generated slots and the most attended older ones,
        ``budget - start`` in all; the prompt's slots stay."""
        keep = budget - self._start
        if not self.scoring:     # a sliding window over the generated tokens
            region = cache.length - self._start
            kept = torch.arange(region - keep, region, device=cache.device).expand(*cache.shape[:3], keep)
            cache.evict_after(self._start, kept + self._start)
            return
        scores = self.accumulated(cache)
        ranks = scores
        if self.sliding:   # what a sliding layer's next query cannot see, it never reads again: first out
            ranks, positions = scores.clone(), cache.slot_positions()[:, :, :, self._start:cache.length]
            for layer, window in enumerate(self._windows):
                if window is not None:
                    ranks[layer].masked_fill_(cache.position - positions[layer] >= window, -1.0)
        drop = scores.shape[-1] - keep      # few (the interval): find those rather than rank all the kept ones
        dropped = protect(ranks, window=min(self.recent, keep)).topk(drop, dim=-1, largest=False).indices
        stays = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, dropped, False)
        kept = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)[stays].view(
            *scores.shape[:-1], keep)       # ascending
        cache.evict_after(self._start, kept + self._start)
        self._scores = scores.gather(-1, kept)

    def accumulated(self, cache: KVCache) -> Tensor:
        """[L, B, Hkv, n] attention each generated slot received from the generated tokens' queries (grouped
        query heads averaged): the stored sums plus the queries committed since the last selection. All layers
        in one batch: a selection is a dozen ops, not a dozen per layer."""
        start, S = self._start, cache.length
        L, B, Hkv, D = cache.shape
        queries = torch.stack([torch.cat(self._decoded[layer], dim=2) for layer in range(L)])  # [L, B, H, n, D]
        self._decoded = {}
        H, n = queries.shape[2], queries.shape[3]
        scored = 0 if self._scores is None else self._scores.shape[-1]
        if n != S - start - scored:
            raise RuntimeError(f"scope: {n} queries for {S - start - scored} new slots")
        valid = None if cache.valid is None else cache.valid[:, :, :, :S]                # [L, B, Hkv, S]
        if self.sliding:   # per query: a sliding layer's query does not see ``window`` or more positions back
            seen = torch.ones(L, B, Hkv, n, S, dtype=torch.bool, device=cache.device) if valid is None \
                else valid[:, :, :, None].expand(-1, -1, -1, n, -1).clone()
            positions = cache.slot_positions()[:, :, :, :S]
            at = torch.arange(cache.position - n, cache.position, device=cache.device)[:, None]   # [n, 1]
            for layer, window in enumerate(self._windows):
                if window is not None:
                    seen[layer] &= at - positions[layer][:, :, None, :] < window
            valid = seen                                                                 # [L, B, Hkv, n, S]
        attn = grouped_attention(queries.flatten(0, 1), cache.k[:, :, :, :S].flatten(0, 1),
                                 None if valid is None else valid.flatten(0, 1))
        scores = attn[..., start:].sum(2).view(L, B, Hkv, S - start) / (H // Hkv)
        if scored:
            scores[..., :scored] += self._scores
        return scores


def grouped_attention(queries: Tensor, keys: Tensor, valid: Tensor | None = None) -> Tensor:
    """Softmax attention (float32) of the last n queries [B, H, n, D] over the S cached keys [B, Hkv, S, D],
    causal (query i sits at slot S - n + i), without invalid slots (``valid`` [B, Hkv, S], or per query
    [B, Hkv, n, S]): [B, Hkv, G * n, S], each kv head's G query heads one after the other. base.py's
    ``window_attention`` repeats the keys for every query head instead, ~10x slower at a decoding step's sizes."""
    B, H, n, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    logits = queries.float().reshape(B, Hkv, H // Hkv * n, D) @ keys.float().transpose(-1, -2)
    visible = (torch.arange(S, device=keys.device)[None, :]
               <= torch.arange(S - n, S, device=keys.device)[:, None]).repeat(H // Hkv, 1)    # [G * n, S]
    if valid is not None:
        visible = visible & (valid[:, :, None, :] if valid.dim() == 3 else valid.repeat(1, 1, H // Hkv, 1))
    return logits.masked_fill(~visible, float("-inf")).softmax(-1)
