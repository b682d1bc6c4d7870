"""DraftModelDrafter: chains from a second model; lossless whatever the draft model says."""
from __future__ import annotations

import random

import pytest
import torch

import tachy
from tachy import Engine, GenerationConfig, GenerationStats, kernels
from tachy.errors import InvalidArgumentError
from tachy.speculative.drafters import DraftModelDrafter, SuffixAutomatonDrafter, make_drafter
from tests.conftest import tiny_model


def generate(engine: Engine, prompt: list[int], drafter, n: int = 40) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    config = GenerationConfig(max_new_tokens=n, drafter=drafter, max_draft_tokens=5)
    out = [t for step in engine.generate_tokens(prompt, config, stats) for t in step.tokens]
    return out, stats


def test_identical_draft_model_is_always_accepted_and_output_is_exact():
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    twin = Engine(tiny_model("llama", seed=1), tokenizer=None)       # same weights: drafts are the target's
    prompt = [random.Random(0).randrange(101) for _ in range(12)]
    plain, _ = generate(target, prompt, None)
    spec, stats = generate(target, prompt, DraftModelDrafter(twin, min_confidence=0.0))
    assert spec == plain
    assert stats.accepted == stats.drafted > 0        # greedy chains of the same model: nothing rejected
    assert stats.mean_accepted > 4


@pytest.mark.parametrize("seed", range(4))
def test_other_draft_model_changes_speed_not_output(seed):
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    drafter = DraftModelDrafter(Engine(tiny_model("llama", seed=7), tokenizer=None))
    rng = random.Random(seed)
    for _ in range(3):   # one drafter over several prompts: its cache restarts with each
        prompt = [rng.randrange(101) for _ in range(rng.randint(3, 20))]
        plain, _ = generate(target, prompt, None)
        spec, stats = generate(target, prompt, drafter)
        assert spec == plain
        assert stats.drafted > 0


def test_draft_model_needs_a_model_and_a_compatible_vocabulary():
    with pytest.raises(InvalidArgumentError, match="needs a model"):
        make_drafter("draft-model")
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    big = Engine(tiny_model("llama", seed=1, vocab_size=200), tokenizer=None)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        generate(target, [1, 2, 3], DraftModelDrafter(big))
    with pytest.raises(InvalidArgumentError, match="rescore_top must be >= 0"):
        make_drafter("quantized-self:rescore_top=-1")
    with pytest.raises(InvalidArgumentError, match="guess_len must be >= 0"):
        make_drafter("quantized-self:guess_len=-1")


def test_min_confidence_cuts_chains_short():
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    draft = Engine(tiny_model("llama", seed=7), tokenizer=None)
    prompt = list(range(3, 15))
    plain, _ = generate(target, prompt, None)
    full, full_stats = generate(target, prompt, DraftModelDrafter(draft, min_confidence=0.0))
    cut, cut_stats = generate(target, prompt, DraftModelDrafter(draft, min_confidence=0.99))
    assert full == cut == plain
    assert cut_stats.drafted < full_stats.drafted
    with pytest.raises(InvalidArgumentError):
        DraftModelDrafter(draft, min_confidence=1.0)


def test_max_len_caps_the_chain():
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    twin = Engine(tiny_model("llama", seed=1), tokenizer=None)
    prompt = [random.Random(2).randrange(101) for _ in range(12)]
    plain, _ = generate(target, prompt, None)
    drafter = DraftModelDrafter(twin, min_confidence=0.0, max_len=2)
    spec, stats = generate(target, prompt, drafter)
    assert spec == plain
    assert stats.drafted == stats.accepted > 0 and 2 < stats.mean_accepted <= 3   # chains of 2, all accepted
    assert len(drafter.propose(prompt, 5)) == 2
    with pytest.raises(InvalidArgumentError):
        DraftModelDrafter(twin, max_len=-1)


def test_short_draft_context_is_still_exact():
    """The draft model reads only the prompt's last tokens: drafts change, the output does not."""
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    twin = Engine(tiny_model("llama", seed=1), tokenizer=None)
    prompt = [random.Random(5).randrange(101) for _ in range(60)]
    plain, _ = generate(target, prompt, None)
    spec, stats = generate(target, prompt, DraftModelDrafter(twin, min_confidence=0.0, context=8))
    assert spec == plain and stats.accepted > 0


def bf16_engine(arch: str = "llama", seed: int = 1) -> Engine:
    from tachy.models.quant import convert_weights

    return Engine(convert_weights(tiny_model(arch, seed=seed), "bf16"), tokenizer=None, name="tiny")


