"""The model's forward as one C call on the CPU (tachy/kernels/decoder.c).

A 135M-parameter model moves ~100 MB of GGUF blocks per token, a few milliseconds of memory traffic, but
PyTorch's eager forward spends far longer dispatching the thousands of small ops between its matrix
products. ``CPUForward`` hands the C decoder pointers to the model's own tensors (GGUF blocks, norm scales,
rope tables, the K/V cache) once, and then each ``Transformer.forward`` on a supported cache is one call.

It computes the same model as llama.py / gemma3.py with float32 activations between bf16 matrix inputs and
a bf16 cache; its tokens are row-invariant (see decoder.c), so plain, speculative and batched decoding give
identical greedy output through it, and every node of a draft tree gets the bits one-token decoding along
its path gives (``exact_trees``). Caches it does not handle (presses, quantized prefixes, query observers)
go through the PyTorch forward.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_double, c_int64, c_void_p

import torch
from torch import Tensor, nn

from .. import kernels
from ..cache import KVCache
from ..kernels import QuantWeight
from .gguf_linear import GGUFEmbedding, GGUFLinear
from .quant import SplitKLinear, plain_linear


class _Weight(Structure):
    _fields_ = [("fmt", c_int64), ("data", c_void_p), ("row_bytes", c_int64), ("N", c_int64), ("K", c_int64),
                ("packed", c_void_p)]

    @classmethod
    def of(cls, w: QuantWeight, keep: list) -> "_Weight":
        keep.append(w.data)
        if w.packed is not None:
            keep.append(w.packed)
        return cls(w.fmt, w.data.data_ptr(), w.data.shape[1], w.N, w.K,
                   None if w.packed is None else w.packed.data_ptr())


class _Linear(Structure):
    _fields_ = [("n_parts", c_int64), ("part", _Weight * 3), ("N", c_int64), ("K", c_int64), ("bias", c_void_p)]


class _Layer(Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("attn_norm", c_void_p), ("post_attn_norm", c_void_p), ("mlp_norm", c_void_p),
                ("post_mlp_norm", c_void_p), ("q_norm", c_void_p), ("k_norm", c_void_p),
                ("cos", c_void_p), ("sin", c_void_p), ("window", c_int64)]


class _Model(Structure):
    _fields_ = [("n_layers", c_int64), ("hidden", c_int64), ("heads", c_int64), ("kv_heads", c_int64),
                ("head_dim", c_int64), ("inter", c_int64), ("vocab", c_int64), ("rope_len", c_int64),
                ("gelu", c_int64), ("eps", c_double), ("attn_scale", c_double), ("embed_scale", c_double),
                ("layers", POINTER(_Layer)), ("embed", _Weight), ("lm_head", _Linear), ("final_norm", c_void_p)]


class _Cache(Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("batch", c_int64), ("cap", c_int64)]


class _Batch(Structure):
    _fields_ = [("T", c_int64), ("tokens", c_void_p), ("positions", c_void_p), ("rows", c_void_p),
                ("slots", c_void_p), ("prefix", c_void_p), ("mask", c_void_p), ("n_logits", c_int64),
                ("logit_rows", c_void_p), ("logits", c_void_p), ("hidden", c_void_p)]


class _Sparse(Structure):
    """decoder.c's tq_sparse: a cache's sparse attention (tachy.sparse): decode-time, or MInference's prefill."""
    _fields_ = [("method", c_int64), ("page", c_int64), ("select", c_int64), ("sinks", c_int64),
                ("window", c_int64), ("layers", c_void_p), ("bounds", c_void_p), ("max_pages", c_int64),
                ("bounded", c_void_p), ("patterns", c_void_p), ("vertical", c_int64), ("slash", c_int64),
                ("blocks", c_int64), ("last_q", c_int64), ("dense_from", c_int64), ("recall", c_void_p),
                ("record", c_void_p), ("channels", c_int64), ("channel_index", c_void_p), ("labels", c_void_p)]

    @classmethod
    def of(cls, cache: KVCache) -> "_Sparse":
        state = cache.sparse
        method = state.method
        return cls(method=method.method_id, sinks=method.sinks, window=method.window,
                   layers=state.roles_u8.data_ptr(), **state.c_fields(cache))


def _quant_weights(module: nn.Module) -> list[QuantWeight] | None:
    """A linear layer's weights in a format the C decoder reads: GGUF blocks, or bf16 rows (an nn.Linear's, or
    a SplitKLinear's chunks joined back, a copy), which the kernels read as GGUF's BF16 format."""
    if isinstance(module, GGUFLinear):
        return module.parts
    if isinstance(module, SplitKLinear):
        module = plain_linear(module)
    if isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16:
        w = module.weight.detach().contiguous()
        return [QuantWeight(kernels.FORMATS["BF16"], w.view(torch.uint8), w.shape[1])]
    return None


