"""A small draft model proposes a greedy chain; the target verifies it (classic speculative decoding).

Reference: Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (2023); Chen et al.,
"Accelerating Large Language Model Decoding with Speculative Sampling" (2023).

The draft model must share the target's tokenizer. It can be a smaller model of the same family, or the
target itself in a cheaper weight format: ``draft-model:model=smollm2-135m,dtype=int4`` drafts with the int4
copy of SmolLM2 for the bf16 target (about 2x fewer bytes per token; docs/benchmarks.md measures it).

The drafter keeps its own KV cache over the committed tokens. Each step it feeds only what the cache lacks
(the tokens committed since the last step that it did not draft itself), then decodes ``max_tokens`` tokens
one by one. Tokens it drafted and the target accepted are already cached, so an accepted draft costs nothing
to catch up on; a rejected tail is rolled back.

When the draft model is the target's own checkpoint in another weight format (``model=self``,
``quantized-self``), it needs no cache of its own: the engine hands it the target's cache
(:meth:`DraftModelDrafter.attach_cache`), and it drafts over the target's exact K/V of every committed token,
writing its draft tokens' K/V into the free slots past the cache's length, which the verify forward then
overwrites. No catch-up forwards, no prefill of its own, and the whole prompt as context.
"""
from __future__ import annotations

import copy
import time

import torch

from ...errors import InvalidArgumentError
from ...models.draft_step import DraftStep
from ..tree import DraftTree
from .base import Drafter
from .fallback import FallbackDrafter
from .suffix_automaton import DraftMatch, SuffixAutomatonDrafter


