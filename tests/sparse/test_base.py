"""The registry and the checks: bad input fails with a clear error before anything runs."""
from __future__ import annotations

import pytest

from tachy import GenerationConfig
from tachy.cli import main
from tachy.errors import InvalidArgumentError, UnknownNameError
from tachy.sparse import QuestAttention, TidalDecodeAttention, available_attentions, kv_read_per_token, make_attention
from tests.conftest import tiny_config


def test_names_and_options():
    assert available_attentions() == ["double_sparsity", "minference", "quest", "tidal"]
    assert make_attention("dense") is None and make_attention("none") is None
    quest = make_attention("quest:budget=512,page_size=32")
    assert isinstance(quest, QuestAttention) and (quest.budget, quest.page_size) == (512, 32)
    # sinks round up to a page; the rest of the budget after the window is whole pages
    assert quest.fixed_keys == 32 + 64 and quest.select == (512 - 96) // 32
    assert isinstance(make_attention("tidal"), TidalDecodeAttention)


def test_unknown_name_and_bad_options():
    with pytest.raises(UnknownNameError, match="unknown attention 'nope'; available: dense, double_sparsity, minference, quest, tidal"):
        make_attention("nope")
    with pytest.raises(InvalidArgumentError, match="budget 64 leaves nothing to choose"):
        make_attention("quest:budget=64")
    with pytest.raises(InvalidArgumentError, match="page_size must be a whole number in"):
        make_attention("quest:page_size=0")
    with pytest.raises(InvalidArgumentError, match="budget must be a whole number >= 0"):
        make_attention("quest:budget=-5")
    with pytest.raises(InvalidArgumentError, match="window must be at least 1"):
        make_attention("quest:window=0")
    with pytest.raises(InvalidArgumentError, match="unexpected keyword"):
        make_attention("quest:pages=3")
    with pytest.raises(InvalidArgumentError, match="selection must be layer numbers"):
        make_attention("tidal:selection=x/2")


def test_generation_config_checks_the_window_against_the_drafts():
    assert isinstance(GenerationConfig(attention="quest").attention, QuestAttention)
    assert GenerationConfig(attention="dense").attention is None
    with pytest.raises(InvalidArgumentError, match="window 16 must exceed the verify forward's 17 tokens"):
        GenerationConfig(attention="quest:window=16")
    GenerationConfig(attention="quest:window=16", max_draft_tokens=15)
    with pytest.raises(InvalidArgumentError, match="not available with the 'beam' strategy"):
        GenerationConfig(attention="quest", strategy="beam")


def test_tidal_selection_layers_must_be_full_attention_layers():
    gemma = tiny_config("gemma3")        # layers 0-4 sliding, 5 full
    assert make_attention("tidal").selection_layers(gemma) == [5]
    with pytest.raises(InvalidArgumentError, match=r"selection layers \[2\] are not full-attention layers"):
        make_attention("tidal:selection=2").layer_roles(gemma)
    llama = tiny_config("llama", num_layers=32)
    assert make_attention("tidal").selection_layers(llama) == [2, 13]
    assert make_attention("tidal").layer_roles(llama)[:4] == [0, 0, 2, 1]


def test_kv_read_per_token_counts_the_keys_each_layer_reads():
    gemma = tiny_config("gemma3")        # layers 0-4 sliding (window 8), 5 full; 1 kv head of 16 channels
    row = gemma.num_kv_heads * 2 * gemma.head_dim * 2                       # a key and its value, bf16
    assert gemma.sliding_window == 8
    assert kv_read_per_token(gemma, "dense", 100) == (5 * 8 + 100) * row     # sliding layers read their window
    assert kv_read_per_token(gemma, None, 4) == 6 * 4 * row
    assert kv_read_per_token(gemma, "dense", 100, kept=0.25) == (5 * 8 + 100) * row // 4   # a press's share
    quest = "quest:budget=48,sinks=0,window=16,page_size=16"                   # 48 keys and its page bounds
    assert kv_read_per_token(gemma, quest, 100) == make_attention(quest).kv_bytes_per_token(gemma, 100)
    assert kv_read_per_token(gemma, quest, 1000) < kv_read_per_token(gemma, "dense", 1000)


def test_cli_rejects_bad_attention_before_loading(capsys):
    assert main(["generate", "hi", "--attention", "nope"]) == 2
    assert "unknown attention 'nope'; available: dense, double_sparsity, minference, quest, tidal" in capsys.readouterr().err
    assert main(["generate", "hi", "--attention", "quest:budget=10"]) == 2
    assert "leaves nothing to choose" in capsys.readouterr().err


def test_the_servers_tachy_field_takes_an_attention():
    from tachy.server.schemas import TachyOptions

    assert TachyOptions(attention="quest:budget=512").attention == "quest:budget=512"
    assert TachyOptions().attention is None
