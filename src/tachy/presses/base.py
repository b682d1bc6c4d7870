"""Press: the shared base of every KV-cache compression method, and the name -> class registry.

A press runs once, right after prefill (see ``Engine._prefill``): while the prompt is forwarded it may collect
the queries it scores with (``observing``), then ``apply`` asks ``compress`` which slots each (layer, kv head)
keeps and compacts the cache to them (``KVCache.compact``). Kept keys carry their rope, so decoding continues
at the cache's logical ``position``; speculative rollback works on the slots after the compressed prefix.
A press with ``evict_every`` also evicts while decoding: the engine consults the ``DecodingEviction`` that
``start_decoding`` returns before every decoding forward (StreamingLLM's ``evict_every``, SCOPE).

Vocabulary: the *budget* of a layer is the number of slots each of its kv heads keeps, ``round(S * (1 -
compression_ratio))`` for S prompt tokens unless a method (PyramidKV) spreads it unevenly over layers.
Shapes crossing ``compress``: queries [B, H, Tq, D] (the last Tq prompt queries, scaled by the attention scale;
None when the press needs none), keys/values [B, Hkv, S, D]; returns kept slots [B, Hkv, n] ascending.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import InvalidArgumentError, UnknownNameError
from ..spec import parse_spec


@dataclass
class Press:
    """Base press. Subclasses set ``name``, ``query_window`` (prompt queries to collect: 0 none, -1 all, n the
    last n) and implement ``compress``.

    compression_ratio: fraction of the prompt's KV entries removed, in [0, 1).
    """

    compression_ratio: float = 0.0
    name: ClassVar[str] = "press"
    query_window: ClassVar[int] = 0
    evicts: ClassVar[bool] = True      # False: compresses by other means (quantization); ratio must be 0
    evict_every: ClassVar[int] = 0     # > 0: also evicts while decoding (evict_while_decoding), every N new slots

    def __post_init__(self) -> None:
        if not isinstance(self.compression_ratio, (int, float)) or not 0 <= self.compression_ratio < 1:
            raise InvalidArgumentError(f"compression_ratio must be in [0, 1), got {self.compression_ratio!r}")
        self._queries: dict[int, list[Tensor]] = {}

    @property
    def active(self) -> bool:
        """Whether applying it changes the cache (an evicting press at ratio 0 is skipped, bit for bit)."""
        return self.compression_ratio > 0

    # -- collecting the prefill's queries ---------------------------------------------------------------------
    @contextmanager
    def observing(self, cache: KVCache) -> Iterator[None]:
        """Collect the queries of the forwards run inside the block (only when the method scores with them)."""
        self._queries = {}
        if self.query_window == 0:
            yield
            return
        cache.observer = self.observe
        try:
            yield
        finally:
            cache.observer = None

    def observe(self, layer: int, q: Tensor) -> None:
        chunks = self._queries.setdefault(layer, [])
        chunks.append(q)
        if self.query_window > 0 and len(chunks) > 1:  # keep only what the window needs
            q = torch.cat(chunks, dim=2)[:, :, -self.query_window:]
            chunks[:] = [q]

    @property
    def collected(self) -> dict[int, list[Tensor]]:
        """The queries observed so far, per layer (to hand to other presses with ``adopt_queries``)."""
        return self._queries

    def adopt_queries(self, queries: dict[int, list[Tensor]]) -> None:
        """Score with queries another press collected (tachy eval prefills once for a sweep of presses)."""
        self._queries = dict(queries)

    def queries(self, layer: int) -> Tensor | None:
        chunks = self._queries.get(layer)
        return torch.cat(chunks, dim=2) if chunks else None

    # -- compressing ------------------------------------------------------------------------------------------
    def budget(self, layer: int, num_layers: int, length: int) -> int:
        """Slots each kv head of ``layer`` keeps out of ``length``."""
        return max(1, round(length * (1 - self.compression_ratio)))

    def apply(self, cache: KVCache, memo: dict | None = None) -> None:
        """Compress every layer of ``cache`` (batch 1, uncompressed, holding just the prompt) in place.

        memo: optional dict shared between presses applied to copies of one prefilled cache; scorer presses
        keep their scores there so a sweep over ratios scores once (tachy eval)."""
        if cache.compressed:
            raise InvalidArgumentError("the cache is already compressed")
        L, S = cache.shape[0], cache.length
        kept, counts = [], []
        for layer in range(L):
            keys, values = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]
            out = self.compress(cache, layer, self.queries(layer), keys, values, memo)
            idx, count = out if isinstance(out, tuple) else (out, None)
            kept.append(idx)
            counts.append(count if count is not None else torch.full(idx.shape[:2], idx.shape[-1]))
        cache.compact(kept, counts)
        self._queries = {}

    def compress(self, cache: KVCache, layer: int, queries: Tensor | None, keys: Tensor, values: Tensor,
                 memo: dict | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Kept slots [B, Hkv, n] ascending, or (slots, counts [B, Hkv]) for head-wise budgets: a head's first
        ``count`` entries are kept, the rest is padding (see ``ragged``). A merging press may overwrite kept
        entries of ``keys``/``values`` (views of the cache) in place before returning."""
        raise NotImplementedError

    def prepare(self, model) -> None:
        """Called with the model before prefill; a press that probes the model once (RazorAttention) does it
        here. Default: nothing."""

    # -- evicting while decoding (presses with evict_every > 0) ------------------------------------------------
    def start_decoding(self, cache: KVCache) -> "DecodingEviction | None":
        """Called by the engine once the whole prompt is in the (compressed) cache; returns what it consults
        before each decoding forward, or None when this press leaves the cache alone while decoding."""
        return DecodingEviction(self, cache.length, cache.position) if self.active and self.evict_every else None

    def decoding_budget(self, start: int, decoded: int) -> int:
        """Slots the cache is cut back to after ``decoded`` tokens were fed past ``start``, the cache's length
        after prefill (must not shrink as ``decoded`` grows). Default: ``start`` (StreamingLLM)."""
        return start

    def evict_while_decoding(self, cache: KVCache, budget: int) -> None:
        """Cut the cache back to ``budget`` slots during decoding; called each time the cache has grown by
        ``evict_every`` slots past ``decoding_budget``. Only presses with ``evict_every`` do."""
        raise NotImplementedError(f"{self.name} does not evict while decoding")

    def committed(self, rows: list[int]) -> None:
        """The rows of the last decoding forward that were kept (the root and the accepted drafts): a press that
        watches decoding forgets the others. Default: nothing."""


