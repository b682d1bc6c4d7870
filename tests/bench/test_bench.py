"""`tachy bench`: prompt files (both id layouts, multi-turn, line-numbered errors), the category spread, and
one small end-to-end run checking the results.json contract (DESIGN.md) and the report files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tachy
from tachy.bench.prompts import Prompt, load_prompts, spread
from tachy.cli import main
from tachy.errors import TachyError
from tachy.speculative.drafters import available_drafters


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- prompt files


def test_load_prompts_both_id_layouts_and_multi_turn(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "a-1", "category": "writing", "turns": ["Write a haiku."]},
        {"question_id": 81, "category": "writing", "turns": ["Plan a trip.", "Now shorten it."]},
        "",   # blank lines are skipped
        {"id": 7, "question_id": 99, "turns": ["No category here."], "reference": ["ignored"]},
    ])
    prompts = load_prompts(f)
    assert prompts == [Prompt("a-1", "writing", ["Write a haiku."]),
                       Prompt("81", "writing", ["Plan a trip.", "Now shorten it."]),
                       Prompt("7", "uncategorized", ["No category here."])]   # `id` wins over question_id
    assert load_prompts(str(f)) == prompts


def test_load_prompts_real_files():
    from tests.conftest import DATA as data
    if not (data / "vicuna_bench.jsonl").is_file():
        pytest.skip("development data not available")
    vicuna = load_prompts(data / "vicuna_bench.jsonl")
    assert len(vicuna) == 78 and len({p.category for p in vicuna}) == 9


@pytest.mark.parametrize("lines, lineno, fragment", [
    ([{"id": 1, "turns": ["a"]}, {"id": 2, "turns": ["b"]}, '{"id": 3, "turns": ["c"'], 3, "not valid JSON"),
    ([{"id": 1, "turns": ["a"]}, {"id": 2, "category": "x"}], 2, "turns"),
    ([{"id": 1, "turns": []}], 1, "turns"),
    ([{"id": 1, "turns": ["ok", ""]}], 1, "turns"),
    ([{"id": 1, "turns": "not a list"}], 1, "turns"),
    ([{"category": "x", "turns": ["a"]}], 1, "id"),
    ([{"id": 1, "turns": ["a"]}, '["a", "list"]'], 2, "JSON object"),
    ([{"id": 1, "turns": ["a"]}, {"id": 2, "turns": ["caf\udce9"]}], 2, "lone surrogate"),
])
def test_malformed_prompt_files_name_file_and_line(tmp_path, lines, lineno, fragment):
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TachyError) as e:
        load_prompts(f)
    assert f"{f}:{lineno}" in str(e.value) and fragment in str(e.value)


def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path):
    """A file saved as Latin-1 had ended `tachy bench` with a UnicodeDecodeError traceback."""
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"id": 1, "turns": ["ok"]}\n{"id": 2, "turns": ["caf\xe9"]}\n')
    with pytest.raises(TachyError, match=f"{f}:2: not UTF-8 text"):
        load_prompts(f)


def test_empty_and_missing_prompt_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TachyError, match="no prompts") as e:
        load_prompts(empty)
    assert str(empty) in str(e.value)
    with pytest.raises(TachyError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


def P(pid: str, cat: str) -> Prompt:
    return Prompt(pid, cat, ["q"])


def test_spread_round_robin_over_categories():
    prompts = [P("a1", "a"), P("a2", "a"), P("a3", "a"), P("b1", "b"), P("c1", "c"), P("c2", "c")]
    ids = lambda ps: [p.id for p in ps]   # noqa: E731
    assert ids(spread(prompts, 3)) == ["a1", "b1", "c1"]
    assert ids(spread(prompts, 5)) == ["a1", "b1", "c1", "a2", "c2"]   # b is used up: skipped
    assert ids(spread(prompts, 1)) == ["a1"]
    assert spread(prompts, None) == prompts and spread(prompts, 6) == prompts and spread(prompts, 60) == prompts
    with pytest.raises(TachyError, match="limit"):
        spread(prompts, 0)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def cached_load(smollm, monkeypatch):
    """The bench CLI loads the default model; hand it the session's engine instead of loading again."""
    monkeypatch.setattr(tachy, "load", lambda name_or_path=None, **kw: smollm)
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # small shared CPU: no thread-pool spinning
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bench_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write one sentence about cats.", "Now repeat it."]},
        {"id": "w2", "category": "writing", "turns": ["Write one sentence about dogs."]},
        {"id": "c1", "category": "coding", "turns": ["Write a Python function that adds two numbers."]},
    ])


