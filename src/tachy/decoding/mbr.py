"""Minimum Bayes risk decoding (Kumar & Byrne 2004; Eikema & Aziz 2020 for sampled hypotheses).

Draw ``num_samples`` continuations with the configured sampling (each through the engine's ordinary loop,
speculative drafts included), then return the one with the highest expected utility against the others,
used as pseudo-references: ``argmax_i  1/(N-1) * sum_{j != i} u(y_i, y_j)``. Ties go to the earlier sample.

The utility is pluggable: a name from ``UTILITIES`` or any callable ``(candidate ids, reference ids) ->
float``. Built in: ``ngram_f1``, the mean over n = 1..4 of the F1 of clipped token n-gram overlap (a
BLEU/ROUGE-like similarity on token ids, so no detokenization or tokenizer-specific rules).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Sequence

from ..errors import InvalidArgumentError, UnknownNameError
from ..generation import PROGRESS, GenerationStats, Step
from .base import Strategy, eos_ids, register

Utility = Callable[[Sequence[int], Sequence[int]], float]


def ngram_f1(candidate: Sequence[int], reference: Sequence[int], max_n: int = 4) -> float:
    """Mean over n = 1..max_n of the F1 of clipped n-gram matches (orders neither side has are skipped)."""
    scores = []
    for n in range(1, max_n + 1):
        a = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
        b = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        if not a and not b:
            continue
        overlap = sum((a & b).values())
        total = sum(a.values()) + sum(b.values())
        scores.append(2.0 * overlap / total if total else 0.0)
    return sum(scores) / len(scores) if scores else 1.0


UTILITIES: dict[str, Utility] = {"ngram_f1": ngram_f1}


def mbr_select(samples: Sequence[Sequence[int]], utility: Utility) -> tuple[int, list[float]]:
    """Index of the sample with the highest mean utility against the others, and every sample's mean."""
    n = len(samples)
    means = []
    for i in range(n):
        total = sum(utility(samples[i], samples[j]) for j in range(n) if j != i)
        means.append(total / (n - 1) if n > 1 else 0.0)
    return max(range(n), key=lambda i: (means[i], -i)), means


@register
@dataclass
class MBR(Strategy):
    """MBR decoding. num_samples: hypotheses drawn (8); utility: a UTILITIES name or a callable ("ngram_f1").
    Needs temperature > 0 (identical greedy samples leave nothing to choose)."""

    name: ClassVar[str] = "mbr"
    num_samples: int = 8
    utility: str | Callable = "ngram_f1"

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise InvalidArgumentError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if isinstance(self.utility, str) and self.utility not in UTILITIES:
            raise UnknownNameError(f"unknown MBR utility {self.utility!r}; available: {', '.join(sorted(UTILITIES))}")
        if not isinstance(self.utility, str) and not callable(self.utility):
            raise InvalidArgumentError("utility must be a name or a callable (candidate, reference) -> float")

    def check(self, config) -> None:
        if config.temperature <= 0:
            raise InvalidArgumentError("mbr chooses among samples: set temperature > 0")
        # samples come from the engine's own loop, which may use drafts: keep the drafter

    def search(self, engine, prompt_ids, config, stats) -> Iterator:

        eos = eos_ids(engine, config)
        utility = UTILITIES[self.utility] if isinstance(self.utility, str) else self.utility
        samples = []
        start = time.perf_counter()
        for i in range(self.num_samples):
            seed = None if config.seed is None else config.seed + i
            sample_config = dataclasses.replace(config, strategy="default", strategy_options={}, seed=seed)
            sample_stats = GenerationStats()
            tokens, finish = [], None
            for piece in engine.stream(prompt_ids, sample_config):
                tokens += piece.token_ids
                sample_stats, finish = piece.stats, piece.finish_reason
                yield PROGRESS   # nothing committed yet; the engine may stop here (a cancelled request)
            if finish == "stop" and eos:   # the stream drops the EOS; keep it so the answer ends the same way
                tokens.append(eos[0])
            samples.append(tokens)
            stats.forwards += sample_stats.forwards
            stats.drafted += sample_stats.drafted
            stats.accepted += sample_stats.accepted
            stats.draft_s += sample_stats.draft_s
            stats.draft_model_s += sample_stats.draft_model_s
        best, means = mbr_select(samples, utility)
        self.last_samples, self.last_utilities = samples, means   # for inspection and tests
        stats.prompt_tokens = len(prompt_ids)
        stats.decode_s = time.perf_counter() - start
        yield Step(samples[best], 0, 0)
