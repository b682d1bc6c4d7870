"""Beam search with length penalty, early stopping and patience; diverse beam search as beam groups.

Semantics follow transformers' (vectorized, v4.50+) ``_beam_search`` so outputs match it token for token:

* each step, every running beam's log-probabilities (after the logits processors) are added to its score and
  the best ``2 * num_beams`` (more with several EOS tokens) continuations over all beams are taken;
* a continuation that ends (EOS, or the token budget) and ranks among the first ``num_beams`` joins the pool of
  finished hypotheses with score ``sum_logprobs / generated_length ** length_penalty`` (the EOS counted);
  the pool keeps its best ``num_beams``;
* the best unfinished continuations become the next beams;
* stopping: ``early_stopping=True`` stops once the pool is full; ``False`` once the pool is full and the best
  running beam, scored at the current length, cannot beat the pool's worst; ``"never"`` the same with the
  longest reachable length when ``length_penalty > 0`` (the canonical rule).

Patience (Kasai et al. 2022, "Beam Decoding with Controlled Patience"): the pool holds ``patience *
num_beams`` hypotheses, so with early stopping the search waits for that many to finish (patience 1 is plain
beam search, > 1 searches longer, < 1 stops sooner).

Diverse beam search (Vijayakumar et al. 2018), as transformers' group beam search: the beams form
``num_beam_groups`` groups searched one after the other within a step; group g's log-probabilities are
lowered by ``diversity_penalty`` times the number of times each token was just chosen by groups 0..g-1
(Hamming diversity), the penalized scores are what the group accumulates, and every group keeps its own pool;
the answer is the best hypothesis over all pools.

All beams share one batched KV cache (``KVCache.select`` reorders it after each step).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from ..errors import InvalidArgumentError
from ..generation import PROGRESS, Step
from .base import Strategy, eos_ids, prefill, register
from .config import logits_processor

_NEG = -1.0e9


def _available_bytes(device: torch.device) -> int | None:
    """Memory a search may still take on ``device``: free GPU memory, or Linux's MemAvailable (None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(model, beams: int, capacity: int, keep: int) -> None:
    """Refuse a search whose beams cannot fit, before allocating them: ``num_beams=10**6`` asks for terabytes of
    KV cache, which PyTorch would report only as an allocation failure (or the OS as a killed process)."""
    cfg = model.config
    element = torch.empty((), dtype=model.dtype).element_size()
    cache = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element * capacity   # K and V per beam
    scores = 4 * cfg.vocab_size * 3   # a beam's float logits, log-probabilities and summed scores
    need = beams * (2 * cache + scores) + 16 * keep   # 2x: KVCache.select builds the reordered copy
    free = _available_bytes(model.device)
    if free is not None and need > free:
        raise InvalidArgumentError(f"num_beams={beams} needs about {need / 2**30:.1f} GiB for its beams' KV cache "
                                   f"and scores ({capacity} positions each), more than the "
                                   f"{free / 2**30:.1f} GiB available; use fewer beams or fewer tokens")


@dataclass
class _Group:
    """One group of beams: running sequences and scores, and the pool of finished hypotheses."""

    size: int
    pool_size: int
    seqs: list[list[int]] = field(default_factory=list)
    scores: torch.Tensor | None = None     # [size] accumulated (penalized) log-probs, sorted descending
    pool: list[tuple[float, list[int]]] = field(default_factory=list)   # sorted best first
    improvable: bool = True
    done: bool = False

    @property
    def full(self) -> bool:
        return len(self.pool) >= self.pool_size


MAX_LENGTH_PENALTY = 100.0   # HF's range of use is about -2..5; 100 already makes any longer beam win outright