def is_causal(mask: Tensor) -> bool:
    """Whether a mask over T new tokens is the causal one (a chain: a verify step's usual draft). The forward
    then runs without it: its causal path reads the cached keys once for a run of tokens (decoder.c's
    grouped_tokens) instead of once per token, with the same bits (tests/models/test_cpu_forward.py)."""
    T = mask.shape[0]
    return torch.equal(mask, torch.ones(T, T, dtype=mask.dtype).tril_())


class CPUForward:
    """``CPUForward.build(model)`` -> a CPUForward, or None when the model has layers the C decoder does not
    read (float32 or int8/int4 weights) or the kernels are unavailable. Reads GGUF blocks (``--dtype gguf``)
    and bf16 weights."""

    def __init__(self, model: nn.Module, layers: list[_Layer], keep: list):
        self.model, self._layers, self._keep = model, layers, keep
        cfg = model.config
        self.cfg = cfg
        self.struct = _Model(
            n_layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, inter=cfg.intermediate_size, vocab=cfg.vocab_size,
            rope_len=model.rope.cos.shape[0], gelu=int(cfg.hidden_act != "silu"), eps=cfg.norm_eps,
            attn_scale=cfg.attn_scale, embed_scale=cfg.embed_scale,
            layers=ctypes.cast(layers, POINTER(_Layer)))
        self.lib = kernels.library()

    @classmethod
    def build(cls, model: nn.Module) -> "CPUForward | None":
        if not kernels.available() or model.device.type != "cpu" or model.dtype != torch.bfloat16:
            return None
        cfg, keep = model.config, []

        def linear(module: nn.Module) -> _Linear | None:
            parts = _quant_weights(module)
            if parts is None or len(parts) > 3:
                return None
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias = bias.detach().to(torch.bfloat16).contiguous()
                keep.append(bias)
            out = _Linear(n_parts=len(parts), N=sum(p.N for p in parts), K=parts[0].K,
                          bias=None if bias is None else bias.data_ptr())
            for i, p in enumerate(parts):
                out.part[i] = _Weight.of(p, keep)
            return out

        def vector(t: Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach().float().contiguous()
            keep.append(t)
            return t.data_ptr()

        def scale(norm: nn.Module | None) -> int | None:
            return None if norm is None else vector(norm.scale)

        layers = (_Layer * cfg.num_layers)()
        ropes = model.layer_ropes()
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            parts = [linear(attn.qkv_proj), linear(attn.o_proj), linear(mlp.gate_up_proj), linear(mlp.down_proj)]
            if any(p is None for p in parts):
                return None
            sandwich = hasattr(block, "pre_feedforward_layernorm")
            rope = ropes[i]
            layers[i] = _Layer(
                *parts, attn_norm=scale(block.input_layernorm),
                post_attn_norm=scale(block.post_attention_layernorm) if sandwich else None,
                mlp_norm=scale(block.pre_feedforward_layernorm if sandwich else block.post_attention_layernorm),
                post_mlp_norm=scale(block.post_feedforward_layernorm) if sandwich else None,
                q_norm=scale(attn.q_norm), k_norm=scale(attn.k_norm), cos=vector(rope.cos), sin=vector(rope.sin),
                window=cfg.sliding_window if cfg.layer_types[i] == "sliding" else 0)
        if isinstance(model.embed_tokens, GGUFEmbedding):
            embed = model.embed_tokens.weight_q
        elif isinstance(model.embed_tokens, nn.Embedding) and model.embed_tokens.weight.dtype == torch.bfloat16:
            w = model.embed_tokens.weight.detach().contiguous()
            embed = QuantWeight(kernels.FORMATS["BF16"], w.view(torch.uint8), w.shape[1])
        else:
            return None
        head = linear(model.lm_head)
        if head is None:
            return None
        forward = cls(model, layers, keep)
        forward.struct.embed = _Weight.of(QuantWeight(embed.fmt, embed.data, embed.K), keep)   # rows gathered
        forward.struct.lm_head = head
        forward.struct.final_norm = scale(model.norm)
        return forward

    def __deepcopy__(self, memo: dict) -> None:
        return None   # a copied model (the int4 self-draft) has other weights: it builds its own, or none

    @staticmethod
    def supports(cache: KVCache) -> bool:
        return (cache.dtype == torch.bfloat16 and cache.device.type == "cpu" and cache.prefix is None
                and not cache.compressed and cache.observer is None)

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor | None,
                 last_only: bool, return_hidden: bool) -> Tensor | tuple[Tensor, Tensor] | None:
        """The model's forward (same arguments and results as Transformer.forward), or None when the mask
        hides cached slots (then the PyTorch forward runs)."""
        if cache.ragged:   # a batch of sequences, one new token per entry (BatchKVCache)
            rows_list = list(cache.rows)
            T = len(rows_list)
            cache.reserve(1)
            # each token reads its row's cached slots, then the row's earlier new tokens (the forward's default)
            rows, slots, prefix = torch.tensor([rows_list, cache.slots(), [cache.lengths[r] for r in rows_list]],
                                               dtype=torch.int64)
            new_mask, logit_rows, n_out = None, None, T
            ids = tokens.reshape(-1).to(torch.int64).contiguous()
        else:
            if tokens.shape[0] != 1:
                return None
            T = tokens.shape[1]
            cache.reserve(T)
            start = cache.length
            new_mask = None
            if mask is not None:
                if start and not bool(mask[:, :start].all()):
                    return None
                new_mask = mask[:, start:start + T].to(torch.uint8).contiguous()
                if not bool(new_mask.diagonal().all()):
                    return None
                if is_causal(new_mask):
                    new_mask = None
            ids = tokens[0].to(torch.int64).contiguous()
            # one tensor for the three: a decode step makes it every few milliseconds
            rows, slots, prefix = torch.tensor([[0] * T, list(range(start, start + T)), [start] * T],
                                               dtype=torch.int64)
            n_out = 1 if last_only else T
            logit_rows = torch.tensor([T - 1], dtype=torch.int64) if last_only else None
        pos = positions.reshape(-1).to(torch.int64).contiguous()
        logits, hidden = self._run(cache, ids, pos, rows, slots, prefix, new_mask, logit_rows, n_out, return_hidden)
        cache.advance(1 if cache.ragged else T)
        logits = logits.view(T, 1, -1) if cache.ragged else logits.unsqueeze(0)
        if return_hidden:
            hidden = hidden.to(self.model.dtype)
            return logits, (hidden.view(T, 1, -1) if cache.ragged else hidden.unsqueeze(0))
        return logits

    def packed(self, cache: KVCache, tokens: Tensor, positions: Tensor, rows: Tensor, slots: Tensor,
               prefix: Tensor, mask: Tensor | None, logit_rows: Tensor) -> Tensor:
        """One forward over tokens of several sequences packed together (no padding): token t of cache row
        ``rows[t]`` is written at slot ``slots[t]`` and attends to that row's slots ``[0, prefix[t])`` then to
        the new tokens ``mask[t]`` allows ([T, T] bool; None: the earlier new tokens of its own row). The
        caller keeps the cache's bookkeeping (lengths). Returns the logits of ``logit_rows`` [n, V].

        Batched speculative decoding (tachy.batch) puts every row's ``[root] + draft`` tree and chunks of
        joining prompts in one call; each token's result is what the sequence alone would compute."""
        as_long = lambda t: t.to(torch.int64).contiguous()   # noqa: E731
        mask = None if mask is None else mask.to(torch.uint8).contiguous()
        logits, _ = self._run(cache, as_long(tokens), as_long(positions), as_long(rows), as_long(slots),
                              as_long(prefix), mask, as_long(logit_rows), len(logit_rows), False)
        return logits

    def _run(self, cache: KVCache, ids: Tensor, pos: Tensor, rows: Tensor, slots: Tensor, prefix: Tensor,
             mask: Tensor | None, logit_rows: Tensor | None, n_out: int,
             return_hidden: bool) -> tuple[Tensor, Tensor | None]:
        T = len(ids)
        logits = torch.empty(n_out, self.cfg.vocab_size, dtype=torch.float32)
        hidden = torch.empty(T, self.cfg.hidden_size, dtype=torch.float32) if return_hidden else None
        k, v = cache.k, cache.v
        c = _Cache(k.data_ptr(), v.data_ptr(), k.shape[1], k.shape[3])
        b = _Batch(T, ids.data_ptr(), pos.data_ptr(), rows.data_ptr(), slots.data_ptr(), prefix.data_ptr(),
                   None if mask is None else mask.data_ptr(), n_out,
                   None if logit_rows is None else logit_rows.data_ptr(), logits.data_ptr(),
                   None if hidden is None else hidden.data_ptr())
        kernels.sync_threads(self.lib)
        if cache.sparse is not None:   # decode-time sparse attention (tachy.sparse)
            sparse = _Sparse.of(cache)
            rc = self.lib.tq_forward_sparse(ctypes.byref(self.struct), ctypes.byref(c), ctypes.byref(b),
                                            ctypes.byref(sparse))
        else:
            rc = self.lib.tq_forward(ctypes.byref(self.struct), ctypes.byref(c), ctypes.byref(b))
        if rc != 0:
            raise RuntimeError(f"tachy's CPU decoder failed (code {rc})")
        return logits, hidden