def test_quantized_copy_is_int4_shares_a_bf16_embedding_and_leaves_the_target_alone():
    import torch

    from tachy.models.quant import Int4Linear, Int8Linear, quantized_copy

    target = bf16_engine()
    tokens, positions = torch.tensor([[3, 5, 7, 9]]), torch.arange(4)
    before = target.model(tokens, positions, target.model.new_cache())
    copy = quantized_copy(target.model, "int4")
    linears = [m for m in copy.modules() if isinstance(m, (Int4Linear, Int8Linear, torch.nn.Linear))]
    assert linears and all(isinstance(m, (Int4Linear, Int8Linear)) for m in linears)
    assert copy.embed_tokens.weight is target.model.embed_tokens.weight          # shared, not copied
    assert isinstance(target.model.layers[0].mlp.down_proj, torch.nn.Linear)     # the target keeps its layers
    assert torch.equal(target.model(tokens, positions, target.model.new_cache()), before)
    drafted = copy(tokens, positions, copy.new_cache())
    assert (drafted.argmax(-1) == before.argmax(-1)).float().mean() >= 0.75     # a close copy of the target


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_quantized_self_drafts_over_the_target_cache_and_is_exact(arch):
    target = bf16_engine(arch)
    drafter = make_drafter("quantized-self", min_match_len=50)   # no suffix matches: every draft is the copy's
    rng = random.Random(3)
    accepted = 0
    for _ in range(4):
        prompt = [rng.randrange(101) for _ in range(rng.randint(5, 40))]
        plain, _ = generate(target, prompt, None)
        spec, stats = generate(target, prompt, drafter)
        assert spec == plain
        accepted += stats.accepted
        # it read the target's cache: no cache of its own was filled
        assert drafter.draft_model.target_cache is not None and drafter.draft_model.cached == []
        # the copy's forwards are timed apart from the drafting logic, per sequence
        assert 0 < stats.draft_model_s <= stats.draft_s
        assert stats.draft_model_s == drafter.model_s == drafter.draft_model.model_s
    assert accepted > 0
    _, stats = generate(target, prompt, make_drafter("model-free"))
    assert stats.draft_s > 0 and stats.draft_model_s == 0.0


def test_quantized_self_keeps_its_own_cache_under_a_press():
    target = bf16_engine()
    drafter = make_drafter("quantized-self", min_match_len=50)
    prompt = [random.Random(4).randrange(101) for _ in range(90)]
    config = GenerationConfig(max_new_tokens=20, drafter=drafter, max_draft_tokens=5, press="streaming_llm",
                              compression_ratio=0.5)
    plain = [t for s in target.generate_tokens(prompt, GenerationConfig(
        max_new_tokens=20, drafter=None, press="streaming_llm", compression_ratio=0.5)) for t in s.tokens]
    spec = [t for s in target.generate_tokens(prompt, config) for t in s.tokens]
    assert spec == plain
    assert drafter.draft_model.target_cache is None and drafter.draft_model.cached   # K/V mean other slots


def test_default_drafts_with_the_int4_copy_on_a_float_cpu_target_and_model_free_otherwise():
    from tachy.models.quant import convert_weights
    from tachy.speculative.drafters import DefaultDrafter, ModelFreeDrafter, QuantizedSelfDrafter

    target = bf16_engine()
    d = make_drafter("default")
    assert isinstance(d, DefaultDrafter) and isinstance(d.inner, ModelFreeDrafter) and d.needs_logits
    d.check_target(target)
    assert isinstance(d.inner, QuantizedSelfDrafter) and not d.needs_logits
    other = make_drafter("default")
    other.check_target(target)
    assert other.inner.draft_model.engine is d.inner.draft_model.engine       # one int4 copy per target
    int4_target = Engine(convert_weights(tiny_model("llama", seed=1), "int4"), tokenizer=None)
    d = make_drafter("default")
    d.check_target(int4_target)
    assert isinstance(d.inner, ModelFreeDrafter)