@pytest.mark.slow
def test_bench_end_to_end(cached_load, bench_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--prompts", str(bench_file), "--limit", "2", "--methods", "vanilla,pld",
               "--max-new-tokens", "16", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    # the DESIGN.md contract (extra keys are allowed)
    assert {"model", "device", "max_new_tokens", "prompts", "methods"} <= set(results)
    assert isinstance(results["model"], str) and isinstance(results["device"], str)
    assert results["max_new_tokens"] == 16 and results["prompts"] == 2
    assert results["dtype"] == "gguf"   # the weight format; had read "float32" (the norms' dtype)
    assert set(results["methods"]) == {"vanilla", "pld"}
    for name, m in results["methods"].items():
        assert {"tokens_per_s", "speedup", "mean_accepted", "identical", "per_category"} <= set(m), name
        assert isinstance(m["identical"], bool)
        for key in ("tokens_per_s", "speedup", "mean_accepted"):
            assert isinstance(m[key], float) and m[key] > 0, (name, key)
        assert m["mean_accepted"] >= 1.0
        assert set(m["per_category"]) == {"writing", "coding"}   # --limit 2 takes one of each
        for cat, c in m["per_category"].items():
            assert set(c) >= {"speedup", "mean_accepted"} and c["speedup"] > 0 and c["mean_accepted"] >= 1.0
    assert results["methods"]["pld"]["identical"] is True
    assert results["methods"]["vanilla"]["identical"] is True
    assert results["methods"]["vanilla"]["speedup"] == pytest.approx(1.0)
    assert results["methods"]["vanilla"]["mean_accepted"] == pytest.approx(1.0)
    for m in results["methods"].values():   # pld has no draft model: its drafter time is all drafting logic
        assert m["draft_model_time_share"] == 0.0 <= m["draft_time_share"]
    md = (out / "results.md").read_text()
    assert "| pld |" in md and "| vanilla |" in md and md in stdout
    assert "| drafter time | of which draft model |" in md
    assert md.startswith("Model `smollm2-135m` (gguf weights) on cpu")
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_report_names_its_command(cached_load, bench_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--prompts", str(bench_file), "--limit", "1", "--methods", "vanilla",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert f"--prompts {bench_file}" in (out / "results.md").read_text()


@pytest.mark.slow
def test_bench_unknown_method(bench_file, tmp_path, capsys, monkeypatch, smollm):
    monkeypatch.setattr(tachy, "load", lambda name_or_path=None, **kw: smollm)
    rc = main(["bench", "--prompts", str(bench_file), "--methods", "vanilla,warp-drive", "--out",
               str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "warp-drive" in line and "vanilla" in line
    for name in available_drafters():
        assert name in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--limit", "0"], "limit"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--methods", ","], "methods"),
])
def test_bench_bad_options(bench_file, tmp_path, capsys, monkeypatch, args, fragment):
    monkeypatch.setattr(tachy, "load", lambda *a, **k: pytest.fail("loaded a model for a bad option"))
    rc = main(["bench", "--prompts", str(bench_file), *args, "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    assert fragment in next(line for line in err.splitlines() if line.startswith("error:"))


def test_bench_malformed_prompt_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tachy, "load", lambda *a, **k: pytest.fail("loaded a model for a bad prompt file"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "turns": ["a"]}, "{oops"])
    rc = main(["bench", "--prompts", str(bad), "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2 and f"{bad}:2" in err and "Traceback" not in err


def test_split_methods_keeps_drafter_options_together():
    from tachy.bench.cli import split_methods

    assert split_methods("vanilla, default,,pld") == ["vanilla", "default", "pld"]
    assert split_methods("vanilla,draft-model:model=smollm2-135m,dtype=int8,default") == [
        "vanilla", "draft-model:model=smollm2-135m,dtype=int8", "default"]
