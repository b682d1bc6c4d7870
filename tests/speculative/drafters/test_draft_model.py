"""DraftModelDrafter: chains from a second model; lossless whatever the draft model says."""
from __future__ import annotations

import random

import pytest

from tachy.engine import Engine, GenerationConfig, GenerationStats
from tachy.errors import InvalidArgumentError
from tachy.speculative.drafters import DraftModelDrafter, make_drafter
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


def test_short_draft_context_is_still_exact():
    """The draft model reads only the prompt's last tokens: drafts change, the output does not."""
    target = Engine(tiny_model("llama", seed=1), tokenizer=None)
    twin = Engine(tiny_model("llama", seed=1), tokenizer=None)
    prompt = [random.Random(5).randrange(101) for _ in range(60)]
    plain, _ = generate(target, prompt, None)
    spec, stats = generate(target, prompt, DraftModelDrafter(twin, min_confidence=0.0, context=8))
    assert spec == plain and stats.accepted > 0
