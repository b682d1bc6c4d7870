"""Predicted Outputs: drafts from the caller's expected text; the output stays exactly the model's."""
from __future__ import annotations

import random

import pytest

from tachy import Engine, GenerationConfig
from tachy.speculative.drafters import prediction_drafter
from tests.conftest import tiny_model


def test_prediction_drafter_copies_after_a_match():
    d = prediction_drafter([5, 6, 7, 8, 9])
    d.reset([1, 2])
    assert d.propose([1, 2, 6, 7], max_tokens=2).tokens == [8, 9]
    assert d.propose([1, 2, 3], max_tokens=4).tokens == []  # no match of >= 2 tokens, no fallback


def test_generation_with_any_prediction_is_lossless_tiny_model():
    """Right, partly right and wrong predictions all give plain greedy's tokens; a right one is accepted."""
    engine = Engine(tiny_model("llama", seed=3), tokenizer=None, name="tiny")
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    for trial in range(4):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(4, 20))]
        plain = [t for s in engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=40, drafter=None))
                 for t in s.tokens]
        edited = plain[:10] + [rng.randrange(vocab) for _ in range(3)] + plain[10:]
        for prediction, drafter in ((plain, None), (edited, "default"), (prompt[::-1] * 3, "default")):
            steps = list(engine.generate_tokens(
                prompt, GenerationConfig(max_new_tokens=40, drafter=drafter, prediction=prediction)))
            assert [t for s in steps for t in s.tokens] == plain
            if prediction is plain:
                assert sum(s.accepted for s in steps) >= 30  # the whole answer was predicted


@pytest.mark.slow
def test_prediction_is_lossless_on_a_code_edit(smollm, one_torch_thread):
    code = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
    ids = smollm.chat_prompt([{"role": "user", "content": f"Rename add to plus. Return the whole code.\n\n{code}"}])
    outputs = []
    for prediction in (None, code, "something else entirely"):
        pieces = list(smollm.stream(ids, GenerationConfig(max_new_tokens=48, temperature=0.0,
                                                           prediction=prediction)))
        outputs.append([t for p in pieces for t in p.token_ids])
    assert outputs[0] == outputs[1] == outputs[2]


def test_docstring_example():
    import doctest

    from tachy.speculative.drafters import prediction

    assert doctest.testmod(prediction).failed == 0
