"""DraftStep (the lean one-token step a draft model decodes with) against the model's own forward."""
import copy

import pytest
import torch

from tachy.models.draft_step import DraftStep
from tachy.models.quant import quantized_copy
from tests.conftest import tiny_model

ARCHS = ["llama", "qwen2", "llama3", "gemma3"]


def decode_both(model, prompt_len: int = 20, steps: int = 12):
    """Logits and caches of ``steps`` one-token steps after a prompt, by ``model(...)`` and by DraftStep."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + steps), generator=gen)
    with torch.inference_mode():
        cache = model.new_cache(capacity=16)           # small on purpose: both paths must grow it
        model(ids[:, :prompt_len], torch.arange(prompt_len), cache)
        twin = copy.deepcopy(cache)
        step = DraftStep(model)
        ours, ref = [], []
        for t in range(prompt_len, prompt_len + steps):
            ref.append(model(ids[:, t:t + 1], torch.tensor([t]), cache)[0, -1])
            ours.append(step(int(ids[0, t]), twin))
    return torch.stack(ours), torch.stack(ref), twin, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_float_model_matches_forward(arch):
    """In float32 the lean step computes the same function: logits, and the K/V it writes (past gemma3's
    sliding window of 8, so local layers read only their window). DraftStep's norms drop the epsilon, so the
    model here has none either."""
    model = tiny_model(arch, norm_eps=0.0)
    ours, ref, twin, cache = decode_both(model)
    assert twin.length == cache.length and twin.position == cache.position
    assert (ours - ref).abs().max() < 1e-4
    n = cache.length
    assert (twin.k[..., :n, :] - cache.k[..., :n, :]).abs().max() < 1e-5
    assert (twin.v[..., :n, :] - cache.v[..., :n, :]).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_int4_copy_agrees_with_its_forward(arch):
    """On the int4 copy (bf16 activations) the numerics differ slightly (bf16 norms and rope), so the logits
    are close, not equal; the next-token choice is what a draft needs."""
    model = quantized_copy(tiny_model(arch), "int4")
    ours, ref, _, _ = decode_both(model)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_supports_only_a_plain_growing_cache():
    model = tiny_model("llama")
    assert DraftStep.supports(model.new_cache())
    assert not DraftStep.supports(model.new_cache(fixed=True))     # exact mode: the target's own path
    assert not DraftStep.supports(model.new_cache(batch=2))


@pytest.mark.parametrize("arch", ARCHS)
def test_several_tokens_at_once_match_one_at_a_time(arch):
    """Feeding a guessed continuation in one call gives each token's logits and K/V as feeding them one by
    one (float32; gemma3's local layers, with a window of 8, mask per row inside the window)."""
    model = tiny_model(arch, norm_eps=0.0)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=gen)
    step = DraftStep(model)
    with torch.inference_mode():
        cache = model.new_cache(capacity=16)
        model(ids[:, :20], torch.arange(20), cache)
        twin = copy.deepcopy(cache)
        one_by_one = torch.stack([step(int(t), cache) for t in ids[0, 20:]])
        together = step(ids[0, 20:].tolist(), twin)
    assert together.shape == one_by_one.shape
    assert (together - one_by_one).abs().max() < 1e-4
    assert twin.length == cache.length == 30
    assert (twin.k[..., :30, :] - cache.k[..., :30, :]).abs().max() < 1e-5
