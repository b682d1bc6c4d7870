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
"""
from __future__ import annotations

import torch

KEY_BUCKET = 64   # key counts come in multiples of this: some odd counts pick a kernel that is not row-invariant


def key_bucket(n: int) -> int:
    """``n`` rounded up to a whole number of key buckets."""
    return -(-n // KEY_BUCKET) * KEY_BUCKET


class KVCache:
    can_rollback = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int = 256, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", fixed: bool = False):
        self.shape = (num_layers, batch, num_kv_heads, head_dim)
        self.fixed = fixed
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.k = self.v = torch.empty(0)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        layers, batch, heads, dim = self.shape
        k = torch.zeros(layers, batch, heads, capacity, dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if self.length:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more slots, growing geometrically so growth is rare."""
        need = self.length + new_tokens
        if need > self.capacity:
            self._allocate(max(need, 2 * self.capacity))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, H, T, D] at the next slots; return the keys/values attention reads
        (the used slots, or the whole buffer when ``fixed``)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if self.fixed:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def key_count(self, new_tokens: int) -> int:
        """How many key slots a forward over ``new_tokens`` tokens attends over."""
        return self.capacity if self.fixed else self.length + new_tokens

    def advance(self, n: int) -> None:
        self.length += n

    def rollback(self, n: int) -> None:
        """Forget the newest ``n`` slots (a rejected draft)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} cached tokens")
        self.length -= n

    def keep(self, slots: list[int]) -> None:
        """Keep only ``slots`` (ascending) among the slots from ``slots[0]`` on; earlier slots stay untouched.

        Used after tree verification (keep the accepted path) and by eviction. The kept entries move down to
        ``slots[0], slots[0]+1, ...`` so slot order stays position order.
        """
        if not slots:
            raise ValueError("keep() needs at least one slot")
        first = slots[0]
        if any(b <= a for a, b in zip(slots, slots[1:])) or slots[-1] >= self.length or first < 0:
            raise ValueError(f"slots must be ascending and below the cache length {self.length}: {slots}")
        n = len(slots)
        if slots[-1] != first + n - 1:  # not already contiguous: gather the survivors down
            index = torch.tensor(slots, device=self.device)
            self.k[:, :, :, first:first + n] = self.k.index_select(3, index)
            self.v[:, :, :, first:first + n] = self.v.index_select(3, index)
        self.length = first + n

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (LongTensor [B'], repeats allowed): beam search reorders its beams
        and copies a prefilled prompt into every beam this way."""
        self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.shape = (self.shape[0], int(index.shape[0]), *self.shape[2:])

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of K/V actually held (the used slots), as compression reports will compare."""
        per_slot = self.k[:, :, :, :1].numel() * self.k.element_size() * 2
        return per_slot * self.length
