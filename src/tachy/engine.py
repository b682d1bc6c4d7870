"""The generate loop: prefill, then steps of draft -> one target forward -> verify -> commit.

Plain decoding is the same loop with an empty draft tree, so vanilla and speculative decoding share every line
that decides which token comes next. Three layers, as in mlx-lm:

* ``Engine.generate_tokens`` yields a ``Step`` per target forward (committed token ids, which were drafted);
* ``Engine.stream`` turns steps into ``GenerationResponse`` text pieces (stop strings, EOS, budgets, stats);
* ``Engine.generate`` / ``Engine.chat`` join the pieces into a string.
"""
from __future__ import annotations

import functools
import json
import operator
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from . import kernels
from .cache import key_bucket
from .decoding import GenerationConfig, logits_processor
from .errors import ContextLengthError, InvalidArgumentError
from .generation import (COST_CONTEXT, COST_ROUNDS, PREFILL_CHUNK, PROGRESS, SAVED_COSTS_SLACK,
                         GenerationResponse, GenerationStats, Handoff, Step)
from .models.gguf_linear import GGUFLinear
from .models.llama import Transformer
from .context.ape import PassageStore, ape_steps
from .prefix_cache import DEFAULT_MB, PrefixCache
from .presses import Press
from .sampling import SamplingConfig, make_generator, make_probs_fn, sample, token_logprobs
from .speculative.drafters import Drafter, make_drafter, prediction_drafter
from .speculative.tree import DraftTree
from .speculative.verify import commit_exact, verify_greedy, verify_sampling
from .tokenizer import StreamDetokenizer, Tokenizer, check_token_ids