@register
@dataclass
class BeamSearch(Strategy):
    """Beam search. num_beams: beams kept (4); length_penalty: exponent on the length dividing a finished
    hypothesis' log-probability (1.0; > 0 favours longer); early_stopping: True / False / "never" (False);
    patience: finished hypotheses to wait for, as a multiple of num_beams (1.0); num_beam_groups and
    diversity_penalty: diverse beam search (1 group, 0.0)."""

    name: ClassVar[str] = "beam"
    allows_sampling: ClassVar[bool] = False
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    patience: float = 1.0
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in ("length_penalty", "patience", "diversity_penalty"):   # options may come from JSON
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
        if abs(self.length_penalty) > MAX_LENGTH_PENALTY:   # length ** 1e308 overflows a float (OverflowError)
            raise InvalidArgumentError(f"length_penalty must be within +-{MAX_LENGTH_PENALTY:g}, "
                                       f"got {self.length_penalty}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise InvalidArgumentError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidArgumentError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not (self.patience > 0 and math.isfinite(self.patience * self.num_beams)):   # made an int
            raise InvalidArgumentError(f"patience must be a finite number > 0, got {self.patience}")
        if (not isinstance(self.num_beam_groups, int) or self.num_beam_groups < 1
                or self.num_beams % self.num_beam_groups):
            raise InvalidArgumentError(f"num_beam_groups ({self.num_beam_groups}) must divide num_beams "
                                       f"({self.num_beams})")
        if self.diversity_penalty < 0:
            raise InvalidArgumentError(f"diversity_penalty must be >= 0, got {self.diversity_penalty}")

    def check(self, config) -> None:
        if config.temperature > 0:
            raise InvalidArgumentError(f"strategy {self.name!r} is a deterministic search and does not sample; "
                                       f"use temperature=0")
        super().check(config)

    def search(self, engine, prompt_ids, config, stats) -> Iterator:

        model, device = engine.model, engine.device
        eos = eos_ids(engine, config)
        max_new = min(config.max_new_tokens, engine.max_context - len(prompt_ids))
        processor = logits_processor(engine, config, prompt_ids)
        K, G = self.num_beams, self.num_beam_groups
        S = K // G
        keep = max(2, 1 + len(eos)) * S
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)

        _check_memory(model, K, len(prompt_ids) + max_new, keep)
        start = time.perf_counter()
        cache = model.new_cache(capacity=len(prompt_ids) + max_new, fixed=False)
        logits = prefill(model, prompt_ids, cache).expand(K, -1)
        cache.select(torch.zeros(K, dtype=torch.long, device=device))
        stats.prompt_tokens = len(prompt_ids)
        stats.prefill_s = time.perf_counter() - start
        groups = []
        for _ in range(G):
            scores = torch.full((S,), _NEG, device=device)
            scores[0] = 0.0      # identical beams at the start: only the first may expand
            groups.append(_Group(S, max(1, round(self.patience * S)), [[] for _ in range(S)], scores))

        step_start = time.perf_counter()
        for step in range(max_new):
            gen_len = step + 1
            logp = torch.log_softmax(logits.float(), dim=-1)
            if processor is not None:
                logp = processor(logp, [prompt_ids + seq for g in groups for seq in g.seqs])
            vocab = logp.shape[-1]
            chosen: list[int] = []          # tokens the earlier groups picked this step (diversity)
            sources: list[int] = []         # for each next beam, the row it continues
            tokens: list[int] = []
            for gi, g in enumerate(groups):
                rows = slice(gi * S, (gi + 1) * S)
                if g.done:   # a finished group idles: same rows, a filler token, nothing recorded
                    sources += range(rows.start, rows.stop)
                    tokens += [g.seqs[0][-1] if g.seqs[0] else prompt_ids[-1]] * S
                    continue
                scores = logp[rows]
                if self.diversity_penalty and chosen:
                    counts = torch.bincount(torch.tensor(chosen, device=device), minlength=vocab)[:vocab]
                    scores = scores - self.diversity_penalty * counts.to(scores.dtype)
                total = (scores + g.scores[:, None]).reshape(-1)
                top_vals, top_idx = torch.topk(total, keep)
                beams, toks = (top_idx // vocab).tolist(), (top_idx % vocab)
                hits = torch.isin(toks, eos_t) if eos else torch.zeros(keep, dtype=torch.bool, device=device)
                if gen_len >= max_new:
                    hits[:] = True
                toks = toks.tolist()
                # finished hypotheses: only continuations ranked among the first S count
                if g.improvable and not (g.full and self.early_stopping is True):
                    norm = gen_len ** self.length_penalty
                    new = [(float(top_vals[i]) / norm, g.seqs[beams[i]] + [toks[i]]) for i in range(S) if hits[i]]
                    if new:
                        g.pool = sorted(g.pool + new, key=lambda h: -h[0])[:g.pool_size]
                # next running beams: the best continuations that did not finish
                running = top_vals + hits.to(top_vals.dtype) * _NEG
                nxt_vals, nxt = torch.topk(running, S)
                nxt = nxt.tolist()
                g.seqs = [g.seqs[beams[j]] + [toks[j]] for j in nxt]
                g.scores = nxt_vals
                sources += [gi * S + beams[j] for j in nxt]
                tokens += [toks[j] for j in nxt]
                chosen += [toks[j] for j in nxt]
                # stopping rule (transformers' heuristic; see the module docstring)
                if g.full:
                    best_len = max_new if self.early_stopping == "never" and self.length_penalty > 0 else gen_len
                    best_possible = float(g.scores[0]) / best_len ** self.length_penalty
                    g.improvable = g.improvable and best_possible > g.pool[-1][0]
                g.done = (not g.improvable) or (g.full and self.early_stopping is True) or bool(hits.all())
            stats.generated_tokens = gen_len
            if all(g.done for g in groups) or gen_len >= max_new:
                break
            src = torch.tensor(sources, device=device)
            if not torch.equal(src, torch.arange(K, device=device)):
                cache.select(src)
            pos = torch.tensor([len(prompt_ids) + step], device=device)
            logits = model(torch.tensor(tokens, device=device)[:, None], pos, cache)[:, -1]
            stats.forwards += 1
            yield PROGRESS   # nothing committed yet; the engine may stop here (a cancelled request)

        stats.decode_s = time.perf_counter() - step_start
        hypotheses = [h for g in groups for h in g.pool]
        if not hypotheses:   # cannot happen (the budget finishes every beam), but never return nothing
            hypotheses = [(float(g.scores[0]), g.seqs[0]) for g in groups]
        best = max(hypotheses, key=lambda h: h[0])
        self.last_hypotheses = sorted(hypotheses, key=lambda h: -h[0])   # for inspection and tests
        yield Step(best[1], 0, 0)


@register
@dataclass
class DiverseBeamSearch(BeamSearch):
    """Diverse beam search: BeamSearch with groups (defaults: 4 beams in 2 groups, diversity_penalty 1.0)."""

    name: ClassVar[str] = "diverse_beam"
    num_beam_groups: int = 2
    diversity_penalty: float = 1.0
