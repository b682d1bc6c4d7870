"""What one generation gives back: a Step per target forward, the text pieces streamed from them, and stats.

The bottom of the generation layers: the engine's loop, the batched decoder and the search strategies in
tachy.decoding all produce these, so they live below all of them and import nothing of tachy's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

PREFILL_CHUNK = 1024   # prompt tokens per prefill forward (bounds the attention scores' memory)
COST_CONTEXT = 128     # cached tokens Engine.step_costs measures its forwards after
COST_ROUNDS = 3        # rounds over every width; each cost is its fastest
SAVED_COSTS_SLACK = 1.5   # saved costs whose one-token step is this much slower than now are measured again


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the distribution it was chosen from (the target's logits
    after the generation's logits processors, before temperature and truncation), and the ``top`` most likely
    tokens there as (id, log-probability), most likely first (``GenerationConfig.logprobs`` of them)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Step:
    """One target forward: the tokens it committed (``accepted`` drafts, then the bonus token), and their
    log-probabilities when the generation asked for them."""

    tokens: list[int]
    accepted: int
    draft_size: int
    logprobs: list[TokenLogprob] | None = None


PROGRESS = Step([], 0, 0)   # yielded by a search strategy after each forward that commits nothing yet: the
                            # engine checks its caller's should_stop there (a cancelled request stops mid-search)


@dataclass
class Handoff:
    """A lone generation that moves into a batch between two steps. ``Engine.stream`` asks ``wanted`` before
    each step after the first token; once it says yes, the stream ends there without a last piece and leaves
    the generation's state here (``taken``), which ``BatchDecoder.adopt`` continues as a batch row, bit for
    bit. The server's scheduler uses it on the PyTorch forward, where a lone request runs on the engine's own
    path: a request arriving meanwhile need not wait for the whole generation."""

    wanted: Callable[[], bool]
    ids: list[int] | None = None   # prompt and committed tokens; the last is the next forward's input
    cache: Any = None              # its KVCache, holding every token of ``ids`` but the last
    processor: Any = None          # Engine.token_choice's three, as they stand
    probs_fn: Any = None
    generator: Any = None
    stats: "GenerationStats | None" = None
    text: Any = None               # its TextStream (held-back text, detokenizer state)

    @property
    def taken(self) -> bool:
        return self.ids is not None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0       # of the prompt, tokens whose K/V came from the prefix cache
    generated_tokens: int = 0
    forwards: int = 0            # target forwards after prefill
    drafted: int = 0
    accepted: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0         # time inside the drafter (propose + update)
    draft_model_s: float = 0.0   # of draft_s, the draft model's forwards (the rest is drafting logic)
    kv_bytes: int = 0            # K/V bytes the cache holds (after any press), as of the last step
    kv_full_bytes: int = 0       # what an uncompressed cache would hold for the same tokens

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target forward: accepted drafts plus the bonus token (1.0 for plain decoding)."""
        return 1.0 + self.accepted / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first (which prefill produces) per second of decoding."""
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s else 0.0


@dataclass
class GenerationResponse:
    """A streamed piece: new text, the tokens behind it and running stats; finish_reason on the last one."""

    text: str
    token_ids: list[int]
    from_draft: list[bool]
    stats: GenerationStats
    finish_reason: str | None = None   # "stop" (EOS or stop string) or "length"
    logprobs: list[TokenLogprob] | None = None   # one per token_ids entry, when asked for
