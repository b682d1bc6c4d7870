"""tachy eval ruler: samples are deterministic and fit their context in tokens, RULER scoring, the results the
CLI writes (ruler and needle, on a tiny random model with the real SmolLM2 tokenizer), and bad input.

Uses a synthetic haystack (no shared data needed) and the tokenizers of the embedded models."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest

from tachy.cli import main
from tachy.errors import InvalidArgumentError, TachyError, UnknownNameError
from tachy.eval import cli as eval_cli
from tachy.eval.ruler import build_samples
from tachy.eval.ruler_tasks import TASKS, RulerConfig, RulerPrompts
from tachy.eval.sweep import DENSE, Setting, score, settings
from tests.conftest import tiny_model


def _tokenizer(name: str):
    from tachy.models.load import load_checkpoint
    from tachy.registry import resolve_model
    from tachy.tokenizer import Tokenizer

    return Tokenizer.from_path(load_checkpoint(resolve_model(name), progress=False)[2])


@pytest.fixture(scope="module")
def smol_tok():
    return _tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def gemma_tok():
    return _tokenizer("gemma3-270m")


@pytest.fixture(scope="module")
def text() -> str:
    """Lines of pronounceable made-up lower-case words: a haystack that needs no data files."""
    rng = random.Random(0)
    words = ["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
             for _ in range(600)]
    return "\n".join(" ".join(rng.choices(words, k=rng.randint(4, 10))) for _ in range(4000))


@pytest.fixture(scope="module")
def tiny_engine(smol_tok):
    """A random 3-layer model behind the real chat tokenizer: every code path, in seconds."""
    from tachy.engine import Engine

    model = tiny_model("llama", vocab_size=smol_tok.vocab_size, max_seq_len=1024).float()
    return Engine(model, smol_tok, name="tiny")


def _engine(tok):
    return SimpleNamespace(tokenizer=tok)   # building prompts only needs the tokenizer


def test_samples_are_deterministic_for_a_seed(smol_tok, text):
    engine = _engine(smol_tok)
    a = build_samples(engine, text, [1024], list(TASKS), 2, seed=0)
    b = build_samples(engine, text, [1024], list(TASKS), 2, seed=0)
    assert [(s.ids, s.expected) for s in a] == [(s.ids, s.expected) for s in b]
    c = build_samples(engine, text, [1024], list(TASKS), 2, seed=1)
    assert all(x.ids != y.ids for x, y in zip(a, c))
    # a sample does not depend on which other tasks or contexts are asked for
    alone = build_samples(engine, text, [1024], ["vt"], 2, seed=0)
    assert [s.ids for s in alone] == [s.ids for s in a if s.task == "vt"]
    assert [s.ids for s in a if s.task == "vt"][0] != [s.ids for s in a if s.task == "vt"][1]


@pytest.mark.parametrize("tok_name", ["smol_tok", "gemma_tok"])   # chat template / plain completion
def test_prompts_fit_the_context_in_tokens_and_hold_the_answers(tok_name, text, request):
    tok = request.getfixturevalue(tok_name)
    cfg = RulerConfig()
    for s in build_samples(_engine(tok), text, [768, 1536], list(TASKS), 1, seed=3):
        budget = s.context - s.max_new_tokens
        assert budget - 8 <= len(s.ids) <= budget, (s.task, s.context, len(s.ids))
        prompt = tok.decode(s.ids)
        assert all(e in prompt for e in s.expected)
        if s.task.startswith("niah"):
            assert all(prompt.count(e) == 1 for e in s.expected)
        if s.task == "cwe":   # each common word common_freq times, the most frequent rare word far fewer
            counts = Counter(re.findall(r"[a-z]+", prompt))
            assert len(s.expected) == cfg.common_words and all(counts[w] == cfg.common_freq for w in s.expected)
            assert sorted(counts.values())[-cfg.common_words - 1] < cfg.common_freq
        if s.task == "vt":   # the asked chain, in order, each variable assigned from the one before
            assert all(f"VAR {b} = VAR {a}" in prompt for a, b in zip(s.expected, s.expected[1:]))
            assert prompt.index(f"VAR {s.expected[0]} =") < prompt.index(f"= VAR {s.expected[0]}")
        assert ("<|im_start|>assistant" in prompt) == (tok_name == "smol_tok")


def test_cwe_fills_longer_contexts_with_more_rare_words(smol_tok, text):
    prompts = RulerPrompts(_engine(smol_tok), text, 2048)
    short, long = (prompts.sample("cwe", c, 0) for c in (768, 2048))
    assert len(long.ids) > 2 * len(short.ids)


def test_scoring_is_the_fraction_of_expected_strings_found():
    assert score(["48213"], "The number is 48213.") == 1.0
    assert score(["48213"], "The number is 4821.") == 0.0
    assert score(["11111", "22222", "33333", "44444"], " 22222, 44444 and 55555") == 0.5
    assert score(["ABCDE", "FGHIJ"], "abcde and fghij") == 1.0   # case does not matter


def test_unknown_task_and_too_small_context_are_clear_errors(smol_tok, text, tiny_engine, tmp_path, monkeypatch,
                                                               capsys):
    with pytest.raises(UnknownNameError, match="unknown task 'nope'; available: niah_multikey"):
        RulerPrompts(_engine(smol_tok), text, 512).sample("nope", 512, 0)
    with pytest.raises(InvalidArgumentError, match="--context 160 is too small for task vt: its question, needles"):
        RulerPrompts(_engine(smol_tok), text, 512).sample("vt", 160, 0)
    with pytest.raises(InvalidArgumentError, match="--context 256 is too small for task cwe"):
        RulerPrompts(_engine(smol_tok), text, 512).sample("cwe", 256, 0)
    assert main(["eval", "ruler", "--tasks", "vt,nope", "--out", str(tmp_path)]) == 2   # before the model loads
    assert capsys.readouterr().err.strip() == ("error: unknown task 'nope'; available: niah_multikey, "
                                               "niah_multivalue, niah_multiquery, vt, cwe")
    monkeypatch.setattr(eval_cli, "load_engine", lambda args: tiny_engine)
    hay = tmp_path / "hay.txt"
    hay.write_text(text)
    assert main(["eval", "ruler", "--context", "128", "--haystack", str(hay), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --context 128 is too small for task niah_multikey" in err[0]


def test_settings_key_runs_by_press_ratio_and_attention():
    assert [s.label for s in settings("none", "0.5")] == ["full"]   # the dense baseline alone
    s = settings("none,snapkv", "0.5")
    assert [(x.press, x.ratio, x.attention) for x in s] == [("full", 0.0, DENSE), ("snapkv", 0.5, DENSE)]
    assert Setting("snapkv", 0.5).config(4).press is not None and Setting("none", 0.0).config(4).press is None
    with pytest.raises(TachyError, match="nope"):
        settings("snapkv", "0.5", "dense,nope")


EVERY_RUN = {"press", "ratio", "attention", "context", "accuracy", "kv_bytes", "kv_read_per_token", "prefill_s",
             "decode_tokens_per_s"}


@pytest.mark.usefixtures("one_torch_thread")
def test_ruler_and_needle_cli_write_the_result_fields(tiny_engine, text, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_cli, "load_engine", lambda args: tiny_engine)
    hay = tmp_path / "hay.txt"
    hay.write_text(text)
    out = tmp_path / "ruler"
    assert main(["eval", "ruler", "--context", "768,1000", "--samples", "1", "--press", "none,snapkv",
                 "--ratio", "0.5", "--haystack", str(hay), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["model"] == "tiny" and r["task"] == "ruler" and r["tasks"] == list(TASKS) and r["samples"] == 1
    base = r["baseline"]
    assert EVERY_RUN - {"context"} <= set(base) and base["attention"] == DENSE and base["prefill_s"] > 0
    assert [p["context"] for p in base["per_context"]] == [768, 1000]
    assert all(EVERY_RUN <= set(p) | {"press", "ratio", "attention"} and set(p["tasks"]) == set(TASKS)
               for p in base["per_context"])
    assert [(x["press"], x["ratio"], x["attention"], x["context"]) for x in r["runs"]] == [
        ("snapkv", 0.5, DENSE, 768), ("snapkv", 0.5, DENSE, 1000)]
    for run in r["runs"]:
        assert EVERY_RUN <= set(run) and set(run["tasks"]) == set(TASKS) and run["prefill_s"] > 0
        assert 0 <= run["accuracy"] <= 1 and run["kv_bytes"] < base["kv_bytes"]
        assert run["kv_read_per_token"] < base["kv_read_per_token"]                       # a press reads less
    assert len(r["answers"]) == 2 * 2 * len(TASKS)
    assert (out / "ruler.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| snapkv | 0.5 | dense | 1000 |" in md and "| vt |" in md

    out = tmp_path / "needle"
    assert main(["eval", "needle", "--context", "256", "--depths", "0.5", "--press", "streaming_llm",
                 "--ratio", "0.5", "--haystack", str(hay), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert EVERY_RUN - {"context"} <= set(r["baseline"]) and EVERY_RUN <= set(r["runs"][0])
    assert r["runs"][0]["attention"] == DENSE and r["runs"][0]["depths"].keys() == {"0.5"}
    assert (out / "needle.png").stat().st_size > 0
