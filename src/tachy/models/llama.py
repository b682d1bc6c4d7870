"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM) in one readable file.

References: Touvron et al. 2023 (Llama), Hugging Face transformers' modeling_llama.py (weight names and
numerics we match), gpt-fast's model.py (layout). Differences between the family members are config flags:
``qkv_bias`` (Qwen2), ``qk_norm`` (Qwen3), ``tie_embeddings``, ``rope_scaling``.

Speed notes: decode on a CPU is bound by weight bytes, so the hot path keeps the op count low: q/k/v and
gate/up are fused into one matmul each, grouped-query attention folds the query groups into the sequence axis
(no K/V copies), and the K/V cache is a preallocated buffer (see cache.py).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache, key_bucket
from ..config import ModelConfig
from ..kernels import QuantWeight
from .gguf_linear import GGUFEmbedding, GGUFLinear


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. ``offset=1`` gives Gemma's ``x * (1 + w)`` convention."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))

    @property
    def scale(self) -> Tensor:
        """The float32 factor the normalized input is multiplied by (``w``, or Gemma's ``1 + w``)."""
        return self.weight.float() + self.offset

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.scale).to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> Tensor:
    """Inverse frequencies [head_dim/2], with Llama 3's or linear position scaling applied."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope scaling {kind!r} is not supported")
    return inv.float()


class Rope(nn.Module):
    """Precomputed cos/sin tables [max_len, head_dim] in the rotate-half layout transformers uses."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.params = (head_dim, max_len, theta, scaling)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if self.cos.device.type != "meta":   # built on the meta device: tachy.load calls rebuild() later
            self.rebuild(self.cos.device)

    def rebuild(self, device: torch.device | str) -> None:
        head_dim, max_len, theta, scaling = self.params
        with torch.device(device):
            angles = torch.outer(torch.arange(max_len, dtype=torch.float32),
                                 rope_frequencies(head_dim, theta, scaling))
            angles = torch.cat([angles, angles], dim=-1)
            self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and the signed sin [-sin, +sin] that apply_rope wants, at ``positions``."""
        return self.cos[positions], self.signed_sin[positions]

    @property
    def signed_sin(self) -> Tensor:
        if getattr(self, "_signed_sin_of", None) is not self.sin:
            half = self.sin.shape[-1] // 2
            self._signed_sin = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
            self._signed_sin_of = self.sin
        return self._signed_sin


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/signed_sin [T, D] from Rope. Computed in float32 like the reference:
    x * cos + rotate_half(x) * sin, where rotate_half(x) * sin = roll(x, D/2) * [-sin, +sin] exactly."""
    dtype, x = x.dtype, x.float()
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)
        self.split = (q_out, kv_out, kv_out)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        v = qkv[..., -self.split[2]:].view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is None:   # rope on q and k heads together: one set of ops instead of two
            qk = qkv[..., :-self.split[2]].view(B, T, self.heads + self.kv_heads, self.head_dim)
            q, k = apply_rope(qk.transpose(1, 2), *rope).split([self.heads, self.kv_heads], dim=1)
        else:
            q, k, _ = qkv.split(self.split, dim=-1)
            q = self.q_norm(q.view(B, T, self.heads, self.head_dim).transpose(1, 2))
            k = self.k_norm(k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2))
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache.observer is not None:  # a KV press collecting the prefill's queries (tachy.presses)
            cache.observer(self.layer, q * self.scale)
        k, v = cache.write(self.layer, k, v)
        groups = self.heads // self.kv_heads
        if cache.sparse is not None:   # decode-time sparse attention (tachy.sparse): fewer visible keys
            if mask is None:
                mask = causal_mask(k.shape[2] - T, T, k.device)
            mask = cache.sparse.method.mask(cache.sparse, self.layer, q, k, mask, self.scale)
        if cache.prefix_attends:  # a quantized prefix attention reads in place (tachy.presses.int4kv)
            return self.o_proj(prefix_attention(q, k, v, mask, cache, self.layer, self.scale))
        if cache.ragged:  # a batch of sequences, one new token each (BatchKVCache, tachy.batch)
            q = q.view(B, self.kv_heads, groups, self.head_dim)
            return self.o_proj(ragged_attention(q, k, v, mask, cache.index()[2], self.scale).reshape(B, 1, -1))
        if cache.fixed and B == 1:
            # Exact mode: each new token is its own batch entry over the shared (broadcast) keys, so its
            # attention runs with the very shapes of one-token decoding and gives the same bits (see KVCache).
            q = q.view(self.kv_heads, groups, T, self.head_dim).permute(2, 0, 1, 3)     # [T, Hkv, G, D]
            return self.o_proj(bucketed_attention(q, k, v, mask, cache.length, self.scale).reshape(1, T, -1))
        if mask is None and T > 1:   # causal from an empty cache (Transformer.forward): the prompt's first chunk
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        # Grouped-query attention: the G query heads sharing a kv head become G*T queries over that head.
        q = q.reshape(B, self.kv_heads, groups * T, self.head_dim)
        if mask is not None and mask.dim() == 3:   # per kv head [Hkv, T, S] (compressed cache)
            mask = mask.repeat(1, groups, 1)[None]
        elif mask is not None and groups > 1:
            mask = mask.repeat(groups, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.view(B, self.heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = F.silu if cfg.hidden_act == "silu" else lambda x: F.gelu(x, approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder. ``forward(tokens, positions, cache, mask)`` follows docs/architecture.md."""

    block_class = Block

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # given an (uninitialised) weight, nn.Embedding skips its random init, whose meta-device version would
        # import torch._dynamo: a second of cold start for nothing (the checkpoint is assigned over it)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size,
                                                                                              cfg.hidden_size))
        self.layers = nn.ModuleList(self.block_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.cpu_forward = None   # the whole forward as one C call, where set (models/cpu_forward.py)

    def exact_trees(self, cache: KVCache) -> bool:
        """Whether a forward over a draft tree on this cache gives every node, not only the leading chain,
        the bits one-token decoding along its path would (the C forward reads each row's keys in path order;
        the PyTorch forward does so only for the chain: speculative/verify.py ``commit_exact``)."""
        return self.cpu_forward is not None and self.cpu_forward.supports(cache)

    def new_cache(self, capacity: int = 256, batch: int = 1, fixed: bool = False) -> KVCache:
        """A cache sized for this model on the model's device, in the activation dtype."""
        return KVCache(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim, capacity, batch,
                       dtype=self.dtype, device=self.device, fixed=fixed)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype: float32 unless the whole model was cast to a half type (or keeps GGUF blocks)."""
        fixed = getattr(self.embed_tokens, "activation_dtype", None)
        if fixed is not None:
            return fixed
        w = self.embed_tokens.weight.dtype
        return w if w in (torch.bfloat16, torch.float16) else torch.float32

    def embed(self, tokens: Tensor) -> Tensor:
        return self.embed_tokens(tokens).to(self.dtype)

    def attention_inputs(self, positions: Tensor, start: int, mask: Tensor | None) -> list[tuple]:
        """Per layer: (rope cos/sin, mask). All layers share them here; Gemma 3 overrides for local layers."""
        return [(self.rope(positions), mask)] * len(self.layers)

    def layer_ropes(self) -> list[Rope]:
        """Per layer: its rope table (Gemma 3's local layers have their own)."""
        return [self.rope] * len(self.layers)

    def row_inputs(self, positions: Tensor, cache: KVCache) -> list[tuple]:
        """attention_inputs for a BatchKVCache: positions [B] (one per entry), per-entry masks."""
        windows = [self.config.sliding_window if t == "sliding" else None for t in self.config.layer_types]
        masks = cache.row_masks(windows, positions)
        ropes = {id(r): r(positions[:, None, None]) for r in self.layer_ropes()}
        return [(ropes[id(r)], masks[w]) for r, w in zip(self.layer_ropes(), windows)]

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """tokens [B, T], positions [T], mask [T, length+T] bool or None (causal) -> float32 logits [B, T|1, V];
        for a BatchKVCache tokens [B, 1] and positions [B], one per row in ``cache.rows``;
        with ``return_hidden`` also the final-norm hidden states [B, T|1, hidden] (contrastive search)."""
        if self.cpu_forward is not None and self.cpu_forward.supports(cache):
            out = self.cpu_forward(tokens, positions, cache, mask, last_only, return_hidden)
            if out is not None:
                return out
        T = tokens.shape[1]
        cache.reserve(T)
        start, keys = cache.length, cache.key_count(T)
        # No mask means causal: over the cache for one token, or over the new tokens alone from an empty cache
        # (a prompt's first chunk), where attention takes the causal kernel, which skips the masked half.
        from_empty = start == 0 and keys == T and cache.prefix is None and not cache.prefix_attends
        if mask is None and not cache.ragged and (T > 1 and not from_empty or keys > start + T or cache.compressed):
            mask = causal_mask(start, T, tokens.device)
        if mask is not None and mask.shape[1] < keys:  # fixed-size cache: slots not yet written are invisible
            mask = F.pad(mask, (0, keys - mask.shape[1]), value=False)
        x = self.embed(tokens)
        if cache.ragged:  # positions [B]: each row at its own length (tachy.batch)
            inputs = self.row_inputs(positions, cache)
        else:
            inputs = self.attention_inputs(positions, cache.length, mask)
        if cache.compressed:  # slots no longer equal positions: per-head masks from the cache (cache.py)
            cache.mark_new(positions)
            windows = [self.config.sliding_window if t == "sliding" else None for t in self.config.layer_types]
            inputs = [(rope, cache.layer_mask(i, mask, positions, w)) for i, ((rope, _), w) in
                      enumerate(zip(inputs, windows))]
        for layer, (rope, layer_mask) in zip(self.layers, inputs):
            x = layer(x, rope, cache, layer_mask)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = self.lm_head(x).float()
        return (logits, x) if return_hidden else logits

    # -- weights ------------------------------------------------------------------------------------------
    # Checkpoint (HF) names map onto ours by fusing q/k/v and gate/up; everything else keeps its name
    # after dropping the "model." prefix.
    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load a Hugging Face-named state dict; any missing, unexpected or misshapen key is an error."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        ours: dict[str, Tensor] = {}
        for i in range(self.config.num_layers):
            for fused, parts in self.FUSED.items():
                for suffix in ("weight", "bias"):
                    names = [f"layers.{i}.{p}.{suffix}" for p in parts]
                    if all(n in sd for n in names):
                        ours[f"layers.{i}.{fused}.{suffix}"] = torch.cat([sd.pop(n) for n in names])
        ours.update(sd)
        expected = self.state_dict()
        missing, unexpected = expected.keys() - ours.keys(), ours.keys() - expected.keys()
        if missing or unexpected:
            raise KeyError(f"checkpoint mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for name, tensor in ours.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(expected[name].shape)}")
        self.load_state_dict(ours, assign=True)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def load_quantized_state_dict(self, sd: dict[str, Tensor | QuantWeight]) -> None:
        """Load a GGUF file's own blocks (``load_checkpoint(..., quantized=True)``): the linear layers and the
        embedding keep them (GGUFLinear, GGUFEmbedding), norms and biases load as float32."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        for i, block in enumerate(self.layers):
            p, attn = f"layers.{i}.", block.self_attn
            qkv = [sd.pop(f"{p}self_attn.{x}_proj.weight") for x in "qkv"]
            biases = [sd.pop(f"{p}self_attn.{x}_proj.bias", None) for x in "qkv"]
            attn.qkv_proj = GGUFLinear(qkv, bias=biases[0] is not None)
            if biases[0] is not None:   # as the bf16 path holds it
                sd[f"{p}self_attn.qkv_proj.bias"] = torch.cat(biases).to(torch.bfloat16)
            attn.o_proj = GGUFLinear([sd.pop(f"{p}self_attn.o_proj.weight")])
            block.mlp.gate_up_proj = GGUFLinear([sd.pop(f"{p}mlp.gate_proj.weight"), sd.pop(f"{p}mlp.up_proj.weight")])
            block.mlp.down_proj = GGUFLinear([sd.pop(f"{p}mlp.down_proj.weight")])
        embedding = sd.pop("embed_tokens.weight")
        self.embed_tokens = GGUFEmbedding(embedding)
        self.lm_head = GGUFLinear([embedding if self.config.tie_embeddings else sd.pop("lm_head.weight")])
        expected = self.state_dict().keys()
        missing, unexpected = expected - sd.keys(), sd.keys() - expected
        if missing or unexpected or any(isinstance(v, QuantWeight) for v in sd.values()):
            raise KeyError(f"checkpoint mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict({k: v if k.endswith(".bias") else v.float() for k, v in sd.items()}, assign=True)


def bucketed_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, start: int, scale: float,
                       with_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention for one sequence whose T new rows are batch entries: q [T, Hkv, G, D], k/v [1, Hkv, S, D],
    mask [T, S] or None (all visible); returns [T, Hkv, G, D] (and the log-sum-exp [T, Hkv, G] with
    ``with_lse``, CPU only).

    Row t (cache slot start + t) reads the first ``key_bucket(start + t + 1)`` keys, the count
    one-token decoding at that slot reads too, so both compute the row with identical shapes and bits
    (see KVCache). Rows of one forward fall into at most a few buckets: one kernel call per bucket.
    """
    T, S = q.shape[0], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if with_lse else None
    t = 0
    while t < T:
        keys = min(S, key_bucket(start + t + 1))
        end = min(T, keys - start)            # rows whose own bucket is this one
        n = end - t
        args = (q[t:end], k[:, :, :keys].expand(n, -1, -1, -1), v[:, :, :keys].expand(n, -1, -1, -1),
                None if mask is None else _rows(mask, t, end, keys))
        with single_thread(q.device):
            if with_lse:
                out[t:end], lse[t:end] = attention_with_lse(*args, scale)
            else:
                out[t:end] = F.scaled_dot_product_attention(*args[:3], attn_mask=args[3], scale=scale)
        t = end
    return (out, lse) if with_lse else out


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """PyTorch's CPU flash attention, which also returns each row's log-sum-exp [B, H, L] (float32).
    mask: bool, True = visible, broadcastable to [B, H, L, S]."""
    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return out, lse


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax attention over two disjoint key sets, from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cache: KVCache, layer: int,
                     scale: float) -> Tensor:
    """Attention when the cache's first slots are a quantized prefix that attends in place
    (``cache.prefix.attend``, tachy.presses.int4kv): the prefix and the full-precision tail are attended apart
    and merged by their log-sum-exp. q [1, H, T, D]; k/v the tail buffers [1, Hkv, S, D]; mask None,
    [T, P+S] or per kv head [Hkv, T, P+S] over prefix then tail slots. Returns [1, T, H*D]."""
    _, H, T, D = q.shape
    Hkv, P = k.shape[1], cache.prefix.length
    G = H // Hkv
    rows = q.reshape(Hkv, G, T, D).transpose(1, 2)                  # [Hkv, T, G, D]: row (t, g) of each head
    row_mask = None if mask is None else mask.repeat_interleave(G, dim=-2)   # [..., T*G, P+S]
    out_p, lse_p = cache.prefix.attend(layer, rows.reshape(Hkv, T * G, D),
                                       None if row_mask is None else row_mask[..., :P], scale)
    if cache.fixed:  # exact mode: each row reads the tail keys one-token decoding reads (bucketed_attention)
        tail_mask = None if mask is None else mask[..., P:]
        out_t, lse_t = bucketed_attention(rows.transpose(0, 1), k, v, tail_mask, cache.length - P, scale, True)
        out_t, lse_t = out_t.transpose(0, 1).reshape(Hkv, T * G, D), lse_t.transpose(0, 1).reshape(Hkv, T * G)
    else:
        tail_mask = None if row_mask is None else row_mask[..., P:].reshape(1, -1, T * G, k.shape[2])
        out_t, lse_t = attention_with_lse(rows.reshape(1, Hkv, T * G, D), k, v, tail_mask, scale)
        out_t, lse_t = out_t[0], lse_t[0]
    out = merge_attention(out_p, lse_p, out_t.float(), lse_t)
    return out.view(Hkv, T, G, D).transpose(0, 1).reshape(1, T, H * D).to(q.dtype)


def ragged_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, groups: list, scale: float) -> Tensor:
    """Attention for a batch of sequences with one new token each: q [B, Hkv, G, D]; k/v the cache buffers
    [batch, Hkv, S, D]; mask [B, 1, 1, S]; ``groups`` from ``BatchKVCache.index()``. Entry b reads its cache
    row's first ``key_bucket(length + 1)`` keys, the shapes one-token decoding of that sequence alone has
    (bucketed_attention), so it gets the same bits. Entries with the same bucket share one kernel call."""
    out = torch.empty_like(q)
    for keys, entries, rows in groups:
        # index_select, not k[rows, :, :keys]: the same copy, 4x faster on a CPU (bf16, 16 entries: 50 vs 228 us)
        with single_thread(q.device):
            out[entries] = F.scaled_dot_product_attention(
                q.index_select(0, entries), k[:, :, :keys].index_select(0, rows), v[:, :, :keys].index_select(0, rows),
                attn_mask=mask[entries, :, :, :keys], scale=scale)
    return out


def _rows(mask: Tensor, t: int, end: int, keys: int) -> Tensor:
    """Rows t..end of a [T, S] mask, or of a per-kv-head [Hkv, T, S] one, shaped [n, 1|Hkv, 1, keys]."""
    if mask.dim() == 3:
        return mask[:, t:end, :keys].transpose(0, 1)[:, :, None]
    return mask[t:end, None, None, :keys]


@contextmanager
def single_thread(device: torch.device):
    """Run a CPU kernel on one thread. PyTorch's CPU flash attention splits a small workload (one-token
    decoding) over threads differently than a large one (a verify forward), which changes a row's reduction
    order; on one thread the row's bits do not depend on its batch (measured: 0 of 748 rows differ, vs. a
    few with two threads). Costs about 15 us per call."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def causal_mask(start: int, T: int, device: torch.device) -> Tensor:
    """[T, start+T] bool: new token t sees the whole cache and new tokens up to itself."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
