"""tachy eval: sweep parsing and bad input (fast), and a real-model smoke run of both tasks (slow, < 60 s)."""
from __future__ import annotations

import json

import pytest

from tachy.cli import main
from tachy.errors import InvalidArgumentError, UnknownNameError
from tachy.eval.sweep import settings
from tachy.presses import available_presses
from tests.conftest import needs_data


def test_settings_sweep_every_press_and_ratio_after_the_baseline():
    s = settings("snapkv,streaming_llm", "0.25,0.5")
    assert [x.label for x in s] == ["full", "snapkv@0.25", "snapkv@0.5", "streaming_llm@0.25",
                                    "streaming_llm@0.5"]
    assert [x.label for x in settings("kivi4,snapkv+kivi2", "0.5")] == ["full", "kivi4@0", "snapkv+kivi2@0.5"]
    assert len(settings("all", "0.5")) == 1 + len(available_presses())


def test_settings_reject_unknown_presses_and_bad_ratios():
    with pytest.raises(UnknownNameError, match="snapkv"):
        settings("snapkv,nope", "0.5")
    with pytest.raises(InvalidArgumentError):
        settings("snapkv", "0.5,1.0")
    with pytest.raises(InvalidArgumentError):
        settings("snapkv", "half")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "needle", "--press", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown press 'nope'; available:")
    assert main(["eval", "ppl", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "missing.txt not found" in capsys.readouterr().err



def test_a_text_shorter_than_the_context_is_a_one_line_error(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    assert main(["eval", "ppl", "--text", str(text), "--context", "256", "--tokens", "32",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: the text has only 6 tokens; 288 needed (the largest --context plus --tokens): pass a longer "
        "text or a smaller --context"]

@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@needs_data
def test_needle_and_ppl_smoke_on_the_real_model(tmp_path):
    out = tmp_path / "needle"
    assert main(["eval", "needle", "--context", "384", "--depths", "0.5", "--press", "snapkv,kivi4",
                 "--ratio", "0.5", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["model"] == "smollm2-135m" and r["baseline"]["accuracy"] == 1.0   # the full cache finds it
    assert [(x["press"], x["ratio"], x["context"]) for x in r["runs"]] == [("snapkv", 0.5, 384), ("kivi4", 0.0, 384)]
    snap = r["runs"][0]
    assert abs(snap["kv_bytes"] * 2 - r["baseline"]["kv_bytes"]) <= r["baseline"]["kv_bytes"] * 0.01
    assert (out / "needle.png").stat().st_size > 0 and "| snapkv | 0.5 |" in (out / "results.md").read_text()

    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--context", "256", "--tokens", "32", "--windows", "1", "--press", "streaming_llm",
                 "--ratio", "0.5", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert 1 < r["baseline"]["ppl"] < 1000 and r["runs"][0]["ppl"] != r["baseline"]["ppl"]
    assert (out / "ppl.png").stat().st_size > 0


def test_settings_run_every_press_under_every_attention():
    assert [x.label for x in settings("none", "0.5", "quest:budget=2048,dense_layers=2,tidal:budget=512")] == \
        ["full", "none/quest:budget=2048,dense_layers=2", "none/tidal:budget=512"]
    s = settings("snapkv", "0.5", "dense,quest")
    assert [(x.label, x.attention) for x in s] == [("full", "dense"), ("snapkv@0.5", "dense"),
                                                   ("snapkv@0.5/quest", "quest")]
    with pytest.raises(UnknownNameError, match="unknown attention 'nope'"):
        settings("none", "0.5", "quest,nope")


def test_cli_rejects_an_unknown_attention_in_one_line(tmp_path, capsys):
    assert main(["eval", "needle", "--press", "none", "--attention", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown attention 'nope'" in err[0]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@needs_data
def test_needle_and_ppl_under_sparse_attention_on_the_real_model(tmp_path):
    out = tmp_path / "needle"
    assert main(["eval", "needle", "--context", "640", "--depths", "0.5", "--press", "none",
                 "--attention", "quest:budget=256", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["baseline"]["attention"] == "dense" and r["baseline"]["per_context"][0]["prefill_s"] > 0
    run = r["runs"][0]
    assert (run["press"], run["attention"], run["context"]) == ("none", "quest:budget=256", 640)
    assert run["kv_bytes"] == r["baseline"]["kv_bytes"]   # sparse attention keeps every key
    assert "| none | 0 | quest:budget=256 |" in (out / "results.md").read_text()

    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--context", "512", "--tokens", "16", "--windows", "1", "--press", "none",
                 "--attention", "quest:budget=160", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["runs"][0]["attention"] == "quest:budget=160" and r["runs"][0]["ppl"] != r["baseline"]["ppl"]
    assert abs(r["runs"][0]["ppl"] / r["baseline"]["ppl"] - 1) < 0.5
    assert "| none | 0 | quest:budget=160 |" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@needs_data
def test_settings_that_prefill_densely_share_one_prefill_and_answer_as_alone(smollm):
    """The baseline's prefill is reused by decode-time attentions (through the prefix cache), which then answer
    exactly as they do with a prefill of their own; a press still prefills itself."""
    from tachy.eval.sweep import DEFAULT_HAYSTACK, answer, answer_settings

    ids = smollm.tokenizer.encode(DEFAULT_HAYSTACK.read_text()[:3000])[:600]
    sweep = settings("none,snapkv", "0.5", "dense,quest:budget=160,tidal:budget=160")
    assert [s.prefills_densely for s in sweep] == [True, False, True, False, True, False]
    smollm.prefix_cache.clear()
    shared = answer_settings(smollm, ids, sweep, 6)
    alone = []
    for s in sweep:
        smollm.prefix_cache.clear()
        alone.append(answer(smollm, ids, s, 6))
    assert [a.tokens for a in shared] == [a.tokens for a in alone]
    assert shared[0].stats.cached_tokens == 0 and shared[2].stats.cached_tokens >= 512
    assert shared[2].stats.prefill_s == shared[4].stats.prefill_s == shared[0].stats.prefill_s
    assert shared[1].stats.cached_tokens == 0 and shared[1].stats.prefill_s != shared[0].stats.prefill_s
    assert smollm.prefix_cache.blocks == 0   # nothing carried to the next prompt
