"""The toolbox through the public API and the CLI: registry, errors, dispatch."""
from __future__ import annotations

import pytest

from tachy import GenerationConfig, InvalidArgumentError, UnknownNameError
from tachy.decoding import STRATEGIES, make_strategy
from tests.decoding.helpers import tiny_engine


def test_registry_names_and_unknown_names():
    assert {"default", "beam", "diverse_beam", "contrastive_search", "contrastive_decoding", "context_aware",
            "mirostat", "fsd", "mbr"} <= set(STRATEGIES)
    with pytest.raises(UnknownNameError, match="available: beam, .*mbr"):
        GenerationConfig(strategy="nucleus-beam")
    with pytest.raises(InvalidArgumentError, match="its options: .*num_beams"):
        make_strategy("beam", beam_width=3)


def test_spec_string_form():
    s = make_strategy("beam:num_beams=3,length_penalty=0.5")
    assert (s.num_beams, s.length_penalty) == (3, 0.5)


def test_default_strategy_leaves_plain_decoding_alone():
    engine, _ = tiny_engine(seed=1)
    a = [t for s in engine.generate_tokens([5, 6, 7], GenerationConfig(max_new_tokens=8)) for t in s.tokens]
    b = [t for s in engine.generate_tokens([5, 6, 7], GenerationConfig(max_new_tokens=8, strategy="default"))
         for t in s.tokens]
    assert a == b and GenerationConfig().drafter == "default"


@pytest.mark.parametrize("strategy, options", [("beam", {"num_beams": 3}), ("contrastive_search", {}),
                                                ("contrastive_decoding", {}), ("fsd", {})])
def test_search_strategies_stream_and_respect_budget(strategy, options):
    engine, _ = tiny_engine(seed=1)
    engine.tokenizer.decode = lambda ids, skip_special_tokens=False: "".join(f"<{i}>" for i in ids)
    cfg = GenerationConfig(max_new_tokens=7, strategy=strategy, strategy_options=options)
    pieces = list(engine.stream([5, 6, 7], cfg))
    assert pieces[-1].finish_reason in ("stop", "length")
    assert sum(len(p.token_ids) for p in pieces) <= 7


@pytest.mark.parametrize("strategy, options, temperature", [("beam", {"num_beams": 3}, 0.0),
                                                             ("mbr", {"num_samples": 4}, 1.0)])
def test_should_stop_ends_a_search_between_its_forwards(strategy, options, temperature):
    """A search commits nothing until it ends; the engine still asks ``should_stop`` after each of its forwards
    (a server's cancelled request stops there), and without it the search runs to its end as before."""
    from tachy.generation import GenerationStats

    engine, _ = tiny_engine(seed=1)
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True, strategy=strategy, strategy_options=options,
                           temperature=temperature, seed=0)
    asked, stats = [], GenerationStats()
    steps = list(engine.generate_tokens([5, 6, 7], cfg, stats, should_stop=lambda: asked.append(1) or len(asked) > 3))
    assert steps == [] and len(asked) == 4
    whole = list(engine.generate_tokens([5, 6, 7], cfg))
    assert len(whole) == 1 and len(whole[0].tokens) > 3 and all(s.tokens for s in whole)


def test_cli_flags_and_errors(capsys):
    from tachy.cli import main

    assert main(["generate", "hi", "--strategy", "beam", "--temperature", "0.5"]) == 2
    assert "deterministic search" in capsys.readouterr().err
    assert main(["generate", "hi", "--strategy", "nope"]) == 2
    assert "unknown decoding strategy" in capsys.readouterr().err
    assert main(["generate", "hi", "--regex", "(("]) == 2
    assert "regular expression" in capsys.readouterr().err


def test_cli_builds_the_config(tmp_path):
    import argparse

    from tachy.cli import build_parser, generation_config, _register_extras

    _register_extras()
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}')
    args = build_parser().parse_args(["generate", "x", "--strategy", "diverse_beam", "--num-beams", "6",
                                      "--num-beam-groups", "3", "--early-stopping", "true",
                                      "--json-schema", str(schema), "--watermark", "delta=3"])
    cfg = generation_config(args)
    assert (cfg.decoding.num_beams, cfg.decoding.num_beam_groups, cfg.decoding.early_stopping) == (6, 3, True)
    assert cfg.response_format["json_schema"]["schema"]["required"] == ["a"]
    assert cfg.watermark == {"delta": 3}
    assert isinstance(args, argparse.Namespace)


def test_cli_rejects_a_bad_schema_file(tmp_path, capsys):
    from tachy.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": ')
    assert main(["generate", "hi", "--json-schema", str(bad)]) == 2
    assert "--json-schema" in capsys.readouterr().err
    bad.write_text('{"type": "wibble"}')
    assert main(["generate", "hi", "--json-schema", str(bad)]) == 2
    assert "invalid JSON schema" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_watermark_detect_on_the_embedded_model(smollm, one_torch_thread, capsys):
    from tachy.cli import main

    # plain decoding: a speculative sample follows the same distribution but takes other random draws with
    # each drafter, and a sample that ends after ~20 tokens (seed 0 with the suffix automaton) is too short
    # to show the watermark at z > 4
    msgs = [{"role": "user", "content": "Write a few sentences about the sea."}]
    marked = smollm.chat(msgs, GenerationConfig(max_new_tokens=80, temperature=1.0, seed=1, watermark=True,
                                                drafter="none"))
    plain = smollm.chat(msgs, GenerationConfig(max_new_tokens=80, temperature=1.0, seed=1, drafter="none"))
    assert len(smollm.tokenizer.encode(marked, add_special_tokens=False)) >= 60
    assert main(["watermark", "detect", marked]) == 0
    out_marked = capsys.readouterr().out
    assert main(["watermark", "detect", plain]) == 0
    out_plain = capsys.readouterr().out
    assert ": watermarked" in out_marked and "not watermarked" in out_plain, (out_marked, out_plain)


def test_search_strategies_reject_presses_and_predictions():
    with pytest.raises(InvalidArgumentError, match="own search loop"):
        GenerationConfig(strategy="beam", press="snapkv", compression_ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="own search loop"):
        GenerationConfig(strategy="contrastive_search", prediction="hello")