@dataclass
class DecodingEviction:
    """The engine's side of evicting while decoding: before each forward, ``step`` evicts when the cache has
    grown ``evict_every`` slots past the press's budget and says how many draft tokens fit before the next
    eviction. The engine caps drafts there, so plain and speculative decoding evict at the same cache states
    (the budget only grows with the tokens fed) and stay token-identical."""

    press: Press
    start: int       # cache length after prefill: the compressed prompt and its last token
    position: int    # cache position then

    def step(self, cache: KVCache) -> int:
        """Evict if due; return the draft tokens the next forward may add without passing the next eviction."""
        budget = self.press.decoding_budget(self.start, cache.position - self.position)
        every = self.press.evict_every
        if cache.length >= budget + every:
            self.press.evict_while_decoding(cache, budget)
        return budget + every - cache.length - 1

    def committed(self, rows: list[int]) -> None:
        self.press.committed(rows)


@dataclass
class ScorerPress(Press):
    """Keeps each head's top-``budget`` slots by ``score`` (a higher score is more important). Slots that must
    survive (sinks, the recent window) get an infinite score."""

    def score(self, layer: int, queries: Tensor | None, keys: Tensor, values: Tensor) -> Tensor:
        """[B, Hkv, S] importance of each cached slot."""
        raise NotImplementedError

    def scores(self, layer: int, queries: Tensor | None, keys: Tensor, values: Tensor, memo: dict | None) -> Tensor:
        """``score``, kept in ``memo`` (when given) for the other ratios of a sweep."""
        key = (repr(dataclasses.replace(self, compression_ratio=0.0)), layer)
        scores = memo.get(key) if memo is not None else None
        if scores is None:
            scores = self.score(layer, queries, keys, values).float()
            if memo is not None:
                memo[key] = scores
        return scores

    def compress(self, cache, layer, queries, keys, values, memo=None):
        scores = self.scores(layer, queries, keys, values, memo)
        n = self.budget(layer, cache.shape[0], keys.shape[2])
        return scores.topk(n, dim=-1).indices.sort(dim=-1).values


