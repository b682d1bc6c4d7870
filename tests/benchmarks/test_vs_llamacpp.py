"""benchmarks/vs_llamacpp.py's summary without llama.cpp: speeds without the looping prompts are their own."""
from __future__ import annotations

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("vs_llamacpp")


def row(prompt_id: str, llama_s: float, plain_s: float, default_s: float, looping: bool) -> dict:
    tokens = [1, 2, 3]
    engines = {name: {"tokens": tokens, "seconds": s, "prefill_s": 0.01}
               for name, s in (("llama.cpp", llama_s), ("tachy plain", plain_s), ("tachy default", default_s))}
    return {"id": prompt_id, "category": "c", "prompt_tokens": 10, "engines": engines, "looping": looping}


def test_speeds_without_the_looping_prompts(script):
    rows = [row("a", 3.0, 1.0, 1.0, False), row("b", 3.0, 1.0, 0.1, True), row("c", 2.0, 1.0, 0.9, False)]
    summary = script.summarize(rows, ["llama.cpp", "tachy plain", "tachy default"], n=4)
    assert summary["looping_prompts"] == ["b"]
    default = summary["engines"]["tachy default"]
    assert default["vs_llama_cpp"] == pytest.approx(8.0 / 2.0)
    assert default["vs_llama_cpp_without_loops"] == pytest.approx(5.0 / 1.9)   # prompt b left out
    assert summary["engines"]["tachy plain"]["vs_llama_cpp_without_loops"] == pytest.approx(5.0 / 2.0)
    everything_loops = script.summarize([row("b", 3.0, 1.0, 0.1, True)], ["llama.cpp", "tachy plain"], n=4)
    assert everything_loops["engines"]["tachy plain"]["vs_llama_cpp_without_loops"] is None
    summary["prompts"] = rows
    text = script.report({"model": "m", "file": "f.gguf", "threads": 2, "max_new_tokens": 4, "llama_cpp": "0",
                          "memory_bandwidth_gbs": 10.0, "weight_bytes": {"gguf": 1e8, "bf16": 2e8},
                          "sets": {"dev": summary}})
    assert "loops on 1" in text and "| tachy default | 6.0 | 4.00x | 2.63x |" in text
