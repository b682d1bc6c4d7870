"""`tachy drafters` and `tachy datastore build` (with a tiny word-level tokenizer folder)."""
from __future__ import annotations

import json


from tachy.cli import main
from tachy.speculative.drafters import DRAFTERS, Datastore


def tiny_model_folder(path):
    """A folder resolve_model accepts (config.json) with a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat", "dog", "ran"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps({}))
    return path


def test_drafters_lists_every_name(capsys):
    assert main(["drafters"]) == 0
    out = capsys.readouterr().out
    for name in DRAFTERS:
        assert f"\n{name} " in "\n" + out


def test_datastore_build(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    (tmp_path / "a.txt").write_text("the cat sat on the mat")
    (tmp_path / "b.txt").write_text("the dog ran")
    out = tmp_path / "store.npz"
    assert main(["datastore", "build", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                 "--model", str(model), "--out", str(out)]) == 0
    ds = Datastore.load(out)
    assert ds.tokens.tolist() == [1, 2, 3, 4, 1, 5, -1, 1, 6, 7]
    assert ds.lookup([4, 1], min_len=2) == (2, [[5]])
    assert main(["datastore", "build", str(tmp_path / "missing.txt"), "--model", str(model)]) == 2
    assert "not found" in capsys.readouterr().err