class DraftModelDrafter(Drafter):
    """Greedy chain drafts from a draft model.

    model: a registry name, GGUF file or HF folder (loaded with ``tachy.load``), a loaded ``tachy.Engine``,
    or ``"self"``: the target's own weights, copied in memory to ``dtype`` (default int4).
    dtype / device: as in ``tachy.load`` (device defaults to the target's).
    context: with a cache of its own, the draft model reads at most the last ``context`` tokens of the
    prompt: prefilling a long prompt through a quantized model costs more than the whole generation saves
    (int4 prefill is slower than bf16 here). A self-draft reading the target's cache sees the whole context.
    min_confidence: stop the chain after a token the draft model gives less than this probability (its
    later tokens would rarely be accepted, and each costs a draft forward); 0 drafts the full budget. 0.3
    gave the best modeled speed for int4/int8 self-drafts on the dev prompts (docs/benchmarks.md).
    max_len: the longest chain (0: the engine's draft budget). Each draft token costs a draft forward, so a
    long chain of confident tokens can cost more than the verify forward saves.
    rescore_top: with ``model="self"``, the quantized copy's output layer recomputes its ``rescore_top``
    largest logits with the target's float output weights (:class:`~tachy.models.quant.RescoredLinear`;
    0: plain quantized logits). Ignored for a separate draft model.
    svip: stop the chain once the draft model's acceptance bound from its own entropy, 1 - sqrt(H(q) / 2)
        (H in nats: Pinsker's inequality with the entropy standing for the divergence to the target, as in SVIP,
        Zhang et al. 2024, https://arxiv.org/abs/2411.18462), falls below this; 0 (the default): off.
    guess_len / guess_match: with an automaton to guess from (``guesses``, set by ``quantized-self``), each
    chain step also feeds up to ``guess_len`` tokens that followed the chain's match of ``guess_match``+
    tokens in the context, and keeps those the draft model itself chooses (see ``_chain``); 0: off.
    """

    name = "draft-model"
    requires_options = True   # nothing to draft with until a model is named (`tachy bench --methods all` skips it)
    needs_target = True

    def __init__(self, model=None, dtype: str | None = None, device: str | None = None,
                 min_confidence: float = 0.3, context: int = 128, max_len: int = 0, rescore_top: int = 8,
                 guess_len: int = 0, guess_match: int = 2, svip: float = 0.0):
        if context < 1:
            raise InvalidArgumentError(f"context must be a positive number of tokens, got {context}")
        self.context = context
        if not 0.0 <= min_confidence < 1.0:
            raise InvalidArgumentError(f"min_confidence must lie in [0, 1), got {min_confidence}")
        self.min_confidence = min_confidence
        if not 0.0 <= svip < 1.0:
            raise InvalidArgumentError(f"svip must lie in [0, 1), got {svip}")
        self.svip = svip
        if max_len < 0:
            raise InvalidArgumentError(f"max_len must be >= 0, got {max_len}")
        self.max_len = max_len
        if rescore_top < 0:
            raise InvalidArgumentError(f"rescore_top must be >= 0, got {rescore_top}")
        self.rescore_top = rescore_top
        if guess_len < 0 or guess_match < 1:
            raise InvalidArgumentError(
                f"guess_len must be >= 0 and guess_match >= 1, got {guess_len} and {guess_match}")
        self.guess_len, self.guess_match = guess_len, guess_match
        self.guesses: SuffixAutomatonDrafter | None = None   # set by QuantizedSelfDrafter: its automaton
        if model is None:
            raise InvalidArgumentError("draft-model needs a model: --drafter draft-model:model=NAME_OR_PATH")
        self.spec, self.dtype, self.device = model, dtype, device
        self.engine = model if hasattr(model, "model") and hasattr(model, "tokenizer") else None
        self.cache = None
        self.cached: list[int] = []       # the tokens whose K/V the draft cache holds, in order
        self.shares_target_kv = False     # the draft model is the target's own checkpoint (model="self")
        self.target_cache = None          # the target's cache this sequence, when shared (attach_cache)
        self.step: DraftStep | None = None
        self._model_s = 0.0

    def check_target(self, target) -> None:
        """Called by the engine with the target Engine: load the draft model beside it, check the vocabulary."""
        if self.engine is None and self.spec == "self":   # the target's weights, quantized in memory
            from ...engine import Engine
            from ...models.quant import is_float_linear, quantized_copy

            if not is_float_linear(target.model.layers[0].mlp.down_proj):
                raise InvalidArgumentError(
                    f"the int4 self-draft copies float weights, and {target.name} runs {target.weights} weights "
                    "already; use drafter 'default' or 'model-free', or load the model with dtype bf16")

            dtype = self.dtype or "int4"
            copies = target.__dict__.setdefault("_quantized_copies", {})   # one copy per target and variant
            if (dtype, self.rescore_top) not in copies:
                copies[dtype, self.rescore_top] = Engine(quantized_copy(target.model, dtype, self.rescore_top),
                                                         target.tokenizer, f"{target.name} ({dtype})")
            self.engine = copies[dtype, self.rescore_top]
            self.shares_target_kv = True
        elif self.engine is None:
            import tachy

            self.engine = tachy.load(self.spec, dtype=self.dtype, device=self.device or str(target.device),
                                     progress=False)
        if self.engine.model.config.vocab_size > target.model.config.vocab_size:
            raise InvalidArgumentError(
                f"draft model vocabulary ({self.engine.model.config.vocab_size}) is larger than the target's "
                f"({target.model.config.vocab_size}): the models must share a tokenizer")

    def attach_cache(self, cache) -> None:
        """Read the target's cache this sequence, when its K/V mean the same thing to the draft model: the
        target's own checkpoint, a plain cache (no press, nobody watching its queries: presses/scope.py), the
        same dtype and device."""
        self.target_cache = None
        if not self.shares_target_kv:
            return
        model = self.engine.model
        cfg = model.config
        if (cache.prefix is None and not cache.compressed and not cache.ragged and cache.observer is None
                and cache.shape == (cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)
                and cache.dtype == model.dtype and cache.device == model.device):
            self.target_cache = cache

    def _restart(self) -> None:
        if self.engine is None:
            raise InvalidArgumentError("draft-model: the draft model is not loaded (Engine calls check_target)")
        model = self.engine.model
        self.cache = model.new_cache(capacity=256)
        self.target_cache = None          # a new sequence: the engine attaches its cache after reset
        self.cached = []
        self._model_s = 0.0               # seconds in draft-model forwards this sequence (model_s)
        self.offset = 0                   # history[offset:] is what the draft model sees
        self.agreed = 0                   # history[offset:][:agreed] was fed (or agreed with the cache) last step

    @torch.inference_mode()
    def _draft(self, max_tokens: int) -> DraftTree:
        if self.max_len:
            max_tokens = min(max_tokens, self.max_len)
        target = self.target_cache
        if target is not None and target.length == len(self.history) - 1:   # in step: the root is not cached
            view = copy.copy(target)      # shares the buffers; its own length, and the free slots to write
            view.fixed = False
            return self._chain([self.history[-1]], view, max_tokens)
        self.target_cache = None          # out of step with the target (not expected): own cache from now on
        model, cache, history = self.engine.model, self.cache, self.history
        if len(history) - self.offset >= model.config.max_seq_len - max_tokens:
            return DraftTree.empty()
        if not self.cached:   # a new sequence: the draft cache starts ``context`` tokens before its end
            self.offset = max(0, len(history) - self.context)
        seen = history[self.offset:]     # what the draft cache should hold (rope is relative: positions from 0)
        # the longest prefix of it already in the cache: only the last step's tokens can disagree
        common = min(self.agreed, len(self.cached), len(seen) - 1)   # the root is always fed, for its logits
        while common < len(seen) - 1 and common < len(self.cached) and self.cached[common] == seen[common]:
            common += 1
        self.agreed = len(seen)
        cache.rollback(cache.length - common)
        del self.cached[common:]
        return self._chain(seen[common:], cache, max_tokens, self.cached)

    @property
    def model_s(self) -> float:
        return self._model_s

    def _forward(self, tokens: list[int], cache, every_row: bool = False) -> torch.Tensor:
        """The draft model's next-token logits after feeding ``tokens`` at the cache's next positions: [V] after
        the last one, or with ``every_row`` [len(tokens), V], one row per token (a guess being checked).
        Chain steps take the lean DraftStep; catching up on a sequence's tokens takes the model."""
        start = time.perf_counter()
        if (len(tokens) == 1 or every_row) and DraftStep.supports(cache):
            if self.step is None or self.step.model is not self.engine.model:
                self.step = DraftStep(self.engine.model)
            logits = self.step(tokens if every_row else tokens[0], cache)
        else:
            device = self.engine.model.device
            positions = torch.arange(cache.position, cache.position + len(tokens), device=device)
            logits = self.engine.model(torch.tensor([tokens], device=device), positions, cache,
                                       last_only=not every_row)[0]
            logits = logits if every_row else logits[-1]
        self._model_s += time.perf_counter() - start
        return logits

    def _unsure(self, logits: torch.Tensor, token: int) -> bool:
        """Stop the chain after ``token``: its probability is below ``min_confidence``, or the SVIP bound below
        ``svip``."""
        if not self.min_confidence and not self.svip:
            return False
        log_probs = logits.float().log_softmax(-1)
        if self.min_confidence and float(log_probs[token].exp()) < self.min_confidence:
            return True
        if self.svip:
            entropy = float(-(log_probs.exp() * log_probs).sum())
            return 1.0 - (entropy / 2) ** 0.5 < self.svip
        return False

    def _chain(self, feed: list[int], cache, max_tokens: int, cached: list[int] | None = None) -> DraftTree:
        """Feed ``feed`` (what the cache lacks, the root last), then greedy tokens until the budget or a token
        below ``min_confidence``; every token fed is appended to ``cached`` (the last draft token is not fed).

        With ``guess_len`` (and an automaton to guess from), a single token is fed together with what followed
        the longest match of the text so far in the context, up to ``guess_len`` tokens, and the guessed
        tokens the draft model itself chooses are kept: the same chain (up to rounding) in fewer forwards
        wherever the text copies the context. ``quantized-self`` guesses 3 tokens: four rows cost about 1.4
        one-row steps, five cost 2.2 (the int4 kernel works in blocks of four rows)."""
        draft: list[int] = []
        match = DraftMatch(self.guesses) if self.guess_len and self.guesses is not None else None
        while True:
            guess: list[int] = []
            if match is not None and len(feed) == 1:
                guess = match.continuation(min(self.guess_len, max_tokens - len(draft)), self.guess_match)
            rows = self._forward(feed + guess, cache, every_row=bool(guess))
            taken, done = 0, False
            while not done and taken < len(guess) and int(rows[taken].argmax()) == guess[taken]:
                draft.append(guess[taken])
                match.push(guess[taken])
                taken += 1
                done = len(draft) == max_tokens or self._unsure(rows[taken - 1], guess[taken - 1])
            cache.rollback(len(guess) - taken)          # the guessed tokens the draft model would not choose
            if cached is not None:
                cached.extend(feed + guess[:taken])
            if done:
                return DraftTree.chain(draft)
            logits = rows[taken] if guess else rows
            token = int(logits.argmax())
            draft.append(token)
            if len(draft) == max_tokens or self._unsure(logits, token):
                return DraftTree.chain(draft)
            if match is not None:
                match.push(token)
            feed = [token]


