"""PIE (tachy.context.pie): exact where nothing is approximated, re-rotation is a rotation, edits re-encode
only what changed."""
from __future__ import annotations

import random

import pytest
import torch

from tachy.context import pie_prefill, rerotate
from tachy.context.pie import reuse_plan
from tachy.errors import InvalidArgumentError
from tachy.models.llama import Rope, apply_rope
from tests.test_prefix_cache import packed_engine


def prefilled(engine, ids):
    cache = engine.model.new_cache(capacity=engine.cache_capacity(len(ids), 256), fixed=True)
    return cache, engine._prefill(ids, cache)


def test_rerotating_a_key_moves_it_to_the_new_position():
    rope = Rope(64, 4096, 10000.0)
    k = torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([3, 10, 100, 1000, 2000])
    cos, sin = rope(positions)
    for delta in (7, -3, 1500):
        moved = rerotate(apply_rope(k, cos, sin), rope, delta)
        direct = apply_rope(k, *rope(positions + delta))
        assert torch.allclose(moved, direct, atol=2e-3)   # float32 angles of ~3500 rad: ~2e-4 rad apart


def test_the_plan_reuses_shared_runs_and_encodes_edits_and_the_last_token():
    old = list(range(100))
    new = old[:40] + [500, 501] + old[43:]       # token 40..42 replaced by two new ones: later ones shift by -1
    plan = reuse_plan(old, new)
    assert plan[:40] == list(range(40))
    assert plan[40:42] == [None, None]
    assert plan[42:-1] == list(range(43, 99))
    assert plan[-1] is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_no_edit_and_an_appended_tail_equal_the_cold_prefill(arch):
    engine = packed_engine(arch, seed=7)
    rng = random.Random(3)
    old = [rng.randrange(4, engine.config.vocab_size) for _ in range(150)]
    old_cache, _ = prefilled(engine, old)
    for new in (old, old + [rng.randrange(4, 60) for _ in range(9)]):
        result = pie_prefill(engine, old, old_cache, new)
        cold_cache, cold = prefilled(engine, new)
        assert torch.equal(result.logits, cold)
        n = len(new)
        assert torch.equal(result.cache.k[:, :, :, :n], cold_cache.k[:, :, :, :n])
        assert result.reencoded == max(1, len(new) - len(old)) and result.shifted == 0


def test_an_edit_re_encodes_only_the_edited_tokens():
    engine = packed_engine("llama", seed=8)
    rng = random.Random(4)
    old = [rng.randrange(4, engine.config.vocab_size) for _ in range(300)]
    old_cache, _ = prefilled(engine, old)
    new = old[:120] + [7, 8, 9, 10] + old[121:]
    result = pie_prefill(engine, old, old_cache, new)
    assert result.reencoded == 5                 # four edited tokens and the last one
    assert result.reused == len(new) - 5 and result.shifted == len(new) - 124 - 1
    assert result.cache.length == len(new)
    # tokens before the edit keep their exact K/V; the shifted ones carry re-rotated keys (values untouched)
    assert torch.equal(result.cache.k[:, :, :, :120], old_cache.k[:, :, :, :120])
    assert torch.equal(result.cache.v[:, :, :, 124:len(new) - 1], old_cache.v[:, :, :, 121:len(old) - 1])
    cold_cache, cold = prefilled(engine, new)
    assert torch.equal(result.cache.k[:, :, :, 120:124], cold_cache.k[:, :, :, 120:124])


def test_an_old_cache_that_misses_tokens_is_refused():
    engine = packed_engine("llama", seed=9)
    old = list(range(10, 60))
    cache, _ = prefilled(engine, old[:30])
    with pytest.raises(InvalidArgumentError, match="old cache"):
        pie_prefill(engine, old, cache, old + [5])


def test_the_plan_matches_difflib_on_random_edits():
    """The head/tail shortcut finds the same reuse as a full diff would (where the full diff is unambiguous:
    distinct tokens), for edits anywhere, including none, at either end, and several."""
    from difflib import SequenceMatcher

    rng = random.Random(11)
    for _ in range(200):
        old = rng.sample(range(10_000), rng.randint(1, 60))
        new = list(old)
        for _ in range(rng.randint(0, 3)):
            at = rng.randint(0, len(new))
            new[at:at + rng.randint(0, 3)] = [20_000 + rng.randrange(1000) for _ in range(rng.randint(0, 3))]
        if not new:
            continue
        expected = [None] * len(new)
        for tag, i1, _, j1, j2 in SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
            if tag == "equal":
                expected[j1:j2] = range(i1, i1 + j2 - j1)
        expected[-1] = None
        assert reuse_plan(old, new) == expected