class Engine:
    """A loaded model with its tokenizer. Create with ``tachy.load``."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", weights: str = "",
                 cache_dir: Path | None = None):
        """cache_dir: where this model's conversions live (tachy.load sets it): measurements of this machine
        made once are kept there (``step_costs``)."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config = model.config
        self.weights = weights or str(model.dtype).removeprefix("torch.")   # the weight format, for humans
        self.cache_dir = cache_dir
        self._prefix_mb: float | None = DEFAULT_MB
        self._prefix_cache: PrefixCache | None = None
        self.passage_store = PassageStore()   # APE's encoded passages (tachy.context.ape), reused across requests

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """K/V of earlier prompts and turns (tachy.prefix_cache), made on first use; None when turned off."""
        if self._prefix_cache is None and self._prefix_mb is not None:
            self._prefix_cache = PrefixCache.from_mb(self._prefix_mb)
        return self._prefix_cache

    def set_prefix_cache(self, mb: float | None) -> None:
        """Bound the prefix cache to ``mb`` megabytes (dropping what it holds), or turn it off with None."""
        if mb is not None:
            PrefixCache.from_mb(mb)   # a bad budget fails here, not in the first request
        self._prefix_mb, self._prefix_cache = mb, None

    def prefix_cache_for(self, config: GenerationConfig, cache) -> PrefixCache | None:
        """The prefix cache a generation may read and fill: only where a hit reproduces the cold prefill bit
        for bit (the row-exact C forward on an uncompressed cache), and never under a press."""
        press = config.press
        if not config.prefix_cache or (press is not None and press.active) or config.decoding.is_search:
            return None
        if config.attention is not None and config.attention.sparse_prefill:   # its prompt K/V are not dense
            return None
        if not self.model.exact_trees(cache):
            return None
        return self.prefix_cache

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def warmup(self, max_tokens: int = 17) -> None:
        """Run one forward per verify width 1..max_tokens once, so that kernels' one-time setup (oneDNN
        builds a primitive per shape) is not billed to the first generations, nor to the gate's measurements."""
        if getattr(self, "_warm", 0) >= max_tokens:
            return
        cache = self.model.new_cache(capacity=128, fixed=True)
        for T in range(1, max_tokens + 1):
            self.model(torch.zeros(1, T, dtype=torch.long, device=self.device),
                       torch.arange(T, device=self.device), cache)
            cache.reset()
        self._warm = max_tokens

    def step_costs(self, max_tokens: int = 17) -> list[float]:
        """Seconds of one target forward over T tokens, ``costs[T]`` for T = 1..max_tokens (``costs[0]`` = 0),
        measured once per engine after 128 tokens of context at a few T, interpolated and made non-decreasing:
        what drafters weigh a draft's expected gain against (DraftTree.best_for_cost), and the batch scheduler
        its rows' drafts and prompt chunks. Also measures ``key_cost``, what each further cached token adds to
        each row. About 0.2 s for SmolLM2-135M.

        Other work on the machine only ever makes a forward slower, so each cost is the fastest of a few
        rounds that visit every width in turn (a busy second spoils one round of all widths, not all rounds
        of one). Costs kept from an earlier run are checked against one-token forwards timed now: a file
        measured while the machine was busy (seen: 596 ms per step for a 6 ms model) is measured again."""
        costs = self.__dict__.get("_costs")
        if costs is not None and len(costs) > max_tokens:   # every step asks: no inference_mode context to enter
            return costs
        return self._measure_step_costs(max_tokens)

    @torch.inference_mode()
    def _measure_step_costs(self, max_tokens: int) -> list[float]:
        saved = self._saved_costs_path()
        found = None
        if saved is not None and saved.is_file():   # measured on this machine before (cold starts skip most)
            try:
                found = json.loads(saved.read_text())
            except (OSError, ValueError):
                found = None
            if not (isinstance(found, dict) and len(found.get("costs", [])) > max_tokens):
                found = None
        context = min(COST_CONTEXT, self.max_context - max_tokens - 1)
        # a stretch of (zero) keys past the context: what attending to more keys adds (key_cost)
        extra = min(2048, self.max_context - context - max_tokens - 1)
        with kernels.threads_to_kernels(self.model.cpu_forward is not None):   # see _steps
            cache = self.model.new_cache(capacity=key_bucket(context + max(extra, 0) + max_tokens), fixed=True)
        native = self.model.exact_trees(cache)
        if not native:   # the PyTorch forward builds a kernel per shape on first use: not what a step costs
            self.warmup(max_tokens)
        widths = sorted({T for T in (1, 2, 3, 4, 6, 8, 12, 16, max_tokens) if T <= max_tokens})
        with kernels.threads_to_kernels(native):
            self.model(torch.ones(1, context, dtype=torch.long, device=self.device),
                       torch.arange(context, device=self.device), cache, last_only=True)
            if found is not None:
                now = self._fastest_forwards(cache, context, [1], rounds=COST_ROUNDS)[1]
                if found["costs"][1] <= SAVED_COSTS_SLACK * now:
                    self._costs = [float(c) for c in found["costs"]]
                    self._key_cost = float(found.get("key_cost", 0.0))
                    return self._costs
            measured = self._fastest_forwards(cache, context, widths, rounds=COST_ROUNDS)
            self._key_cost = self._measure_key_cost(cache, context, extra, min(4, max_tokens), measured)
        costs = [0.0]
        for T in range(1, max_tokens + 1):
            lo = max(w for w in widths if w <= T)
            hi = min(w for w in widths if w >= T)
            c = measured[lo] if lo == hi else measured[lo] + (measured[hi] - measured[lo]) * (T - lo) / (hi - lo)
            costs.append(max(c, costs[-1]))
        self._costs = costs
        if saved is not None:
            try:
                saved.parent.mkdir(parents=True, exist_ok=True)
                tmp = saved.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"costs": costs, "key_cost": self._key_cost}))
                os.replace(tmp, saved)
            except OSError:
                pass
        return costs

    def _fastest_forwards(self, cache, context: int, widths: list[int], rounds: int) -> dict[int, float]:
        """The fastest of ``rounds`` T-token forwards after ``context`` cached tokens, for each T in widths,
        the widths visited in turn each round."""
        best = dict.fromkeys(widths, float("inf"))
        for _ in range(rounds):
            for T in widths:
                tokens = torch.ones(1, T, dtype=torch.long, device=self.device)
                positions = torch.arange(context, context + T, device=self.device)
                start = time.perf_counter()
                self.model(tokens, positions, cache)
                best[T] = min(best[T], time.perf_counter() - start)
                cache.rollback(T)
        return best

    def _measure_key_cost(self, cache, context: int, extra: int, T: int, measured: dict[int, float]) -> float:
        """Seconds each cached key adds to each row of a forward: a T-token forward after ``extra`` more keys
        (zeros: attention's cost does not depend on their values) against the same forward at ``context``.
        At long contexts attention is most of a verify forward's cost and grows with its rows, which the
        costs measured at 128 tokens do not show (drafters scale them: Drafter.costs_at)."""
        if extra < 256:
            return 0.0
        cache.advance(extra)
        best = self._fastest_forwards(cache, context + extra, [T], rounds=COST_ROUNDS)[T]
        cache.rollback(extra)
        return max(0.0, (best - measured[T]) / (T * extra))

    def key_cost(self) -> float:
        """Seconds each cached token beyond COST_CONTEXT adds to each row of a target forward (measured with
        ``step_costs``): drafters weigh long-context verify forwards with it (Drafter.costs_at)."""
        self.step_costs()
        return self.__dict__.get("_key_cost", 0.0)

    def _saved_costs_path(self) -> Path | None:
        """Where step_costs of this model, weight format, machine and thread count are kept (C forward only:
        PyTorch's own speed varies more with its version and settings)."""
        if self.cache_dir is None or self.model.cpu_forward is None or not kernels.available():
            return None
        amx = "-amx" if kernels.amx_used() else ""   # AMX changes the costs (TACHY_AMX=0 turns it off)
        key = f"{self.weights}-{kernels.library().key}{amx}-{torch.get_num_threads()}t"
        return Path(self.cache_dir) / f"step-costs-{key}.json"

    @property
    def max_context(self) -> int:
        return self.config.max_seq_len

    # -- lowest layer: token ids in, steps out ----------------------------------------------------------
    def generate_tokens(self, prompt_ids: Sequence[int], config: GenerationConfig,
                        stats: GenerationStats | None = None,
                        should_stop: Callable[[], bool] | None = None,
                        handoff: Handoff | None = None) -> Iterator[Step]:
        """Yield one Step per target forward until max_new_tokens are committed (the last step may overshoot
        by nothing: drafts are capped to the budget) or the context is full. EOS is the caller's business.

        ``should_stop`` is asked after every forward, also inside a search strategy that commits nothing
        until it ends (beam, MBR): True ends the generation there (a server's cancelled request).
        ``handoff``: see :class:`~tachy.generation.Handoff` (only for configs ``batch.batchable`` accepts)."""
        steps = self._steps(prompt_ids, config, stats if stats is not None else GenerationStats(), handoff)
        try:
            for step in steps:
                if should_stop is not None and should_stop():
                    return
                if step is not PROGRESS:
                    yield step
        finally:
            steps.close()

    @property
    def runs_kernels(self) -> bool:
        """Whether forwards run on tachy's CPU kernels: the C forward, or GGUF blocks through the PyTorch forward.
        PyTorch's own ops around them then run on one thread (kernels.threads_to_kernels)."""
        return self.model.cpu_forward is not None or self._gguf_linears

    @functools.cached_property
    def _gguf_linears(self) -> bool:
        """Whether the model's PyTorch forward runs its linear layers on tachy's GGUF kernels (elsewhere, on
        another device or without the kernels, GGUFLinear is a plain bf16 linear)."""
        return self.device.type == "cpu" and kernels.available() and \
            any(isinstance(m, GGUFLinear) for m in self.model.modules())

    def _on_kernel_threads(self, steps: Iterator[Step]) -> Iterator[Step]:
        """``steps`` with each one's work (its forward and the PyTorch ops around it) under
        kernels.threads_to_kernels where the C forward runs: a search strategy's ops between forwards on two
        threads left OpenMP spinning into the next forward (measured: beam search 3.7x, contrastive search 2.5x
        slower than with PyTorch on one thread, the same outputs)."""
        native = self.model.cpu_forward is not None
        try:
            while True:
                with kernels.threads_to_kernels(native):
                    step = next(steps, None)
                if step is None:
                    return
                yield step
        finally:
            with kernels.threads_to_kernels(native):
                steps.close()

    @torch.inference_mode()
    def _steps(self, prompt_ids: Sequence[int], config: GenerationConfig, stats: GenerationStats,
               handoff: Handoff | None = None) -> Iterator[Step]:
        """generate_tokens' steps, and a search strategy's PROGRESS steps between its forwards."""
        prompt_ids = self.check_prompt(prompt_ids)
        if config.decoding.is_search:   # beam search & co. drive the model themselves (tachy.decoding)
            yield from self._on_kernel_threads(config.decoding.search(self, prompt_ids, config, stats))
            return
        if config.passages is not None:   # retrieved passages encoded apart (APE, tachy.context.ape)
            yield from ape_steps(self, prompt_ids, config, stats)
            return
        drafting = config.drafter not in (None, "none") or config.prediction is not None
        if self.model.cpu_forward is None:   # the C forward has no per-shape kernels to build
            self.warmup(config.max_draft_tokens + 1 if drafting else 1)
        sampling = config.sampling
        drafter = self.with_prediction(self._drafter(config.drafter, sampling), config)
        model, device = self.model, self.device
        # Where the C forward runs, PyTorch's own ops around it (the cache's zero fill, cache copies, choosing a
        # token, drafting) run on one thread: an op on two threads leaves OpenMP's threads spinning into the next
        # forward, which then runs up to twice as slow on two cores (kernels.threads_to_kernels).
        with kernels.threads_to_kernels(model.cpu_forward is not None):
            processor, probs_fn, generator = self.token_choice(config, prompt_ids)
            cache = model.new_cache(capacity=self.cache_capacity(len(prompt_ids), config.max_new_tokens),
                                    fixed=True)
        native = model.exact_trees(cache)
        stats.prompt_tokens = len(prompt_ids)

        if config.attention is not None:   # one-time work (a calibration), before the clock starts
            config.attention.prepare(self)
        start = time.perf_counter()
        with kernels.threads_to_kernels(native):
            prefix = self.prefix_cache_for(config, cache)
            if prefix is not None:
                stats.cached_tokens = cache.length = cache.position = prefix.load(prompt_ids[:-1], cache.k[:, 0],
                                                                                  cache.v[:, 0])
            attention = config.attention
            if attention is not None and attention.sparse_prefill:   # the prompt read sparsely (MInference)
                attention.attach_prefill(model, cache, len(prompt_ids))
            logits = self._prefill(prompt_ids, cache, config.press)
            if prefix is not None:
                prefix.store(prompt_ids, cache.k[:, 0], cache.v[:, 0])   # a dense prefill, even when sparse
            if attention is not None:   # decoding reads sparsely (or, after a sparse prefill, as the method says)
                attention.attach(model, cache)
            ids = list(prompt_ids)
            root, logits = self._choose(logits, ids, processor, probs_fn, generator)
            top = config.logprobs
            first = Step([root], 0, 0, None if top is None else token_logprobs(logits, [root], top))
        ids.append(root)
        stats.prefill_s = time.perf_counter() - start
        stats.generated_tokens = 1
        stats.kv_bytes, stats.kv_full_bytes = cache.nbytes, cache.uncompressed_nbytes
        yield first
        # a press that also evicts while decoding (StreamingLLM's evict_every, SCOPE's decoding budget): it is
        # consulted before each forward (presses/base.py DecodingEviction), and may watch the decoding queries
        press = config.press
        eviction = press.start_decoding(cache) if press is not None and press.active else None
        if drafter is not None:   # after the first token: its time to first token is plain decoding's
            t = time.perf_counter()
            with kernels.threads_to_kernels(native):
                drafter.reset(prompt_ids)
                attach = getattr(drafter, "attach_cache", None)   # a self-draft reads the target's K/V
                if attach is not None:
                    attach(cache)
            stats.draft_s += time.perf_counter() - t
        # Every tree node's row exact (the C forward), or only the leading chain's (speculative/verify.py)?
        exact_trees = model.exact_trees(cache)
        # the kernels on PyTorch's threads also where the PyTorch forward runs around GGUF blocks (a press's
        # cache): PyTorch's attention over a few thousand keys on one thread loses less than its spin costs the
        # kernels (snapkv, StreamingLLM at 4k tokens: decoding 10-13% faster); bf16 weights stay PyTorch's
        native = exact_trees or self._gguf_linears

        try:
            while cache.position + 1 < self.max_context and stats.generated_tokens < config.max_new_tokens:
                if handoff is not None and eviction is None and config.attention is None and handoff.wanted():
                    handoff.ids, handoff.cache, handoff.stats = ids, cache, stats
                    handoff.processor, handoff.probs_fn, handoff.generator = processor, probs_fn, generator
                    return
                # the C forward's kernels and PyTorch's small ops take turns on the cores
                with kernels.threads_to_kernels(native):
                    step_start = time.perf_counter()
                    # no drafting past the context window or the token budget (the bonus token is always produced),
                    # nor past the next eviction (plain and speculative decoding then evict at the same cache sizes)
                    room = min(self.max_context - cache.position - 2,
                               config.max_new_tokens - stats.generated_tokens - 1)
                    if eviction is not None:
                        room = min(room, eviction.step(cache))
                    tree = DraftTree.empty()
                    if drafter is not None and config.max_draft_tokens and room > 0:
                        tree = drafter.propose(ids, min(config.max_draft_tokens, room))
                        if not exact_trees:
                            tree = tree.prune_to_spine()
                        if len(tree) > room:
                            tree = tree.truncate(room)
                        stats.draft_s += time.perf_counter() - step_start
                        stats.draft_model_s = drafter.model_s
                    tokens = [root] + tree.tokens
                    positions = torch.tensor(tree.positions(cache.position), device=device)
                    mask = None
                    if len(tree):
                        mask = torch.cat([torch.ones(len(tokens), cache.length, dtype=torch.bool, device=device),
                                          tree.attention_mask(device)], dim=1)
                    base = cache.length
                    logits = model(torch.tensor([tokens], device=device), positions, cache, mask)[0]
                    if processor is not None:  # penalties: each node sees its own path as context
                        logits = processor(logits, tree.row_contexts(torch.tensor(ids, device=device)))
                    if probs_fn is None:
                        accepted, bonus = verify_greedy(tree, logits)
                    else:
                        accepted, bonus = verify_sampling(tree, probs_fn(logits), generator)
                    if not exact_trees:
                        accepted, bonus = commit_exact(tree, accepted, bonus)
                    cache.keep([base] + [base + 1 + j for j in accepted])
                    if eviction is not None:
                        eviction.committed([0] + [1 + j for j in accepted])
                    new = [tree.tokens[j] for j in accepted] + [bonus]
                    ids.extend(new)
                    root = bonus
                    if drafter is not None:
                        t = time.perf_counter()
                        drafter.update(ids, len(accepted), logits if drafter.needs_logits else None, tokens)
                        stats.draft_s += time.perf_counter() - t
                    stats.forwards += 1
                    stats.drafted += len(tree)
                    stats.accepted += len(accepted)
                    stats.generated_tokens += len(new)
                    stats.kv_bytes, stats.kv_full_bytes = cache.nbytes, cache.uncompressed_nbytes
                    stats.decode_s += time.perf_counter() - step_start
                    step = Step(new, len(accepted), len(tree), None if top is None else token_logprobs(
                        logits[[0] + [1 + j for j in accepted]], new, top))
                yield step
        finally:   # the committed sequence's blocks, for the next turn (its last token is not in the cache yet);
            # not under sparse attention, whose generated tokens' K/V differ from a (dense) prefill's
            if prefix is not None and config.attention is None:
                with kernels.threads_to_kernels(native):
                    prefix.store(ids[:-1], cache.k[:, 0], cache.v[:, 0])

    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints, each a token of the model (the C forward reads the embedding row of
        any id it is given), within the context window."""
        try:
            prompt_ids = [operator.index(t) for t in prompt_ids]   # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise InvalidArgumentError("the prompt must be a string or a sequence of integer token ids") from None
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty")
        check_token_ids(prompt_ids, self.config.vocab_size)
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthError(f"prompt has {len(prompt_ids)} tokens; the context window of {self.name} "
                                     f"is {self.max_context}")
        return prompt_ids

    def _prefill(self, prompt_ids: list[int], cache, press: Press | None = None) -> torch.Tensor:
        """Forward the prompt in chunks (bounded attention memory); return the last position's logits [1, V].

        With a press, all but the last prompt token are prefilled, compressed, and the last token then runs
        over the compressed cache: every generated token, the first included, comes from the compressed KV."""
        if press is not None and press.active and len(prompt_ids) > 1:
            press.prepare(self.model)
            with press.observing(cache):
                self._prefill(prompt_ids[:-1], cache)
            press.apply(cache)
            tokens = torch.tensor([prompt_ids[-1:]], device=self.device)
            return self.model(tokens, torch.tensor([cache.position], device=self.device), cache)[0]
        logits = None
        with cache.plain_rows():
            for s in range(cache.length, len(prompt_ids), PREFILL_CHUNK):   # after a prefix-cache hit
                chunk = prompt_ids[s:s + PREFILL_CHUNK]
                tokens = torch.tensor([chunk], device=self.device)
                positions = torch.arange(s, s + len(chunk), device=self.device)
                logits = self.model(tokens, positions, cache, last_only=True)[0]
        return logits

    def cache_capacity(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """A generation's fixed cache size, in whole key buckets (see KVCache): the same shapes for plain,
        speculative and batched decoding, which is what makes their greedy outputs bitwise identical."""
        return min(self.max_context, key_bucket(prompt_tokens + max_new_tokens))

    def token_choice(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> tuple:
        """How one generation picks its tokens: (logits processor or None, probs_fn or None for greedy,
        generator or None for greedy), shared by the engine's loop, batched rows and search strategies."""
        sampling = config.sampling
        return (logits_processor(self, config, prompt_ids),
                None if sampling.greedy else make_probs_fn(sampling),
                None if sampling.greedy else make_generator(sampling.seed, self.device))

    @staticmethod
    def _choose(logits, context: list[int], processor, probs_fn, generator) -> tuple[int, torch.Tensor]:
        """The first new token, from the prefill logits [1, V], and those logits as processed."""
        if processor is not None:
            logits = processor(logits, context)
        if probs_fn is None:
            return int(logits.argmax(-1)), logits
        return int(sample(probs_fn(logits), generator)), logits

    def load_drafter(self, name: str = "default") -> Drafter | None:
        """The engine's drafter ``name``, built now (the default drafter's int4 copy takes a second or so):
        a server calls this at start-up rather than in its first request."""
        return self._drafter(name, SamplingConfig())

    def shared_drafter(self, name: str) -> Drafter:
        """The engine's one drafter ``name``: its learned state (Token Recycling's table, acceptance counts)
        carries across calls; batch rows draft with forks of it (``Drafter.fork``)."""
        cache = self.__dict__.setdefault("_drafters", {})
        if name not in cache:
            cache[name] = make_drafter(name)
            _check_target(cache[name], self)
        return cache[name]

    def _drafter(self, drafter: str | Drafter | None, sampling: SamplingConfig) -> Drafter | None:
        if drafter is None or drafter == "none":
            return None
        if isinstance(drafter, str) and sampling.seeded:
            return self.new_drafter(drafter, sampling)
        if isinstance(drafter, str):
            return self.shared_drafter(drafter)
        _check_target(drafter, self)
        return drafter

    def new_drafter(self, name: str, sampling: SamplingConfig) -> Drafter:
        """A fresh drafter ``name`` for one generation, checked against this target (no state learned in
        earlier calls). A seed must reproduce the output, so a seeded sampling generation's drafts may depend on
        nothing but the text: no timing gate (the ungated "model-free" stands in for "gated")."""
        return _check_target(make_drafter("model-free" if sampling.seeded and name == "gated" else name), self)

    def with_prediction(self, drafter: Drafter | None, config: GenerationConfig) -> Drafter | None:
        """The drafter of a request with a prediction (Predicted Outputs): a fresh one that copies from the
        prediction, asking ``drafter`` otherwise; ``drafter`` itself without a prediction."""
        if config.prediction is None:
            return drafter
        pred = config.prediction
        pred_ids = self.tokenizer.encode(pred, add_special_tokens=False) if isinstance(pred, str) else pred
        return prediction_drafter(pred_ids, drafter)

    # -- middle layer: text pieces ------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *,
               should_stop: Callable[[], bool] | None = None, handoff: Handoff | None = None,
               **kwargs) -> Iterator[GenerationResponse]:
        """Stream text pieces for a raw prompt (a string is tokenized with the model's special tokens);
        ``should_stop`` and ``handoff`` as for :meth:`generate_tokens` (a stream handed off ends without a
        last piece: its text stream goes with the handoff)."""
        config = config or GenerationConfig(**kwargs)
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt   # checked in _steps
        stats = GenerationStats()
        text = TextStream(self.tokenizer, config, stats)
        steps = self.generate_tokens(prompt_ids, config, stats, should_stop, handoff)
        try:
            for step in steps:
                piece = text.push(step)
                if piece is not None:
                    yield piece
                    if piece.finish_reason is not None:
                        return
            if handoff is not None and handoff.taken:
                handoff.text = text
                return
            yield text.end()
        finally:
            steps.close()

    # -- top layer: strings ---------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, **kwargs) -> str:
        return "".join(r.text for r in self.stream(prompt, config, **kwargs))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (BOS handled by the template;
        special-token text inside a message stays text: Tokenizer.chat_ids)."""
        return self.tokenizer.chat_ids(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], config: GenerationConfig | None = None, **kwargs) -> str:
        return self.generate(self.chat_prompt(messages), config, **kwargs)

    def stream_chat(self, messages: list[dict], config: GenerationConfig | None = None,
                    **kwargs) -> Iterator[GenerationResponse]:
        return self.stream(self.chat_prompt(messages), config, **kwargs)


class TextStream:
    """Steps of one generation -> text pieces: EOS, the token budget, stop strings (text that could begin one
    is held back until it cannot) and streaming detokenization. Engine.stream and tachy.batch share it."""

    def __init__(self, tokenizer: Tokenizer, config: GenerationConfig, stats: GenerationStats):
        self.config, self.stats = config, stats
        self.eos = set() if config.ignore_eos else set(tokenizer.eos_token_ids)
        self.detok = StreamDetokenizer(tokenizer)
        self.text, self.emitted = "", 0   # text decoded so far, and how much of it was already sent
        self.hold = max((len(s) for s in config.stop), default=0)  # keep back what could start a stop string
        self.produced = 0
        self.pending_ids: list[int] = []   # tokens behind text not yet sent (held back for stop strings)
        self.pending_draft: list[bool] = []
        self.pending_logprobs: list | None = None if config.logprobs is None else []

    def push(self, step: Step) -> GenerationResponse | None:
        """The piece this step makes sendable (finish_reason set on the last one), or None while held back."""
        config, tokens, finish = self.config, step.tokens, None
        for i, tok in enumerate(tokens):
            if tok in self.eos:
                tokens, finish = tokens[:i], "stop"
                break
        if finish is None and self.produced + len(tokens) >= config.max_new_tokens:
            tokens, finish = tokens[:config.max_new_tokens - self.produced], "length"
        self.produced += len(tokens)
        self.stats.generated_tokens = self.produced
        self.pending_ids += tokens
        self.pending_draft += [i < step.accepted for i in range(len(tokens))]
        if self.pending_logprobs is not None and step.logprobs is not None:
            self.pending_logprobs += step.logprobs[:len(tokens)]
        for tok in tokens:
            self.text += self.detok.add(tok)
        if finish is not None:
            self.text += self.detok.flush()
        cut = _find_stop(self.text, config.stop, self.emitted)
        if cut is not None:
            self.text, finish = self.text[:cut], "stop"
        if finish is None and len(self.text) - self.emitted <= self.hold and self.hold:
            return None  # nothing safe to send yet: the tokens wait in pending_ids
        upto = len(self.text) if finish is not None else len(self.text) - self.hold
        piece, self.emitted = self.text[self.emitted:upto], max(self.emitted, upto)
        return self._send(piece, finish)

    def end(self) -> GenerationResponse:
        """The last piece when the steps ran out (the context window is full)."""
        return self._send(self.text[self.emitted:] + self.detok.flush(), "length")

    def _send(self, piece: str, finish: str | None) -> GenerationResponse:
        out = GenerationResponse(piece, self.pending_ids, self.pending_draft, self.stats, finish,
                                 self.pending_logprobs)
        self.pending_ids, self.pending_draft = [], []
        self.pending_logprobs = None if self.pending_logprobs is None else []
        return out


def _check_target(drafter: Drafter, engine: Engine) -> Drafter:
    """Drafters that run a model of their own (draft-model) load it beside the target and check it fits."""
    check = getattr(drafter, "check_target", None)
    if check is not None:
        check(engine)
    return drafter


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the earliest stop string begins, searching only text not yet sent (plus overlap)."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