def test_default_is_the_suffix_automaton_alone_on_gguf_blocks_through_the_c_forward(smollm):
    """Measured (docs/benchmarks.md section 3): there Token Recycling's fallback drafts cost more than they
    save; on bf16 weights, whose C forward steps cost ~8x more, they pay (model-free stays). The C forward
    runs GGUF blocks on AVX-512 and AVX2 CPUs, bf16 weights on AVX512-BF16 ones only."""
    from tachy.speculative.drafters import ModelFreeDrafter, QuantizedSelfDrafter

    if smollm.model.cpu_forward is None:
        pytest.skip("the C forward does not run on this machine")
    d = make_drafter("default")
    d.check_target(smollm)
    assert isinstance(d.inner, SuffixAutomatonDrafter) and d.inner.min_match_len == 1 and not d.needs_logits
    d = make_drafter("default", min_match_len=3)
    d.check_target(smollm)
    assert isinstance(d.inner, SuffixAutomatonDrafter) and d.inner.min_match_len == 3
    bf16 = tachy.load("smollm2-135m", dtype="bf16", progress=False)
    d = make_drafter("default")
    d.check_target(bf16)
    if kernels.has_avx512_bf16():   # bf16 weights through the C forward
        assert bf16.model.cpu_forward is not None and isinstance(d.inner, ModelFreeDrafter)
    else:   # AVX2: the C forward takes GGUF blocks only; bf16 weights stay on PyTorch, with the int4 copy
        assert bf16.model.cpu_forward is None and isinstance(d.inner, QuantizedSelfDrafter)


def test_a_prediction_in_front_of_quantized_self_still_shares_the_target_cache():
    from tachy.speculative.drafters import prediction_drafter

    target = bf16_engine()
    inner = make_drafter("quantized-self", min_match_len=50)
    prompt = [random.Random(6).randrange(101) for _ in range(30)]
    plain, _ = generate(target, prompt, None)
    spec, stats = generate(target, prompt, prediction_drafter([7, 8, 9, 10], inner))
    assert spec == plain and stats.accepted > 0
    assert inner.draft_model.target_cache is not None and inner.draft_model.cached == []


class CountingCache:
    """Stands in for a KV cache in the chain logic: only its length matters there."""
    length = 0

    def rollback(self, n: int) -> None:
        self.length -= n


def test_guessed_continuations_give_the_same_chain_in_fewer_forwards():
    """With ``guess_len`` the draft model checks what followed the chain's match in the context, a few tokens
    per forward, and keeps only the guesses it would have chosen itself: the chain is the one it drafts token
    by token, the cache holds exactly the fed tokens, and copied text costs fewer forwards."""
    successor = {t: (7 * t + 3) % 50 for t in range(50)}     # the 'draft model': one sure next token each

    def chain(history: list[int], guess_len: int) -> tuple[list[int], int, int]:
        drafter = DraftModelDrafter("self", guess_len=guess_len, max_len=12, min_confidence=0.1)
        drafter.guesses = SuffixAutomatonDrafter(min_match_len=8)
        drafter.guesses.reset(history)
        forwards = []

        def forward(tokens, cache, every_row=False):
            forwards.append(len(tokens))
            cache.length += len(tokens)
            rows = torch.full((len(tokens), 50), -10.0)
            rows[torch.arange(len(tokens)), [successor[t] for t in tokens]] = 10.0
            return rows if every_row else rows[-1]

        drafter._forward = forward
        cache = CountingCache()
        tokens = drafter._chain([history[-1]], cache, 12).tokens
        return tokens, len(forwards), cache.length

    walk = [1]
    for _ in range(40):
        walk.append(successor[walk[-1]])
    history = walk[:20] + [49] + walk[21:30] + [0, 1]   # the model's own text, with a wrong token inside it
    plain, plain_forwards, plain_cached = chain(history, 0)
    guessed, guessed_forwards, guessed_cached = chain(history, 3)
    assert guessed == plain and len(plain) == 12
    assert plain_forwards == 12 and guessed_forwards < 8
    # the cache holds the root and the chain but its last token (and that one too when a guess ended the chain),
    # never a rejected guess
    assert plain_cached == 12 and guessed_cached in (12, 13)


def test_the_int4_self_draft_refuses_a_target_that_runs_gguf_blocks():
    from tests.conftest import tiny_gguf_model

    engine = Engine(tiny_gguf_model("llama"), tokenizer=None, name="tiny-gguf", weights="gguf")
    with pytest.raises(InvalidArgumentError, match="copies float weights"):
        list(engine.generate_tokens([1, 2, 3], GenerationConfig(max_new_tokens=4, drafter="quantized-self")))


def test_svip_stops_chains_where_the_draft_model_is_unsure():
    d = DraftModelDrafter("self", svip=0.5, min_confidence=0.0)
    peaked = torch.full((100,), -20.0)
    peaked[7] = 10.0                               # entropy ~0: bound ~1, keep drafting
    flat = torch.zeros(100)                        # entropy ln 100 = 4.6 nats: bound 1 - sqrt(2.3) < 0
    assert not d._unsure(peaked, 7) and d._unsure(flat, 3)
    assert not DraftModelDrafter("self", svip=0.0, min_confidence=0.0)._unsure(flat, 3)
    with pytest.raises(InvalidArgumentError):
        DraftModelDrafter("self", svip=1.5)
