"""APE, adaptive parallel encoding (Yang, Chen & Chen, ICLR 2025): retrieved passages encoded one by one and
read side by side.

A RAG prompt is a shared prefix (instructions), a list of passages and a question. Sequential encoding runs
them as one prompt, so each passage's K/V depend on the passages before it and nothing can be reused when the
retrieval changes. APE encodes each passage alone after the prefix, all starting at the same position (so a
passage's K/V are the same in every request that retrieves it, and are cached), then lets the question and
the answer attend to all of them at once. Parallel passages distort attention (every passage is "first" after
the prefix, and their combined mass outweighs the rest), which APE corrects in the query's attention:

* keys are split in three groups: prefix, passages, and the question + answer (the cache's tail);
* the passages' scores are divided by a temperature ``T`` (< 1 sharpens toward the relevant ones), and their
  group's weight is ``S * exp(T * logsumexp(scores / T))`` with a scaling factor ``S``;
* each group's attention output is combined by the groups' weights (a three-way log-sum-exp merge).

The prefix and passages sit in front of the cache as a prefix object that attends in place (the hook the int4
KV press uses, models/llama.py ``prefix_attention``), so the question and answer run through the PyTorch
forward; passages themselves are encoded by the engine's usual forward (the C decoder where it runs).

    tokens = ape_generate(engine, prefix_ids, [passage_ids, ...], question_ids, max_new_tokens=32)
    engine.generate(prefix_ids + question_ids, passages=[...], passages_at=len(prefix_ids))   # same, streamed
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .. import kernels
from ..errors import ContextLengthError, InvalidArgumentError
from ..generation import GenerationStats, Step
from ..models.llama import merge_attention
from ..sampling import token_logprobs
from ..tokenizer import check_token_ids


@dataclass
class APEConfig:
    temperature: float = 0.9   # the paper's default for both
    scale: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.temperature <= 1 or not 0 < self.scale <= 1:
            raise InvalidArgumentError(f"APE temperature and scale (ape_temperature, ape_scale) must be in "
                                       f"(0, 1], got {self.temperature} and {self.scale}")


class APEContext:
    """Prefix and passage K/V in front of a cache, attended APE's way (``attend``, see the module docstring)."""

    def __init__(self, prefix_kv: tuple[Tensor, Tensor], passages_kv: list[tuple[Tensor, Tensor]],
                 config: APEConfig):
        self.prefix_k, self.prefix_v = prefix_kv                         # [layers, kv_heads, P, D]
        self.docs_k = torch.cat([k for k, _ in passages_kv], dim=2)       # [layers, kv_heads, N, D]
        self.docs_v = torch.cat([v for _, v in passages_kv], dim=2)
        self.config = config
        self.length = self.prefix_k.shape[2] + self.docs_k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prefix_k, self.prefix_v, self.docs_k, self.docs_v))

    def attend(self, layer: int, q: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
        """Rows q [Hkv, M, D] over prefix and passages: (output [Hkv, M, D] float32, log-weight [Hkv, M]),
        merged with the tail's attention by the caller. Every row sees all of them (``mask`` is all True)."""
        q = q.float()
        out_p, lse_p = _softmax_attention(q, self.prefix_k[layer], self.prefix_v[layer], scale)
        t = self.config.temperature
        out_d, lse_d = _softmax_attention(q, self.docs_k[layer], self.docs_v[layer], scale / t)
        lse_d = t * lse_d + math.log(self.config.scale)
        return merge_attention(out_p, lse_p, out_d, lse_d), torch.logaddexp(lse_p, lse_d)


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    scores = q @ k.float().transpose(-1, -2) * scale          # [Hkv, M, n]
    lse = torch.logsumexp(scores, dim=-1)
    return (scores - lse[..., None]).exp() @ v.float(), lse


class PassageStore:
    """Encoded passages, keyed by (prefix tokens, passage tokens), and encoded prefixes: a passage retrieved
    again is not encoded again. Bounded by ``max_bytes``, least recently used first out."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.nbytes = max_bytes, 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[Tensor, Tensor] | None:
        with self._lock:
            kv = self._items.get(key)
            if kv is not None:
                self._items.move_to_end(key)
            self.hits += kv is not None
            self.misses += kv is None
            return kv

    def put(self, key: tuple, kv: tuple[Tensor, Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in kv)
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            while self.nbytes + size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= sum(t.numel() * t.element_size() for t in old)
            self._items[key] = kv
            self.nbytes += size


def _check(engine, prefix_ids: Sequence[int], passages: Sequence[Sequence[int]], question_ids: Sequence[int],
           max_new_tokens: int) -> None:
    if not question_ids:   # the prefix and passages were checked with the GenerationConfig
        raise InvalidArgumentError("APE needs a question after the passages (prompt tokens past passages_at)")
    for passage in passages:
        check_token_ids(passage, engine.config.vocab_size, "passage")
    if any(t == "sliding" for t in getattr(engine.config, "layer_types", None) or []):
        raise InvalidArgumentError(f"APE needs full attention in every layer; {engine.name} has sliding-window "
                                   "layers (parallel passages share positions a window cannot tell apart)")
    end = len(prefix_ids) + max(len(p) for p in passages) + len(question_ids) + max_new_tokens
    if end > engine.max_context:
        raise ContextLengthError(f"the passages overflow the context: prefix {len(prefix_ids)} + longest passage "
                                 f"{max(len(p) for p in passages)} + question {len(question_ids)} + "
                                 f"{max_new_tokens} new tokens = {end} positions > {engine.max_context}")


@torch.inference_mode()
def encode_passages(engine, prefix_ids: Sequence[int], passages: Sequence[Sequence[int]],
                    store: PassageStore | None = None) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
    """The prefix's K/V and each passage's, encoded alone right after the prefix (positions P..P+n-1)."""
    model, P = engine.model, len(prefix_ids)
    prefix_kv = store.get(("prefix", tuple(prefix_ids))) if store is not None else None
    if prefix_kv is None:
        prefix_cache = model.new_cache(capacity=engine.cache_capacity(P, 1), fixed=True)
        engine._prefill(list(prefix_ids), prefix_cache)
        prefix_kv = (prefix_cache.k[:, 0, :, :P].clone(), prefix_cache.v[:, 0, :, :P].clone())
        if store is not None:
            store.put(("prefix", tuple(prefix_ids)), prefix_kv)
    out = []
    for passage in passages:
        key = (tuple(prefix_ids), tuple(passage))
        kv = store.get(key) if store is not None else None
        if kv is None:
            cache = model.new_cache(capacity=engine.cache_capacity(P + len(passage), 1), fixed=True)
            cache.k[:, 0, :, :P], cache.v[:, 0, :, :P] = prefix_kv
            cache.length = cache.position = P
            engine._prefill(list(prefix_ids) + list(passage), cache)
            kv = (cache.k[:, 0, :, P:P + len(passage)].clone(), cache.v[:, 0, :, P:P + len(passage)].clone())
            if store is not None:
                store.put(key, kv)
        out.append(kv)
    return prefix_kv, out


def ape_generate(engine, prefix_ids: Sequence[int], passages: Sequence[Sequence[int]],
                 question_ids: Sequence[int], max_new_tokens: int = 64, config: APEConfig | None = None,
                 store: PassageStore | None = None) -> list[int]:
    """Greedy answer tokens (up to EOS or ``max_new_tokens``) for prefix + passages + question under APE."""
    from ..decoding import GenerationConfig

    config = config or APEConfig()
    generation = GenerationConfig(max_new_tokens=max_new_tokens, drafter=None, prefix_cache=False,
                                  passages=[list(p) for p in passages], passages_at=len(prefix_ids),
                                  ape_temperature=config.temperature, ape_scale=config.scale)
    eos = set(engine.tokenizer.eos_token_ids)
    out: list[int] = []
    for step in ape_steps(engine, list(prefix_ids) + list(question_ids), generation, GenerationStats(), store):
        out += step.tokens
        if step.tokens[-1] in eos:
            break
    return out


def ape_steps(engine, prompt_ids: Sequence[int], config, stats: GenerationStats,
              store: PassageStore | None = None) -> Iterator[Step]:
    """Engine.generate_tokens for a config with ``passages``: prompt_ids[:passages_at] is the shared prefix,
    the rest the question; one Step per token (no drafts: the answer runs on the PyTorch forward)."""
    at = config.passages_at
    prefix, question, passages = list(prompt_ids[:at]), list(prompt_ids[at:]), config.passages
    _check(engine, prefix, passages, question, config.max_new_tokens)
    store = store if store is not None else engine.passage_store
    model, device = engine.model, engine.device
    start = time.perf_counter()
    stats.prompt_tokens = len(prompt_ids) + sum(len(p) for p in passages)
    with torch.inference_mode():
        prefix_kv, passages_kv = encode_passages(engine, prefix, passages, store)
        context = APEContext(prefix_kv, passages_kv, config.ape)
        cache = model.new_cache(capacity=context.length + len(question) + config.max_new_tokens)
        cache.length = context.length
        cache.freeze_prefix(context)
        processor, probs_fn, generator = engine.token_choice(config, prompt_ids)
        # the question follows the longest passage: every passage started right after the prefix
        position = len(prefix) + max(len(p) for p in passages)
        tokens, ids = question, list(prompt_ids)
        while True:
            with kernels.threads_to_kernels():   # the GGUF layers' kernels beside PyTorch's attention
                logits = model(torch.tensor([tokens], device=device),
                               torch.arange(position, position + len(tokens), device=device), cache,
                               last_only=True)[0]
                token, logits = engine._choose(logits, ids, processor, probs_fn, generator)
            position += len(tokens)
            ids.append(token)
            if stats.generated_tokens == 0:
                stats.prefill_s = time.perf_counter() - start
            else:
                stats.forwards += 1
                stats.decode_s = time.perf_counter() - start - stats.prefill_s
            stats.generated_tokens += 1
            stats.kv_bytes = stats.kv_full_bytes = cache.nbytes + context.nbytes
            yield Step([token], 0, 0, None if config.logprobs is None else
                       token_logprobs(logits, [token], config.logprobs))
            if stats.generated_tokens >= config.max_new_tokens or position + 1 >= engine.max_context:
                return
            tokens = [token]