class QuantizedSelfDrafter(FallbackDrafter):
    """``"quantized-self"``: the suffix automaton when the context holds a match of ``min_match_len`` tokens,
    else greedy chains from the target's own weights quantized to ``dtype`` (int4: about a third of bf16's
    bytes per token). No second model and no training: the quantized copy agrees with the target on most
    tokens, and verification keeps the output exactly the target's. It drafts over the target's own K/V
    (see the module docstring). Costs the quantized copy's memory.

    The copy's output layer recomputes its 8 largest logits with the target's float output weights
    (``rescore_top``, :class:`~tachy.models.quant.RescoredLinear`): for SmolLM2 nearly all of the int4 copy's
    disagreements came from its int4 output layer, and with it the copy's chains of 16 tokens were accepted
    whole 3 times in 4 on the dev prompts. So chains are long (``max_len`` 16, the engine's default budget) and
    stop only below ``min_confidence`` 0.1, and the suffix automaton drafts only on matches of 8+ tokens
    (``min_match_len``); shorter matches guess worse than the copy does. On a shorter match (2+ tokens,
    ``guess_match``) the copy checks the automaton's next 3 tokens (``guess_len``) in the same forward as its
    own token, and keeps those it would have drafted: copied text costs fewer draft forwards (3.06x vs 2.75x
    without it on the 34 code-editing and summarization prompts). docs/benchmarks.md has the A/B runs.
    """

    name = "quantized-self"
    needs_target = True

    def __init__(self, dtype: str = "int4", min_match_len: int = 8, min_confidence: float = 0.1,
                 context: int = 128, max_len: int = 16, rescore_top: int = 8, guess_len: int = 3,
                 guess_match: int = 2, svip: float = 0.0):
        self.draft_model = DraftModelDrafter("self", dtype=dtype, min_confidence=min_confidence, context=context,
                                             max_len=max_len, rescore_top=rescore_top, guess_len=guess_len,
                                             guess_match=guess_match, svip=svip)
        sam = SuffixAutomatonDrafter(min_match_len=min_match_len)
        self.draft_model.guesses = sam
        super().__init__([sam, self.draft_model])
