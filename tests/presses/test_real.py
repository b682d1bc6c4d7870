"""On the real model (bf16): greedy speculative decoding stays token-identical to plain greedy decoding over a
compressed cache, and `tachy generate --press` rejects bad input before loading anything."""
from __future__ import annotations

import pytest

from tachy import GenerationConfig
from tachy.cli import main
from tests.conftest import DATA


def test_generate_rejects_unknown_press_and_bad_ratio(capsys):
    assert main(["generate", "hi", "--press", "nope", "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown press 'nope'; available:" in err and "snapkv" in err and "razor" in err
    assert main(["generate", "hi", "--press", "snapkv", "--ratio", "1.0"]) == 2
    assert "compression_ratio must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("press", ["snapkv", "razor", "snapkv+kivi4"])
def test_speculative_equals_plain_greedy_under_a_press_in_bf16(smollm, press):
    path = DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    text = path.read_text()[:2500]
    messages = [{"role": "user", "content": text + "\n\nSummarize the scene above in two sentences."}]
    ids = smollm.chat_prompt(messages)
    outs = {}
    for drafter in (None, "default"):
        config = GenerationConfig(max_new_tokens=40, drafter=drafter, press=press, compression_ratio=0.5)
        outs[drafter] = [t for r in smollm.stream(ids, config) for t in r.token_ids]
    assert outs[None] == outs["default"] and len(outs[None]) > 10
