"""On the embedded model: greedy speculative decoding under sparse attention gives plain greedy decoding's
tokens under the same sparse attention (the verify rows choose the keys one-token decoding chooses), on the
C decoder and on the PyTorch forward, and the sparse output is not dense attention's."""
from __future__ import annotations

import pytest

from tachy import GenerationConfig
from tests.conftest import needs_data, DATA

ATTENTIONS = ["quest:budget=256", "tidal:budget=256"]   # ~750-token prompts: most keys are left unread


def prompt(engine) -> list[int]:
    text = (DATA / "tinyshakespeare.txt").read_text()[:3000]
    return engine.chat_prompt([{"role": "user", "content": text + "\n\nSummarize the scene above in two sentences."}])


def generate(engine, ids, n, **options) -> list[int]:
    return [t for r in engine.stream(ids, GenerationConfig(max_new_tokens=n, **options)) for t in r.token_ids]


@needs_data
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_speculative_equals_plain_greedy_under_sparse_attention(smollm, attention):
    ids = prompt(smollm)
    plain = generate(smollm, ids, 48, drafter=None, attention=attention)
    for drafter in ("default", "pld"):
        assert generate(smollm, ids, 48, drafter=drafter, attention=attention) == plain, drafter
    assert len(plain) > 20 and plain != generate(smollm, ids, 48, drafter=None)


@needs_data
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_speculative_equals_plain_greedy_under_quest_on_the_pytorch_forward(smollm_torch):
    ids = prompt(smollm_torch)
    plain = generate(smollm_torch, ids, 24, drafter=None, attention="quest:budget=256")
    assert generate(smollm_torch, ids, 24, drafter="pld", attention="quest:budget=256") == plain
