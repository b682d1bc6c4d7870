"""Sampling options turned into callables once, so the decode loop and the verifier never branch on flags.

Two stages, in this order, on float32 logits ``[N, V]`` (N = 1 for plain decoding, N = n+1 rows of a draft
tree when verifying):

1. ``make_logits_processor(cfg)``: penalties that depend on the text so far (repetition, presence,
   frequency), then OpenAI's ``logit_bias`` (a fixed amount per listed token). Each row can have its own
   context, which is how a draft-tree node is penalized for the draft tokens on its own path (see
   ``DraftTree.row_contexts``). ``None`` when neither is active.
2. ``make_probs_fn(cfg)``: temperature, then top-k, top-p, min-p, typical-p (Hugging Face's warper order).
   It returns the exact distribution tokens are drawn from, which is also what lossless speculative
   verification needs. For a greedy config it returns the one-hot argmax distribution.

``sample(probs, generator)`` draws from it; ``make_generator(seed, device)`` makes the seeded generator all
randomness goes through.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from tachy.errors import InvalidArgumentError
from tachy.generation import TokenLogprob

Context = Union[Tensor, Sequence[int]]
MAX_LOGIT_BIAS = 100.0   # OpenAI's bound: -100 in effect bans a token, +100 makes it the only choice
# logits [N, V], context: one id sequence shared by all rows, or a list of N (one per row) -> new logits [N, V]
LogitsProcessor = Callable[[Tensor, Union[Context, Sequence[Context]]], Tensor]
ProbsFn = Callable[[Tensor], Tensor]


@dataclass
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax); the filters then do nothing."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off (HF semantics)
    presence_penalty: float = 0.0  # 0 = off (OpenAI semantics)
    frequency_penalty: float = 0.0  # 0 = off (OpenAI semantics)
    seed: int | None = None
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit (OpenAI semantics)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise InvalidArgumentError(f"top_k must be an integer, got {self.top_k!r}")
        self.top_k = int(self.top_k)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise InvalidArgumentError(f"seed must be an integer or None, got {self.seed!r}")

        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)")
        _check(self.top_k >= 0, "top_k", self.top_k, ">= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1] (1 = off)")
        _check(0 <= self.min_p < 1, "min_p", self.min_p, "in [0, 1) (0 = off)")
        _check(0 < self.typical_p <= 1, "typical_p", self.typical_p, "in (0, 1] (1 = off)")
        # a logit divided by 1e-221 is inf (NaN probabilities): HF's range of use is about 1-2
        _check(0.01 <= self.repetition_penalty <= 100, "repetition_penalty", self.repetition_penalty,
               "in [0.01, 100] (1 = off)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidArgumentError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
                    raise InvalidArgumentError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
                if (isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not math.isfinite(bias)
                        or abs(bias) > MAX_LOGIT_BIAS):
                    raise InvalidArgumentError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, "
                                               f"{MAX_LOGIT_BIAS:g}], got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def seeded(self) -> bool:
        """Seeded sampling: the output must reproduce, so its drafts (hence draws) depend on its text only."""
        return not self.greedy and self.seed is not None

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise InvalidArgumentError(f"{name} must be {rule}, got {value!r}")


# ---------------------------------------------------------------------------------------------- penalties

def token_counts(context: Context | Sequence[Context], rows: int, vocab: int, device: torch.device | str) -> Tensor:
    """How often each token occurs in each row's context: float32 ``[rows, V]``, or ``[1, V]`` if shared.

    One ``bincount`` over all rows (row r's ids offset by r*V), so per-node contexts of a draft tree cost one
    kernel. Ids outside ``[0, V)`` (e.g. special tokens beyond the model's vocabulary) are ignored.
    """
    if isinstance(context, Tensor) and context.dim() == 2:
        context = list(context)
    if isinstance(context, Tensor) or not _is_list_of_contexts(context):
        ids = torch.as_tensor(context, dtype=torch.long, device=device).reshape(-1)
        ids = ids[(ids >= 0) & (ids < vocab)]
        return torch.bincount(ids, minlength=vocab).to(torch.float32).unsqueeze(0)
    if len(context) != rows:
        raise ValueError(f"got {len(context)} contexts for {rows} rows of logits")
    parts = []
    for r, ctx in enumerate(context):
        ids = torch.as_tensor(ctx, dtype=torch.long, device=device).reshape(-1)
        parts.append(ids[(ids >= 0) & (ids < vocab)] + r * vocab)
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
    return torch.bincount(flat, minlength=rows * vocab).to(torch.float32).view(rows, vocab)


def _is_list_of_contexts(context: object) -> bool:
    """A list whose items are themselves sequences/tensors (per-row contexts), not a flat list of ids."""
    if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):
        return False
    return len(context) > 0 and not isinstance(context[0], numbers.Integral) and not (
        isinstance(context[0], Tensor) and context[0].dim() == 0)


def apply_penalties(logits: Tensor, counts: Tensor, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Tensor:
    """Penalize tokens already seen, given their counts ``[N or 1, V]``; returns a new tensor.

    Repetition (HF ``RepetitionPenaltyLogitsProcessor``): a seen token's logit is divided by the penalty if
    positive, multiplied by it if not. Presence / frequency (OpenAI): subtract ``presence * (count > 0) +
    frequency * count``.
    """
    counts = counts.to(logits.device)
    seen = counts > 0
    out = logits
    if repetition_penalty != 1.0:
        penalized = torch.where(out > 0, out / repetition_penalty, out * repetition_penalty)
        out = torch.where(seen, penalized, out)
    if frequency_penalty != 0.0:
        out = out - frequency_penalty * counts.to(out.dtype)
    if presence_penalty != 0.0:
        out = out - presence_penalty * seen.to(out.dtype)
    return out


def make_logits_processor(cfg: SamplingConfig) -> LogitsProcessor | None:
    """One callable ``(logits [N, V], context) -> logits`` applying the config's penalties, or ``None``.

    ``context`` is either one id sequence (LongTensor ``[L]`` or list of ints) shared by every row, or a list
    of N such sequences (or a LongTensor ``[N, L]``), one per row. For a draft tree, row r's context is the
    committed ids plus the draft tokens on the path to that node (``DraftTree.row_contexts(committed)``), so
    each node is penalized for exactly the text it continues. Penalties apply whether or not the config is
    greedy.
    """
    if not cfg.has_penalties:
        return make_bias_processor(cfg.logit_bias)
    rep, pres, freq = cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty

    def process(logits: Tensor, context: Context | Sequence[Context]) -> Tensor:
        counts = token_counts(context, logits.shape[0], logits.shape[-1], logits.device)
        return apply_penalties(logits, counts, rep, pres, freq)

    return chain(process, make_bias_processor(cfg.logit_bias))


def make_bias_processor(logit_bias: dict[int, float] | None) -> LogitsProcessor | None:
    """OpenAI's ``logit_bias``: each listed token's logit moves by its bias, the same on every row."""
    if not logit_bias:
        return None
    ids = torch.tensor(list(logit_bias), dtype=torch.long)
    bias = torch.tensor([float(b) for b in logit_bias.values()])

    def process(logits: Tensor, context) -> Tensor:
        if int(ids.max()) >= logits.shape[-1]:
            raise InvalidArgumentError(f"logit_bias names token {int(ids.max())}; the vocabulary has "
                                       f"{logits.shape[-1]} tokens")
        out = logits.clone()
        out[..., ids.to(out.device)] += bias.to(out.device, out.dtype)
        return out

    return process


def apply_penalties_tree(logits: Tensor, contexts: Sequence[Context], cfg: SamplingConfig) -> Tensor:
    """Penalties with one context per row (convenience over ``make_logits_processor``)."""
    process = make_logits_processor(cfg)
    return logits if process is None else process(logits, contexts)


# ------------------------------------------------------------------------------------------ probabilities

_NEG_INF = float("-inf")


_TOP_P_CANDIDATES = 256  # top-p alone first looks for the nucleus among this many tokens


def _nucleus_drop(values: Tensor, log_total: Tensor, top_p: float) -> Tensor:
    """For logits ``values`` sorted descending: True where the mass before the token already reaches top_p
    (never the first). ``log_total`` = logsumexp over the whole distribution the values belong to."""
    probs = torch.exp(values - log_total)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = mass_before >= top_p
    drop[..., 0] = False   # a top_p below float32's smallest value compares as 0: the first token must stay
    return drop


def _top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the k largest logits (exactly k), then the smallest prefix of those whose mass reaches top_p.

    With top-k on, top-p works on the k kept values only (``topk`` returns them sorted). Top-p alone first tries
    the 256 largest logits and sorts the whole vocabulary only if some row's nucleus is larger than that; the
    result is the same, without a full sort in the common case.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        values, index = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        if top_p < 1.0:
            drop = _nucleus_drop(values, torch.logsumexp(values, dim=-1, keepdim=True), top_p)
            values = values.masked_fill(drop, _NEG_INF)
    elif top_p < 1.0:
        log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
        drop = None
        if vocab > _TOP_P_CANDIDATES:
            values, index = torch.topk(logits, _TOP_P_CANDIDATES, dim=-1)
            drop = _nucleus_drop(values, log_total, top_p)
            if not bool(drop[..., -1].all()):  # a nucleus may extend past the candidates
                drop = None
        if drop is None:
            values, index = torch.sort(logits, dim=-1, descending=True)
            drop = _nucleus_drop(values, log_total, top_p)
        values = values.masked_fill(drop, _NEG_INF)
    else:
        return logits
    return torch.full_like(logits, _NEG_INF).scatter(-1, index, values)


def _min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely one's (in log space)."""
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def _typical_p(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling (HF ``TypicalLogitsWarper``): keep the tokens whose surprisal is closest to
    the entropy, smallest set reaching ``mass``."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, dim=-1)
    cum = torch.softmax(logits.gather(-1, order), dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    drop_sorted = sorted_shifted > sorted_shifted.gather(-1, last)
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, _NEG_INF)


TINY_TEMPERATURE = torch.finfo(torch.float32).tiny


def make_probs_fn(cfg: SamplingConfig) -> ProbsFn:
    """One callable ``logits [N, V] -> probs [N, V] float32``: the exact distribution tokens are drawn from.

    Temperature, then top-k, top-p (nucleus, at least one token kept), min-p (relative to the max
    probability), typical-p; each filter sees the distribution left by the previous ones. For a greedy
    config the result is the one-hot argmax distribution, so sampling from it (or verifying against it) is
    greedy decoding.
    """
    if cfg.greedy:
        def greedy_probs(logits: Tensor) -> Tensor:
            top = logits.argmax(dim=-1, keepdim=True)
            return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, top, 1.0)
        return greedy_probs

    temperature = cfg.temperature
    filters: list[Callable[[Tensor], Tensor]] = []
    if cfg.top_k > 0 or cfg.top_p < 1.0:
        filters.append(lambda x: _top_k_top_p(x, cfg.top_k, cfg.top_p))
    if cfg.min_p > 0.0:
        filters.append(lambda x: _min_p(x, cfg.min_p))
    if cfg.typical_p < 1.0:
        filters.append(lambda x: _typical_p(x, cfg.typical_p))

    def probs_fn(logits: Tensor) -> Tensor:
        x = logits.to(torch.float32)
        if temperature != 1.0:
            # Shifted first, so a tiny temperature sends every non-maximal logit to -inf (not inf - inf = NaN);
            # below float32's smallest normal the limit (the argmax) is already reached, and the divisor
            # itself would round to 0 (0 / 0 = NaN).
            x = (x - x.max(dim=-1, keepdim=True).values) / max(temperature, TINY_TEMPERATURE)
        for f in filters:
            x = f(x)
        return torch.softmax(x, dim=-1)

    return probs_fn


# ------------------------------------------------------------------------------------------------ sampling

def make_generator(seed: int | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator all sampling randomness goes through; ``seed=None`` seeds it nondeterministically. Any
    integer is a seed: torch takes [-2**63, 2**64), and one outside is taken modulo 2**64."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        seed = int(seed)
        generator.manual_seed(seed if -2**63 <= seed < 2**64 else seed % 2**64)
    return generator


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from ``probs [N, V]`` (or ``[V]``) -> LongTensor ``[N]`` (or scalar)."""
    if probs.dim() == 1:
        return torch.multinomial(probs, 1, generator=generator)[0]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def chain(*processors: LogitsProcessor | None) -> LogitsProcessor | None:
    """Apply processors left to right (None entries skipped); None when there are none."""
    procs = [p for p in processors if p is not None]
    if not procs:
        return None
    if len(procs) == 1:
        return procs[0]

    def process(logits: Tensor, context) -> Tensor:
        for p in procs:
            logits = p(logits, context)
        return logits

    return process


def token_logprobs(logits: Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """``[TokenLogprob]`` for ``tokens[i]`` under row ``i`` of ``logits`` [n, V] (log-softmax in float32),
    each with the ``top`` most likely tokens of its row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens, chosen, tops)]
