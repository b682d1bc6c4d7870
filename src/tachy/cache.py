"""KVCache: one preallocated buffer per model, written by slot, so rollback and tree pruning are bookkeeping.

Layout: ``k`` and ``v`` are ``[layers, batch, kv_heads, capacity, head_dim]``. A forward over T new tokens
writes them at slots ``length .. length+T-1`` and every layer reads slots ``0 .. length+T-1``; the model then
calls ``advance(T)``. Slot order is position order for everything committed, so a dropped draft costs nothing
(``rollback``) and an accepted tree path costs one small gather (``keep``).

``fixed=True`` hands attention the whole buffer (unused slots masked out), and the model then reads, for each
row, the keys up to its slot's bucket (``key_bucket``). That is what makes speculative decoding exact in bf16:
a query's attention reduces over the same number of keys whether it is computed alone (plain decoding) or
beside draft tokens (verification), and on this CPU the kernels then give it bitwise the same result. Size
such a cache once, to a whole number of buckets (the engine uses prompt + max_new_tokens, rounded up).

Compression (tachy.presses) separates the slot from the position: ``position`` is the next logical (rope)
position and only advances/rolls back with tokens, while ``compact`` moves each (layer, head)'s kept entries
down to slots ``0..n-1``. A compressed cache carries ``slot_pos`` (each slot's position, for sliding windows)
and ``valid`` (head-wise budgets leave padding slots that attention must not read); both are None otherwise,
so the uncompressed path is untouched. A quantized press (presses/kivi.py) moves the first slots into a
low-precision ``prefix`` that attention reads dequantized; the full-precision buffer then starts at slot
``prefix.length``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

KEY_BUCKET = 64   # key counts come in multiples of this: some odd counts pick a kernel that is not row-invariant


def key_bucket(n: int) -> int:
    """``n`` rounded up to a whole number of key buckets."""
    return -(-n // KEY_BUCKET) * KEY_BUCKET


class KVCache:
    can_rollback = True
    ragged = False     # True: BatchKVCache (rows at their own lengths)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int = 256, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", fixed: bool = False):
        self.shape = (num_layers, batch, num_kv_heads, head_dim)
        self.fixed = fixed
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.position = 0                          # next logical position (== length until compressed)
        self.k = self.v = torch.empty(0)
        self.valid: torch.Tensor | None = None     # [layers, batch, kv_heads, capacity] bool, once compressed
        self.slot_pos: torch.Tensor | None = None  # [layers, batch, kv_heads, capacity] long, once compressed
        self.observer = None                       # press hook: observer(layer, q) during prefill
        self.prefix = None                         # quantized first slots: .length, .read(layer), .nbytes
        self.sparse = None                         # decode-time sparse attention state (tachy.sparse.SparseState)
        self._layer_views: tuple | None = None     # (k, v, per-layer views), see layer_views
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        layers, batch, heads, dim = self.shape
        base, held = self._base, self.length - self._base
        k = torch.zeros(layers, batch, heads, capacity - base, dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if held:
            k[:, :, :, :held] = self.k[:, :, :, :held]
            v[:, :, :, :held] = self.v[:, :, :, :held]
        self.k, self.v = k, v
        if self.valid is not None:
            self.valid = _grow(self.valid, capacity, self.length)
            self.slot_pos = _grow(self.slot_pos, capacity, self.length)

    @property
    def _base(self) -> int:
        """First slot held in the full-precision buffer (0 unless a quantized prefix holds the earlier ones)."""
        return 0 if self.prefix is None else self.prefix.length

    @property
    def prefix_attends(self) -> bool:
        """The quantized prefix computes its own attention (tachy.presses.int4kv): ``write`` returns only the
        full-precision tail and the model merges the two (models/llama.py ``prefix_attention``)."""
        return hasattr(self.prefix, "attend")

    @property
    def capacity(self) -> int:
        return self._base + self.k.shape[3]

    def layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (k, v) [B, H, capacity, D], views of the buffers kept until these are replaced: a lean
        one-token step (models/draft_step.py) then indexes one small tensor per write and read instead of the
        whole 5-dim buffer, a few dispatches fewer per layer."""
        views = self._layer_views
        if views is None or views[0] is not self.k or views[1] is not self.v:
            views = self._layer_views = (self.k, self.v, [(self.k[i], self.v[i]) for i in range(self.shape[0])])
        return views[2]

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more slots, growing geometrically so growth is rare."""
        need = self.length + new_tokens
        if need > self.capacity:
            self._allocate(max(need, 2 * self.capacity))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, H, T, D] at the next slots; return the keys/values attention reads
        (the used slots, or the whole buffer when ``fixed``)."""
        if self.prefix is not None:
            return self._write_after_prefix(layer, k, v)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if self.fixed:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _write_after_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start = self.length - self._base
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        stop = None if self.fixed else end
        tail_k, tail_v = self.k[layer, :, :, :stop], self.v[layer, :, :, :stop]
        if self.prefix_attends:
            return tail_k, tail_v
        pk, pv = self.prefix.read(layer)
        return torch.cat([pk, tail_k], 2), torch.cat([pv, tail_v], 2)

    @contextmanager
    def plain_rows(self) -> Iterator[None]:
        """Forwards inside the block attend like a growing cache: one causal attention over the used slots,
        not ``fixed``'s per-row buckets. For the prompt: plain and speculative decoding share its prefill, so its
        rows need not reproduce one-token decoding, and the per-row path is about 2x slower there (measured:
        1.7 vs 0.8 s for a 700-token SmolLM2 prompt, most of it attention)."""
        fixed, self.fixed = self.fixed, False
        try:
            yield
        finally:
            self.fixed = fixed

    def key_count(self, new_tokens: int) -> int:
        """How many key slots a forward over ``new_tokens`` tokens attends over."""
        return self.capacity if self.fixed else self.length + new_tokens

    def advance(self, n: int) -> None:
        self.length += n
        self.position += n

    def rollback(self, n: int) -> None:
        """Forget the newest ``n`` slots (a rejected draft)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} cached tokens")
        self.length -= n
        self.position -= n
        if self.sparse is not None:
            self.sparse.truncate(self.length)

    def keep(self, slots: list[int]) -> None:
        """Keep only ``slots`` (ascending) among the slots from ``slots[0]`` on; earlier slots stay untouched.

        Used after tree verification (keep the accepted path) and by eviction. The kept entries move down to
        ``slots[0], slots[0]+1, ...`` so slot order stays position order.
        """
        if not slots:
            raise ValueError("keep() needs at least one slot")
        first = slots[0]
        if any(b <= a for a, b in zip(slots, slots[1:])) or slots[-1] >= self.length or first < self._base:
            raise ValueError(f"slots must be ascending and below the cache length {self.length}: {slots}")
        n = len(slots)
        if self.sparse is not None:
            self.sparse.truncate(first)
        if slots[-1] != first + n - 1:  # not already contiguous: gather the survivors down
            index = torch.tensor(slots, device=self.device)
            local, base = index - self._base, first - self._base
            self.k[:, :, :, base:base + n] = self.k.index_select(3, local)
            self.v[:, :, :, base:base + n] = self.v.index_select(3, local)
            if self.valid is not None:
                self.valid[..., first:first + n] = self.valid.index_select(3, index)
                self.slot_pos[..., first:first + n] = self.slot_pos.index_select(3, index)
        self.position -= self.length - (first + n)
        self.length = first + n

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (LongTensor [B'], repeats allowed): beam search reorders its beams
        and copies a prefilled prompt into every beam this way."""
        self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.shape = (self.shape[0], int(index.shape[0]), *self.shape[2:])

    def reset(self) -> None:
        capacity = self.capacity
        self.length = self.position = 0
        self.valid = self.slot_pos = None
        self.sparse = None
        if self.prefix is not None:
            self.prefix = None
            self._allocate(capacity)

    # -- compression ------------------------------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        return self.valid is not None

    def compact(self, kept: list[torch.Tensor], counts: list[torch.Tensor] | None = None) -> None:
        """Keep, for each layer, the slots ``kept[layer]`` [batch, kv_heads, n_layer] (ascending per head) and
        move them down to slots ``0..n_layer-1``; layers with smaller budgets are padded to the largest and the
        padding is marked invalid. Head-wise budgets: ``counts[layer]`` [batch, kv_heads] says how many of a
        head's entries are real, the rest is padding. The logical position does not change (kept keys carry
        their rope)."""
        if self.prefix is not None:
            raise ValueError("compact() a quantized cache: evict first, then quantize")
        if len(kept) != self.shape[0]:
            raise ValueError(f"compact() needs kept slots for all {self.shape[0]} layers, got {len(kept)}")
        positions = self.slot_positions()
        n = max(k.shape[-1] for k in kept)
        valid = torch.zeros_like(positions, dtype=torch.bool)
        for layer, idx in enumerate(kept):
            m = idx.shape[-1]
            index = idx.to(self.device)[..., None].expand(-1, -1, -1, self.shape[3])
            self.k[layer, :, :, :m] = self.k[layer].gather(2, index)
            self.v[layer, :, :, :m] = self.v[layer].gather(2, index)
            positions[layer, :, :, :m] = positions[layer].gather(2, idx.to(self.device))
            valid[layer, :, :, :m] = self.valid[layer].gather(2, idx.to(self.device)) if self.valid is not None \
                else True
            if counts is not None:
                valid[layer, :, :, :m] &= torch.arange(m, device=self.device) < counts[layer].to(self.device)[..., None]
        self.valid, self.slot_pos, self.length = valid, positions, n
        if self.sparse is not None:
            self.sparse.truncate(0)

    def evict_after(self, start: int, kept: torch.Tensor) -> None:
        """Keep, of the slots from ``start`` on, those in ``kept`` [layers, batch, kv_heads, n] (ascending per
        head, each >= ``start``) and move them down to slots ``start..start+n-1``; slots before ``start`` stay
        as they are. Eviction while decoding (presses/scope.py): the compressed prompt is left alone, and the
        gather touches only the generated tokens' slots, all layers in one op. Positions do not change."""
        if self.prefix is not None:
            raise ValueError("evict_after() on a quantized cache")
        if kept.dim() != 4 or kept.shape[:3] != self.shape[:3]:
            raise ValueError(f"evict_after() needs kept slots [layers, batch, kv_heads, n], got {tuple(kept.shape)}")
        if self.valid is None:   # first eviction of an uncompressed cache: every held slot is real
            self.slot_pos = self.slot_positions()
            self.valid = torch.zeros_like(self.slot_pos, dtype=torch.bool)
            self.valid[..., :self.length] = True
        n, index = kept.shape[-1], kept.to(self.device)
        slots = torch.arange(start, start + n, device=self.device)
        stay = int((index == slots).flatten(0, 2).all(0).long().cumprod(0).sum())   # already in place
        if stay < n:   # move the rest: one index_select over the buffer's rows ([layers * batch * kv_heads *
            # capacity, head_dim]) and one strided copy per buffer (a 5-dim gather is ~10x slower here)
            heads, capacity, dim = index.shape[0] * index.shape[1] * index.shape[2], self.k.shape[3], self.shape[3]
            first = torch.arange(heads, device=self.device)[:, None] * capacity
            source = (first + index.reshape(heads, n)[:, stay:]).reshape(-1)
            for buf in (self.k, self.v):
                moved = buf.view(-1, dim).index_select(0, source).view(heads, n - stay, dim)
                buf.view(heads, capacity, dim)[:, start + stay:start + n] = moved
            self.slot_pos[..., start + stay:start + n] = self.slot_pos.gather(3, index[..., stay:])
            self.valid[..., start + stay:start + n] = self.valid.gather(3, index[..., stay:])
        self.valid[..., start + n:self.length] = False
        self.length = start + n
        if self.sparse is not None:
            self.sparse.truncate(start)

    def slot_positions(self) -> torch.Tensor:
        """[layers, batch, kv_heads, capacity] logical position of each slot (slot index when uncompressed)."""
        if self.slot_pos is not None:
            return self.slot_pos.clone()
        layers, batch, heads, _ = self.shape
        return torch.arange(self.capacity, device=self.device).expand(layers, batch, heads, -1).clone()

    def layer_mask(self, layer: int, mask: torch.Tensor, positions: torch.Tensor,
                   window: int | None) -> torch.Tensor:
        """Per-head mask [kv_heads, T, S] of a compressed cache: the slot mask [T, S] (causal or tree), less
        the padding slots and, for a sliding-window layer, the keys ``window`` or more positions behind."""
        S = mask.shape[1]
        ok = mask[None] & self.valid[layer, 0, :, None, :S]
        if window is not None:
            ok = ok & (positions[None, :, None] - self.slot_pos[layer, 0, :, None, :S] < window)
        return ok

    def mark_new(self, positions: torch.Tensor) -> None:
        """Record the slots and positions the next forward writes (compressed caches only)."""
        end = self.length + positions.shape[0]
        self.valid[..., self.length:end] = True
        self.slot_pos[..., self.length:end] = positions

    def freeze_prefix(self, prefix) -> None:
        """Hand slots ``0..prefix.length-1`` to ``prefix`` (already holding them, quantized) and free them from
        the full-precision buffer, which then starts at ``prefix.length``."""
        if self.prefix is not None or not 0 < prefix.length <= self.length:
            raise ValueError(f"cannot freeze {prefix.length} of {self.length} slots")
        n = prefix.length
        self.k, self.v = self.k[:, :, :, n:].clone(), self.v[:, :, :, n:].clone()
        self.prefix = prefix

    def clone(self) -> "KVCache":
        """A deep copy (the eval compresses copies of one prefilled cache)."""
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__)
        other.k, other.v = self.k.clone(), self.v.clone()
        if self.valid is not None:
            other.valid, other.slot_pos = self.valid.clone(), self.slot_pos.clone()
        other.observer = other.sparse = None
        return other

    @property
    def _entry_bytes(self) -> int:
        """Bytes of one (layer, batch row, kv head) slot: its key and its value."""
        return self.shape[3] * self.k.element_size() * 2

    @property
    def uncompressed_nbytes(self) -> int:
        """Bytes a plain cache in this dtype would hold for the same tokens (what ``nbytes`` is compared to)."""
        layers, batch, heads, _ = self.shape
        return self.position * layers * batch * heads * self._entry_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of K/V actually held (the used slots; for a compressed cache the valid entries only, and the
        quantized prefix's packed bytes and scales), as compression reports compare."""
        base = self._base
        prefix = 0 if self.prefix is None else self.prefix.nbytes
        if self.valid is not None:
            if base:  # padding slots (head-wise budgets) quantized along: count the valid share only
                prefix = round(prefix * float(self.valid[..., :base].float().mean()))
            entries = int(self.valid[..., base:self.length].sum())
            return prefix + entries * self._entry_bytes
        layers, batch, heads, _ = self.shape
        return prefix + layers * batch * heads * self._entry_bytes * (self.length - base)


class BatchKVCache(KVCache):
    """Independent sequences in the rows of one fixed-size buffer, each at its own length (continuous batching,
    tachy.batch). A forward runs one new token for each entry of ``rows`` (a cache row): a row listed n times
    gets n tokens in a row (a speculative row's root and draft), written from its slot ``lengths[row]`` on.
    Attention then reads, per token at slot s, its row's first ``key_bucket(s + 1)`` keys: the row's
    committed ones and, of this forward's, those ``entry_mask`` lets it see (by default its row's earlier
    entries: a chain), the shapes one-token decoding (or a lone verify forward) of that sequence has
    (models/llama.py ``ragged_attention``)."""

    ragged = True
    can_rollback = False

    def __init__(self, *args, lazy: bool = False, **kwargs):
        """lazy: leave the buffer uninitialized, so memory is taken only as rows write their slots (the
        operating system maps pages on first touch): a cache sized for the whole context window from the
        start never needs growing, i.e. never copies itself while rows wait. Only for forwards that read no
        slot beyond a row's length (the C forward); the PyTorch forward reads masked slots, which must be 0."""
        self._lazy = lazy
        super().__init__(*args, fixed=True, **kwargs)
        self.lengths = [0] * self.shape[1]
        self.rows: list[int] = []              # cache rows of the next forward's batch entries, in order
        # [B, B] bool: which of the next forward's entries each one sees (a row's draft tree mask on the
        # diagonal block); None: its own row's earlier entries and itself
        self.entry_mask: torch.Tensor | None = None
        self._index: tuple | None = None       # (rows, slots, groups) of the next forward, built once

    def reserve(self, new_tokens: int) -> None:
        self._index = None
        if any(slot >= self.capacity for slot in self.slots()):
            raise ValueError("a batch row is full: grow() the cache before its forward")

    def slots(self) -> list[int]:
        """The write slot of each entry of ``rows``: a row's entries take consecutive slots from its length."""
        seen: dict[int, int] = {}
        out = []
        for r in self.rows:
            out.append(self.lengths[r] + seen.get(r, 0))
            seen[r] = seen.get(r, 0) + 1
        return out

    def index(self) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """For the next forward: the cache rows and write slots [B], and the entries grouped by key count:
        ``(key_bucket(slot + 1), batch entries, their cache rows)`` (models/llama.py ``ragged_attention``)."""
        if self._index is None:
            slots = self.slots()
            buckets = [key_bucket(s + 1) for s in slots]
            groups = []
            for keys in sorted(set(buckets)):
                entries = [b for b, n in enumerate(buckets) if n == keys]
                groups.append((keys, torch.tensor(entries, device=self.device),
                               torch.tensor([self.rows[b] for b in entries], device=self.device)))
            self._index = (torch.tensor(self.rows, device=self.device), torch.tensor(slots, device=self.device),
                           groups)
        return self._index

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v [B, H, 1, D], entry b for cache row ``rows[b]`` at its slot; returns the whole buffer
        [batch, H, S, D] (a row's later entries read its earlier ones' keys: all are written first)."""
        rows, slots, _ = self.index()
        self.k[layer][rows, :, slots] = k[:, :, 0]
        self.v[layer][rows, :, slots] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """After a forward of ``n`` = 1 token per entry: each row's length grows by its entries' count."""
        for r in self.rows:
            self.lengths[r] += n
        self._index = None

    def load(self, row: int, cache: KVCache) -> None:
        """Copy a single sequence's (uncompressed) cache into ``row``."""
        n = cache.length
        self.load_kv(row, cache.k[:, 0, :, :n], cache.v[:, 0, :, :n])

    def load_kv(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill ``row`` with one sequence's K/V, k/v [layers, kv heads, length, dim]."""
        n = k.shape[2]
        if n > self.capacity:
            self.grow(n)
        self.k[:, row, :, :n], self.v[:, row, :, :n] = k, v
        self.lengths[row] = n
        self._index = None

    def row_kv(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of ``row``'s K/V, [layers, kv heads, length, dim] each (``load_kv`` puts it back)."""
        n = self.lengths[row]
        return self.k[:, row, :, :n].clone(), self.v[:, row, :, :n].clone()

    def _allocate(self, capacity: int) -> None:
        if not self._lazy:
            return super()._allocate(capacity)
        layers, batch, heads, dim = self.shape
        self.k = torch.empty(layers, batch, heads, capacity, dim, dtype=self.dtype, device=self.device)
        self.v = torch.empty_like(self.k)

    def keep_row(self, row: int, slots: list[int]) -> None:
        """In cache row ``row``: keep ``slots`` (ascending) from ``slots[0]`` on, moved down to be contiguous,
        and set the row's length after them (a verified draft tree's accepted path, like KVCache.keep)."""
        first, n = slots[0], len(slots)
        if slots[-1] != first + n - 1:
            index = torch.tensor(slots, device=self.device)
            k, v = self.k[:, row], self.v[:, row]        # [L, H, S, D] views
            k[:, :, first:first + n] = k.index_select(2, index)
            v[:, :, first:first + n] = v.index_select(2, index)
        self.lengths[row] = first + n
        self._index = None

    def grow(self, capacity: int) -> None:
        """At least ``capacity`` slots per row (rows keep their keys)."""
        if capacity > self.capacity:
            held = max(self.lengths)
            k = torch.zeros(*self.k.shape[:3], capacity, self.k.shape[4], dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            k[:, :, :, :held], v[:, :, :, :held] = self.k[:, :, :, :held], self.v[:, :, :, :held]
            self.k, self.v = k, v

    def row_masks(self, windows: list[int | None], positions: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """Per distinct window (None: full attention): [B, 1, 1, capacity] bool, entry b (at ``positions[b]``)
        sees its row's committed slots and the entries ``entry_mask`` allows (by default its row's up to
        itself), and with a window only the keys less than ``window`` positions behind it (a committed slot's
        position is the slot, an entry's its own)."""
        slots = torch.arange(self.capacity, device=self.device)
        new = self.index()[1]
        masks = {}
        if self.entry_mask is None:   # chains: every entry at position = slot
            for w in set(windows):
                ok = slots <= new[:, None]
                if w is not None:
                    ok = ok & (new[:, None] - slots < w)
                masks[w] = ok[:, None, None]
            return masks
        B = len(new)
        committed = slots < torch.tensor([self.lengths[r] for r in self.rows], device=self.device)[:, None]
        behind = positions[:, None] - positions[None, :]          # [B, B]: how far entry e is behind entry b
        for w in set(windows):
            ok, seen = committed, self.entry_mask.to(self.device)
            if w is not None:
                ok, seen = ok & (positions[:, None] - slots < w), seen & (behind < w)
            # entries onto their slots (summed: another row's entry at the same slot adds nothing, unseen)
            at = torch.zeros(B, self.capacity, device=self.device).scatter_add_(1, new.expand(B, -1), seen.float())
            masks[w] = (ok | (at > 0))[:, None, None]
        return masks


def _grow(t: torch.Tensor, capacity: int, length: int) -> torch.Tensor:
    out = torch.zeros(*t.shape[:3], capacity, dtype=t.dtype, device=t.device)
    out[..., :length] = t[..., :length]
    return out
