"""SparseAttention: the shared base of the long-context sparse attention methods, and the name -> class registry.

A KV press (tachy.presses) shrinks the cache once and loses what it evicts. A sparse attention method keeps
every key and lets each decoding query read only the ones that matter to it. It is attached to a sequence's
cache after prefill (``attach``), so the prompt is prefilled densely and every generated token, the first
decode step on, reads sparsely.

Every method here shares one shape, which is what keeps speculative decoding exact under it: in a sparse
layer, query row t reads its first ``sinks`` keys, its last ``window`` keys, and ``select`` units (pages of
keys for Quest, single keys for TidalDecode) chosen among the keys in between (the *candidates*). The choice
depends only on the row's own query and the keys it sees, never on which other rows share the forward; and
since ``window`` exceeds the rows of any verify forward, the candidates are committed keys, the same ones
whether the row is verified beside drafts or decoded alone. So a verify row reads the keys one-token decoding
reads, and (in the C decoder) gets its bits.

Two implementations share each method's definition: kernels/decoder.c (``sparse_keys``: the speed, on the
default CPU path) and ``mask`` here (PyTorch: the torch path, CUDA, and the tests' oracle), which turns the
choice into a per-kv-head attention mask [Hkv, T, S].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..cache import KVCache
from ..config import ModelConfig
from ..errors import InvalidArgumentError, UnknownNameError
from ..spec import parse_spec

# a layer's role (decoder.c's LAYER_*): dense, sparse, or (TidalDecode) choosing the keys later layers read
DENSE, SPARSE, SELECT = 0, 1, 2


@dataclass
class SparseAttention:
    """Base method. Subclasses set ``name``, ``method_id`` (decoder.c's) and ``unit`` (keys per candidate
    unit), and implement ``choose`` (PyTorch).

    budget: keys each query row reads per sparse layer and kv head (sinks + chosen + recent window; the
        window is rounded up to a whole unit, so up to ``unit - 1`` more).
    sinks: first keys always read (attention sinks). window: last keys always read (it also bounds the
        verify forwards speculative decoding may run: a draft of at most ``window - 1`` tokens)."""

    budget: int = 1024
    sinks: int = 16
    window: int = 64
    name: ClassVar[str] = "sparse"
    method_id: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for field in ("budget", "sinks", "window"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(f"{self.name}: {field} must be a whole number >= 0, got {value!r}")
        if self.window < 1:
            raise InvalidArgumentError(f"{self.name}: window must be at least 1 key, got {self.window}")
        if self.select < 1:
            raise InvalidArgumentError(
                f"{self.name}: budget {self.budget} leaves nothing to choose after {self.sinks} sinks and a "
                f"{self.window}-key window; it must be at least {self.fixed_keys + self.unit}")

    # -- the shape every method shares ----------------------------------------------------------------------
    @property
    def unit(self) -> int:
        """Keys per candidate unit (Quest: a page; 1 for a method choosing single keys)."""
        return 1

    @property
    def fixed_keys(self) -> int:
        """Keys always read besides the chosen ones: the sinks rounded up to whole units, and the window."""
        return -(-self.sinks // self.unit) * self.unit + self.window

    @property
    def select(self) -> int:
        """Units chosen per row among the candidates."""
        return (self.budget - self.fixed_keys) // self.unit

    def check_draft(self, max_draft_tokens: int) -> None:
        """Verify rows choose like one-token decoding only while their drafts lie inside the recent window."""
        if max_draft_tokens + 1 > self.window:
            raise InvalidArgumentError(
                f"{self.name}: window {self.window} must exceed the verify forward's {max_draft_tokens + 1} "
                f"tokens (max_draft_tokens + 1); raise window or lower max_draft_tokens")

    def layer_roles(self, config: ModelConfig) -> list[int]:
        """DENSE / SPARSE / SELECT per layer. Sliding-window layers (Gemma 3's local ones) read few keys and
        stay dense; every full-attention layer is sparse by default."""
        return [SPARSE if t == "full" else DENSE for t in config.layer_types]

    def prepare(self, engine) -> None:
        """One-time work before a generation under this method (the engine calls it before prefill, outside the
        timed prefill): a method with an offline calibration (Double Sparsity, MInference) loads or computes it
        here. Nothing by default."""

    def attach(self, model, cache: KVCache) -> None:
        """Make ``cache``'s decoding forwards read sparsely (after prefill: the prompt is prefilled densely)."""
        cache.sparse = SparseState(self, self.layer_roles(model.config), cache)

    # -- prefill-time methods (MInference) override these --------------------------------------------------------
    @property
    def sparse_prefill(self) -> bool:
        """Whether the prompt's prefill reads sparsely (then its K/V differ from a dense prefill's)."""
        return False

    def attach_prefill(self, model, cache: KVCache, prompt_tokens: int) -> None:
        """Make ``cache``'s prefill forwards (a prompt of ``prompt_tokens`` tokens) read sparsely; the base
        prefills densely."""

    def c_fields(self, state: "SparseState", cache: KVCache) -> dict:
        """The method's own fields of decoder.c's tq_sparse (buffers kept beside the cache: Quest's page bounds,
        Double Sparsity's labels), by field name; the shared ones are filled in by the caller."""
        return {}

    # -- the PyTorch implementation ---------------------------------------------------------------------------
    def mask(self, state: "SparseState", layer: int, q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
        """The keys each row reads in ``layer``: ``mask`` (visibility, [T, S] or per kv head [Hkv, T, S])
        narrowed to the sinks, the window and the chosen units, per kv head [Hkv, T, S].
        q [1, H, T, D] (rope applied), k [1, Hkv, S, D] the keys attention reads."""
        role = state.roles[layer]
        if role == DENSE:
            return mask
        Hkv, S = k.shape[1], k.shape[2]
        visible = mask if mask.dim() == 3 else mask.expand(Hkv, -1, -1)
        U, units = self.unit, S // self.unit
        first = -(-self.sinks // U)
        end = (visible.sum(-1) - self.window).div(U, rounding_mode="floor")          # [Hkv, T]
        index = torch.arange(units, device=k.device)
        candidate = (index >= first) & (index < end[..., None])                       # [Hkv, T, units]
        chosen = self.choose(state, layer, q, k, visible, candidate, scale)
        if chosen is None:   # a selection layer reads densely
            return mask
        keep = (~candidate | chosen).repeat_interleave(U, -1)
        keep = torch.cat([keep, keep.new_ones(*keep.shape[:2], S - keep.shape[-1])], -1)
        return visible & keep

    def choose(self, state: "SparseState", layer: int, q: Tensor, k: Tensor, visible: Tensor, candidate: Tensor,
               scale: float) -> Tensor | None:
        """[Hkv, T, units] bool: the units each row reads among its candidates (None: this layer reads densely)."""
        raise NotImplementedError

    def top(self, score: Tensor, candidate: Tensor) -> Tensor:
        """The ``select`` best-scoring candidates per row ([Hkv, T, units] bool; all when fewer)."""
        score = score.float().masked_fill(~candidate, float("-inf"))
        n = min(self.select, score.shape[-1])
        chosen = torch.zeros_like(candidate)
        chosen.scatter_(-1, score.topk(n, dim=-1).indices, True)
        return chosen & candidate

    # -- cost ---------------------------------------------------------------------------------------------------
    def keys_read(self, role: int, context: int) -> float:
        """K/V rows (a key and its value) one query reads per kv head in a layer of ``role`` at ``context``
        keys, a method's own metadata counted in row equivalents."""
        if role == DENSE:
            return float(context)
        return float(min(context, self.fixed_keys + self.select * self.unit))

    def kv_bytes_per_token(self, config: ModelConfig, context: int, dtype_bytes: int = 2) -> int:
        """Bytes of K/V one decoded token reads over all layers at ``context`` cached tokens (the benchmark's
        "K/V bytes read"; sliding-window layers read their window)."""
        total = sum(self.keys_read(role, keys) for role, keys in zip(self.layer_roles(config),
                                                                       layer_keys(config, context)))
        return round(total * config.num_kv_heads * 2 * config.head_dim * dtype_bytes)


def layer_keys(config: ModelConfig, context: int) -> list[int]:
    """The keys a decoded token's query sees in each layer at ``context`` cached tokens (a sliding layer: its
    window)."""
    return [min(context, config.sliding_window or context) if kind == "sliding" else context
            for kind in config.layer_types]


def kv_read_per_token(config: ModelConfig, attention: str | None, context: int, kept: float = 1.0,
                      dtype_bytes: int = 2) -> int:
    """Bytes of K/V one decoded token reads at ``context`` cached tokens under ``attention`` (a spec; None or
    "dense": dense attention): a sparse method's own count; dense attention reads every key it sees (a sliding
    layer its window). ``kept``: the share of the uncompressed cache's bytes a press left (its bytes over
    ``KVCache.uncompressed_nbytes``), applied to dense attention's count: an estimate where a press keeps
    layers unevenly or a window holds fewer slots than it kept."""
    method = make_attention(attention) if attention else None
    if method is not None:
        return method.kv_bytes_per_token(config, context, dtype_bytes)
    dense = sum(layer_keys(config, context)) * config.num_kv_heads * 2 * config.head_dim * dtype_bytes
    return round(dense * kept)


class SparseState:
    """What one sequence's cache carries for its sparse attention (``cache.sparse``): the method, each layer's
    role, Quest's page bounds (Double Sparsity's labels) for the C decoder and the number of leading pages
    (slots) whose bounds (labels) are current (``bounded``, per cache row; ``truncate`` when committed slots
    change), and TidalDecode's last choice on the PyTorch path."""

    def __init__(self, method: SparseAttention, roles: list[int], cache: KVCache):
        self.method, self.roles = method, roles
        self.roles_u8 = torch.tensor(roles, dtype=torch.uint8)    # for the C decoder
        self.bounded = torch.zeros(cache.shape[1], dtype=torch.int64)
        self.bounds: Tensor | None = None
        self.chosen: Tensor | None = None
        self.channel_index: Tensor | None = None   # Double Sparsity: label channels [layers, kv_heads, channels]
        self.labels: Tensor | None = None          # Double Sparsity: the C decoder's label cache

    def c_fields(self, cache: KVCache) -> dict:
        """decoder.c's tq_sparse fields besides method, sinks, window and layers: the shared ones and the
        method's own (``SparseAttention.c_fields``)."""
        return dict(page=self.method.unit, select=self.method.select, bounded=self.bounded.data_ptr(),
                    **self.method.c_fields(self, cache))

    def truncate(self, length: int) -> None:
        """Slots from ``length`` on changed (rollback, a tree commit): pages reaching them need new bounds."""
        self.bounded.clamp_(max=length // self.method.unit)

    def page_bounds(self, cache: KVCache) -> Tensor:
        """Quest's bound buffer, bf16 [layers, batch, kv_heads, pages, 2, head_dim], covering the cache."""
        layers, batch, heads, dim = cache.shape
        pages = -(-cache.capacity // self.method.unit)
        if self.bounds is None or self.bounds.shape[3] < pages:
            self.bounds = torch.empty(layers, batch, heads, pages, 2, dim, dtype=torch.bfloat16)
            self.bounded.zero_()
        return self.bounds


ATTENTIONS: dict[str, type[SparseAttention]] = {}


def register(cls: type[SparseAttention]) -> type[SparseAttention]:
    ATTENTIONS[cls.name] = cls
    return cls


def available_attentions() -> list[str]:
    return sorted(ATTENTIONS)


def make_attention(spec: str, **kwargs) -> SparseAttention | None:
    """A method by registry name, with options as ``"quest:budget=512,page_size=16"``; ``"dense"`` (or
    ``"none"``) is None, plain attention. An unknown name raises UnknownNameError listing the available ones."""
    name, options = parse_spec(spec)
    if name in ("dense", "none", ""):
        if options or kwargs:
            raise InvalidArgumentError(f"dense attention takes no options, got {spec!r}")
        return None
    if name not in ATTENTIONS:
        raise UnknownNameError(f"unknown attention {name!r}; available: dense, {', '.join(available_attentions())}")
    try:
        return ATTENTIONS[name](**{**options, **kwargs})
    except TypeError as e:
        raise InvalidArgumentError(f"attention {name!r}: {e}") from None
