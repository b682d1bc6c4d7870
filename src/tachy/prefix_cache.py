"""PrefixCache: the K/V of token prefixes kept across requests and turns, so a prompt that starts like an
earlier sequence prefills only what is new (the second turn of a chat, a shared system prompt).

Blocks of ``BLOCK_TOKENS`` tokens form a tree, a radix tree at block granularity: a block is found among its
parent's children by its own tokens, so a match is exact, never a hash collision, and a block's K/V always
come from the same preceding tokens. A generation copies the matched blocks' K/V into its own cache (a copy of
~1.5 MB per SmolLM2 block, milliseconds against a prefill of seconds) and prefills the rest; after its prompt,
and again when it ends, it stores the blocks it completed (committed tokens only: rejected drafts are never
in a cache's committed slots, see KVCache.keep).

Exactness: the engine uses the cache only with the row-exact C forward (models/cpu_forward.py), where a
token's K/V are the same bits whichever forward computed them (a prefill chunk of any size, a verification
row, a packed batch row), so a hit gives the cold prefill's logits bit for bit. Only K/V a dense prefill would
compute are stored: a press bypasses the cache (a compressed cache is never stored, nor filled from full
blocks), and under sparse attention only the prompt's blocks are (its generated tokens' K/V differ from a
prefill's). ``tag`` keeps apart blocks computed otherwise (for a caller whose prefill differs).

Memory: at most ``max_bytes`` of blocks; storing past it evicts least recently used leaf blocks (a leaf: a
parent is always used at least as recently as its children, and evicting it first would strand them).
A block copied out by ``match`` is pinned until ``release``: eviction never frees a block in use.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .errors import InvalidArgumentError

if TYPE_CHECKING:   # tensors only pass through: `tachy serve --help` need not import torch for the default budget
    import torch

BLOCK_TOKENS = 64
DEFAULT_MB = 1024   # ~45k SmolLM2 tokens of bf16 K/V; a small part of this 24 GiB machine


@dataclass(eq=False)
class _Block:
    tokens: tuple[int, ...]
    parent: "_Block | None"
    k: torch.Tensor | None = None      # [layers, kv_heads, BLOCK_TOKENS, head_dim]
    v: torch.Tensor | None = None
    children: dict = field(default_factory=dict)
    pins: int = 0
    used: int = 0                      # the cache's clock at the last match or store through this block

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


@dataclass
class PrefixHit:
    """Blocks matched for a prompt, pinned until ``PrefixCache.release``: ``tokens`` of K/V to copy."""

    blocks: list[_Block]

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK_TOKENS


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0                 # lookups that reused at least one block
    looked_up_tokens: int = 0     # prompt tokens offered to the cache
    reused_tokens: int = 0        # of them, tokens whose K/V came from the cache
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """Block K/V of earlier sequences (see the module docstring), shared by every generation of one engine."""

    def __init__(self, max_bytes: int = DEFAULT_MB << 20):
        if not max_bytes > 0:
            raise InvalidArgumentError(f"the prefix cache needs a budget above 0 bytes, got {max_bytes} "
                                       "(turn it off instead: prefix_cache=False, or --no-prefix-cache)")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.stats = PrefixCacheStats()
        self._roots: dict[tuple, _Block] = {}   # (tag, first block's tokens) -> block
        self._clock = 0
        self._lock = threading.Lock()

    @classmethod
    def from_mb(cls, mb: float) -> "PrefixCache":
        return cls(int(mb * (1 << 20)))

    @property
    def blocks(self) -> int:
        return sum(1 for _ in self._walk())

    # -- reading ------------------------------------------------------------------------------------------------
    def match(self, ids: Sequence[int], tag: str = "") -> PrefixHit:
        """The longest run of cached whole blocks that ``ids`` starts with, pinned (call ``release``). Pass
        the prompt without its last token: that one must run through the model to give the first logits."""
        with self._lock:
            self._clock += 1
            blocks, children = [], None
            for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
                key = tuple(ids[start:start + BLOCK_TOKENS])
                block = (self._roots.get((tag, key)) if children is None else children.get(key))
                if block is None:
                    break
                blocks.append(block)
                children = block.children
            for block in blocks:
                block.pins += 1
                block.used = self._clock
            self.stats.lookups += 1
            self.stats.hits += bool(blocks)
            self.stats.looked_up_tokens += len(ids)
            self.stats.reused_tokens += len(blocks) * BLOCK_TOKENS
            return PrefixHit(blocks)

    def release(self, hit: PrefixHit) -> None:
        with self._lock:
            for block in hit.blocks:
                block.pins -= 1
            hit.blocks = []

    def load(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, tag: str = "") -> int:
        """Copy the cached K/V of ``ids``' longest cached prefix into one sequence's buffers ``k``/``v``
        [layers, kv_heads, capacity, head_dim] at slots 0.. ; returns how many tokens were copied."""
        hit = self.match(ids, tag)
        try:
            for i, block in enumerate(hit.blocks):
                at = slice(i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS)
                k[:, :, at] = block.k
                v[:, :, at] = block.v
            return hit.tokens
        finally:
            self.release(hit)

    # -- writing ------------------------------------------------------------------------------------------------
    def store(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, tag: str = "") -> int:
        """Keep the whole blocks of ``ids``, whose K/V are at slots 0..len(ids)-1 of ``k``/``v`` [layers,
        kv_heads, capacity, head_dim]; blocks already cached are only touched. Returns the blocks added (fewer
        when the budget is held by pinned blocks)."""
        with self._lock:
            self._clock += 1
            path, children = [], None
            new_from = 0
            for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
                key = tuple(ids[start:start + BLOCK_TOKENS])
                block = self._roots.get((tag, key)) if children is None else children.get(key)
                if block is None:
                    break
                block.used = self._clock
                path.append(block)
                children = block.children
                new_from = start + BLOCK_TOKENS
            for block in path:   # the path the new blocks hang from stays while they are copied
                block.pins += 1
        added = 0
        try:
            parent = path[-1] if path else None
            for start in range(new_from, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
                at = slice(start, start + BLOCK_TOKENS)
                block = _Block(tuple(ids[at]), parent, k[:, :, at].clone(), v[:, :, at].clone())
                with self._lock:
                    if not self._make_room(block.nbytes):
                        break
                    self._clock += 1
                    block.used = self._clock
                    siblings = self._roots if parent is None else parent.children
                    key = (tag, block.tokens) if parent is None else block.tokens
                    if key in siblings:          # stored meanwhile by another generation
                        block = siblings[key]
                    else:
                        siblings[key] = block
                        self.nbytes += block.nbytes
                        self.stats.stored_blocks += 1
                        added += 1
                    block.pins += 1
                    path.append(block)
                parent = block
        finally:
            with self._lock:
                for block in path:
                    block.pins -= 1
        return added

    def clear(self) -> None:
        with self._lock:
            self._roots.clear()
            self.nbytes = 0

    # -- internals ------------------------------------------------------------------------------------------------
    def _walk(self):
        stack = list(self._roots.values())
        while stack:
            block = stack.pop()
            yield block
            stack.extend(block.children.values())

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used unpinned leaves until ``nbytes`` more fit; False if they cannot."""
        if nbytes > self.max_bytes:
            return False
        while self.nbytes + nbytes > self.max_bytes:
            leaves = [b for b in self._walk() if not b.children and not b.pins]
            if not leaves:
                return False
            victim = min(leaves, key=lambda b: b.used)
            siblings = self._roots if victim.parent is None else victim.parent.children
            key = next(key for key, b in siblings.items() if b is victim)
            del siblings[key]
            self.nbytes -= victim.nbytes
            self.stats.evicted_blocks += 1
        return True