def window_attention(queries: Tensor, keys: Tensor) -> Tensor:
    """Softmax attention [B, H, Tq, S] (float32) of the last Tq prompt queries over the S cached keys, causal
    (query i sits at position S - Tq + i); query heads are grouped over their kv head."""
    B, H, Tq, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    k = keys.float().repeat_interleave(H // Hkv, dim=1)
    logits = queries.float() @ k.transpose(-1, -2)
    causal = torch.arange(S, device=keys.device)[None, :] <= torch.arange(S - Tq, S, device=keys.device)[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def per_kv_head(x: Tensor, kv_heads: int) -> Tensor:
    """[B, H, S] per query head -> [B, Hkv, S], averaging the query heads that share a kv head."""
    B, H, S = x.shape
    return x.view(B, kv_heads, H // kv_heads, S).mean(2)


PROTECTED = 1e30   # above any attention-based score


def protect(scores: Tensor, sinks: int = 0, window: int = 0) -> Tensor:
    """Lift the first ``sinks`` and last ``window`` slots above every other score, so no budget that covers
    them evicts them; a smaller budget keeps the sinks, then the most recent of the window."""
    scores = scores.float().clone()
    if window:
        scores[..., -window:] = PROTECTED * (1 + torch.arange(1, window + 1, device=scores.device) / window)
    if sinks:
        scores[..., :sinks] = 3 * PROTECTED
    return scores


def ragged(per_head: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Head-wise selections (1-D ascending slot tensors of different lengths, one per kv head, batch 1) ->
    (slots [1, Hkv, n] padded by repeating each head's last slot, counts [1, Hkv])."""
    n = max(len(x) for x in per_head)
    rows = [torch.cat([x, x[-1:].expand(n - len(x))]) for x in per_head]
    return torch.stack(rows)[None], torch.tensor([[len(x) for x in per_head]])


PRESSES: dict[str, type[Press]] = {}


def register(cls: type[Press]) -> type[Press]:
    PRESSES[cls.name] = cls
    return cls


def available_presses() -> list[str]:
    return sorted(PRESSES)


def make_press(name: str, compression_ratio: float = 0.0, **kwargs) -> Press:
    """A press by registry name; an unknown name raises UnknownNameError listing the available ones.
    ``"a+b"`` applies a then b (e.g. ``snapkv+kivi2``); the ratio goes to the evicting parts."""
    if ":" in name:     # "name:key=value,..." options, as for drafters and strategies
        name, options = parse_spec(name)
        kwargs = {**options, **kwargs}
    if "+" in name:
        if kwargs:
            raise InvalidArgumentError(f"press options apply to a single press, not to the composition {name!r}")
        from .compose import ComposedPress

        parts = [make_press(n, 0.0) for n in name.split("+")]
        parts = [make_press(n, compression_ratio if p.evicts else 0.0) for n, p in zip(name.split("+"), parts)]
        return ComposedPress(compression_ratio=compression_ratio, parts=parts)
    if name not in PRESSES:
        raise UnknownNameError(f"unknown press {name!r}; available: {', '.join(available_presses())}")
    try:
        return PRESSES[name](compression_ratio=compression_ratio, **kwargs)
    except TypeError as e:
        raise InvalidArgumentError(f"press {name!r}: {e}") from None
