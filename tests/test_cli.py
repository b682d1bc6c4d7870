"""The command line: `tachy generate` and `tachy models` output, exit codes, and one-line user errors.

Most tests call ``tachy.cli.main`` in-process with ``tachy.load`` answering the default model with the
session's already loaded engine (loading is covered by one real subprocess run of the console script).
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tachy
from tachy import GenerationConfig
from tachy.cli import main
from tachy.speculative.drafters import available_drafters


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cached_load(smollm, monkeypatch):
    """``tachy.load`` that returns the session engine for the default model and really loads anything else."""
    real_load = tachy.load
    calls = []

    def load(name_or_path=None, dtype=None, device=None, max_context=None, progress=True):
        calls.append(name_or_path)
        if name_or_path in (None, "smollm2-135m") and dtype is None and device is None and max_context is None:
            return smollm
        return real_load(name_or_path, dtype=dtype, device=device, max_context=max_context, progress=progress)

    monkeypatch.setattr(tachy, "load", load)
    return calls


def assert_user_error(capsys, rc: int, *fragments: str) -> str:
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_generate_chat_prints_the_answer(smollm, cached_load, capsys):
    rc = main(["generate", "Hi", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert rc == 0 and cached_load == [None]
    expected = smollm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)
    assert expected.strip() and out == expected + "\n"
    assert "loaded in" in err


@pytest.mark.slow
def test_generate_stats_line_follows_sys_stderr(cached_load, capsys):
    assert main(["generate", "Hi", "--max-new-tokens", "4"]) == 0
    _, err = capsys.readouterr()
    assert "prompt tokens" in err and "tokens per forward" in err


@pytest.mark.slow
def test_generate_raw(smollm, cached_load, capsys):
    rc = main(["generate", "The capital of France is", "--raw", "--max-new-tokens", "8"])
    out, _ = capsys.readouterr()
    assert rc == 0
    expected = smollm.generate("The capital of France is", max_new_tokens=8)
    assert expected.strip() and out == expected + "\n"


@pytest.mark.slow
def test_generate_reads_the_prompt_from_stdin_for_a_dash(smollm, cached_load, capsys, monkeypatch):
    prompt = "The capital of France is\nthe city of"   # a line break, as a piped file has
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt.encode())))
    assert main(["generate", "-", "--raw", "--max-new-tokens", "8"]) == 0
    out, _ = capsys.readouterr()
    expected = smollm.generate(prompt, max_new_tokens=8)
    assert expected.strip() and out == expected + "\n"


def test_a_prompt_on_stdin_that_is_not_utf8_is_a_user_error(cached_load, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9")))
    assert_user_error(capsys, main(["generate", "-"]), "not UTF-8", "byte 3")
    assert cached_load == []   # refused before the model loads


def chat_session(monkeypatch, capsys, typed: bytes, *flags: str) -> tuple[list[str], str]:
    """Run `tachy chat` on typed lines (bytes, read as a terminal would: undecodable bytes escaped); the
    answers (one per line of output) and stderr."""
    stdin = io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", "--max-new-tokens", "8", *flags]) == 0
    out, err = capsys.readouterr()
    lines = [re.sub(r"^(> )+", "", line) for line in out.split("\n")]   # input()'s prompts go to stdout
    return [line for line in lines if line], err


@pytest.mark.slow
def test_chat_keeps_the_history_and_reset_clears_it(smollm, cached_load, capsys, monkeypatch):
    answers, _ = chat_session(monkeypatch, capsys, b"Hi\nName a colour.\n/reset\nName a colour.\n/exit\nHi\n")
    first = smollm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Name a colour."}]
    second = smollm.chat(history, max_new_tokens=8)
    fresh = smollm.chat([{"role": "user", "content": "Name a colour."}], max_new_tokens=8)
    assert second != fresh   # else the history would not show
    assert answers == [first, second, fresh]   # nothing after /exit


@pytest.mark.slow
def test_a_turn_that_fails_leaves_the_chat_running(smollm, cached_load, capsys, monkeypatch):
    """A line of bytes that are not UTF-8 (the tokenizer's TypeError had ended the chat with a traceback),
    then a turn longer than the window: each prints one error and is left out of the history."""
    answers, err = chat_session(monkeypatch, capsys, b"caf\xe9\n" + b"word " * 9000 + b"\nHi\n")
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "not valid Unicode" in errors[0] and "/reset clears the history" in errors[1]
    assert answers == [smollm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)]


@pytest.mark.slow
def test_generate_drafter_none_same_text(smollm, cached_load, capsys, monkeypatch):
    import tachy.cli

    seen = []
    monkeypatch.setattr(tachy.cli, "print_stats", lambda stats, file=None: seen.append(stats))
    assert main(["generate", "Name three colors.", "--max-new-tokens", "12", "--drafter", "none"]) == 0
    plain, _ = capsys.readouterr()
    assert seen[-1].mean_accepted == 1.0 and seen[-1].drafted == 0
    assert main(["generate", "Name three colors.", "--max-new-tokens", "12", "--drafter", "pld"]) == 0
    drafted, _ = capsys.readouterr()
    assert plain == drafted and plain.strip()


@pytest.mark.slow
def test_generate_stop_and_sampling_options(smollm, cached_load, capsys):
    args = ["generate", "Count: 1, 2, 3,", "--raw", "--max-new-tokens", "12", "--temperature", "0.7",
            "--top-p", "0.9", "--seed", "7"]
    assert main(args) == 0
    first, _ = capsys.readouterr()
    assert main(args) == 0
    second, _ = capsys.readouterr()
    assert first == second   # seeded sampling is reproducible through the CLI
    expected = smollm.generate("Count: 1, 2, 3,", GenerationConfig(max_new_tokens=12, temperature=0.7, top_p=0.9,
                                                                   seed=7))
    assert first == expected + "\n"


def test_models_lists_both(capsys):
    assert main(["models"]) == 0
    out, _ = capsys.readouterr()
    assert "smollm2-135m" in out and "gemma3-270m" in out
    assert "* smollm2-135m" in out   # the default is marked


def test_unknown_model(capsys):
    rc = main(["generate", "Hi", "--model", "no-such-model-xyz"])
    assert_user_error(capsys, rc, "no-such-model-xyz", "smollm2-135m")


@pytest.mark.parametrize("device", ["no-such-device", "cuda:99", "mps"])
def test_a_device_this_machine_lacks_is_a_user_error(device, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    rc = main(["generate", "Hi", "--device", device])
    assert_user_error(capsys, rc, device)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_before_loading(port, capsys):
    rc = main(["serve", "--port", port])   # uvicorn had printed "running on :99999"
    assert_user_error(capsys, rc, "--port must be in 0-65535", port)


def test_missing_gguf_path(tmp_path, capsys):
    missing = tmp_path / "nothing-here.gguf"
    rc = main(["generate", "Hi", "--model", str(missing)])
    assert_user_error(capsys, rc, str(missing))


def test_not_a_gguf_file(tmp_path, capsys):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not a model")
    rc = main(["generate", "Hi", "--model", str(bad)])
    assert_user_error(capsys, rc, str(bad))


@pytest.mark.slow
def test_unknown_drafter(cached_load, capsys):
    rc = main(["generate", "Hi", "--max-new-tokens", "4", "--drafter", "no-such-drafter"])
    line = assert_user_error(capsys, rc, "no-such-drafter")
    for name in available_drafters():
        assert name in line


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "-1"],
                                    ["--max-new-tokens", "0"], ["--max-draft-tokens", "-2"]])
def test_invalid_sampling_values(option, capsys, monkeypatch):
    # checked before any model is loaded
    monkeypatch.setattr(tachy, "load", lambda *a, **k: pytest.fail("loaded a model for an invalid option"))
    rc = main(["generate", "Hi", *option])
    assert_user_error(capsys, rc, option[0].lstrip("-").replace("-", "_"))


def test_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_entry_point():
    """The installed `tachy` script (pyproject [project.scripts]) runs end to end in a fresh process."""
    script = Path(sys.executable).parent / "tachy"
    if not script.is_file():
        pytest.skip(f"{script} is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # a shared small CPU: no thread-pool spinning
    proc = subprocess.run([str(script), "generate", "Hi", "--max-new-tokens", "4"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr
    assert "loaded in" in proc.stderr and "4 generated" in proc.stderr
