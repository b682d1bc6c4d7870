"""Structured output: every sample parses and validates; speculative + constrained == plain + constrained."""
from __future__ import annotations

import json
import re

import pytest

from tachy import GenerationConfig, InvalidArgumentError
from tachy.decoding import response_format_regex, token_bytes
from tests.decoding.helpers import smollm_tokenizer, tiny_engine_with_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "ok", "city"],
}


def validate(value) -> None:
    """The schema above, checked by hand (jsonschema is not a dependency)."""
    assert isinstance(value, dict) and list(value) == ["name", "age", "ok", "city"]
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["ok"], bool)
    assert value["city"] in ("Paris", "Rome", "Oslo")


@pytest.fixture(scope="module")
def engine():
    return tiny_engine_with_tokenizer(smollm_tokenizer(), seed=4)


def test_token_bytes_round_trip(engine):
    tok = engine.tokenizer
    table = token_bytes(tok)
    ids = tok.encode("Hello, wörld! {\"a\": 1} 東京", add_special_tokens=False)
    assert b"".join(table[i] for i in ids).decode() == "Hello, wörld! {\"a\": 1} 東京"
    assert all(table[i] is None for i in tok.eos_token_ids)


def test_json_schema_samples_always_parse_and_validate(engine):
    """Near-uniform random model, temperature 1, 40 seeds, a tight budget: the budget-aware mask still closes
    every object in time."""
    rf = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    finishes = set()
    for seed in range(40):
        cfg = GenerationConfig(max_new_tokens=48, temperature=1.0, seed=seed, response_format=rf, drafter=None)
        pieces = list(engine.stream([1, 2, 3], cfg))
        text = "".join(p.text for p in pieces)
        validate(json.loads(text))
        finishes.add(pieces[-1].finish_reason)
    assert "length" in finishes   # some samples were only saved by the budget rule


def test_json_object_mode(engine):
    for seed in range(5):
        cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(engine.generate([1, 2, 3], cfg)), dict)


def test_regex(engine):
    rf = {"type": "regex", "regex": r"[0-9]{3}-[0-9]{4} (yes|no)"}
    for seed in range(10):
        out = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=20, temperature=1.0, seed=seed,
                                                          response_format=rf))
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4} (yes|no)", out), out


def test_budget_too_small_still_heads_for_the_end(engine):
    """A schema needing more tokens than the budget: output is cut at the budget but is a valid prefix."""
    rf = {"type": "regex", "regex": r"a{30}"}
    out = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=3, temperature=1.0, seed=0, response_format=rf))
    assert set(out) <= {"a"} and out


@pytest.mark.parametrize("drafter", ["pld", "default"])
def test_speculative_constrained_equals_plain_constrained(engine, drafter):
    """Masks depend only on each row's context, so drafts the constraint forbids are rejected and greedy
    speculative output is token-identical to plain constrained output."""
    rf = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    prompt = engine.tokenizer.encode('{"name": "Bob", "age": 7, "ok": true, "city": "Rome"} again: ',
                                     add_special_tokens=False)
    plain = list(engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=40, response_format=rf,
                                                                 drafter=None)))
    spec_steps = list(engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=40, response_format=rf,
                                                                      drafter=drafter)))
    assert [t for s in spec_steps for t in s.tokens] == [t for s in plain for t in s.tokens]
    # drafts were verified (how many get accepted depends on the forward costs measured on a busy machine,
    # which decide the cost-aware drafts' size; the identity above is what must hold)
    assert sum(s.draft_size for s in spec_steps) > 0


def test_constrained_beam_search(engine):
    rf = {"type": "regex", "regex": r"(cat|dog|bird)s?"}
    out = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=6, strategy="beam", response_format=rf))
    assert re.fullmatch(r"(cat|dog|bird)s?", out), out


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"schema": "[1, 2"}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1, 2]}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {}}, "schema"),
    ({"type": "regex", "regex": 5}, "regex needs"),
    ({"type": "regex", "regex": "a" * 100_001}, "over the limit"),
    ({"type": "xml"}, "unknown response_format type"),
    ({"regex": "a"}, "type"),
])
def test_bad_shapes_fail_at_config_time(response_format, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GenerationConfig(response_format=response_format)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "JSON schema"),
    ({"type": "regex", "regex": "(("}, "regular expression"),
])
def test_patterns_that_do_not_compile_fail_before_any_model_work(engine, response_format, message):
    """Compiling can take long (constraint_compiler.py), so config time checks the shape only; the pattern
    fails when the generation starts, before its prefill."""
    config = GenerationConfig(response_format=response_format, max_new_tokens=4)
    with pytest.raises(InvalidArgumentError, match=message):
        engine.generate([1, 2, 3], config)


def test_schema_regex_is_what_outlines_builds():
    assert response_format_regex({"type": "regex", "regex": "ab+"}) == "ab+"
    assert '"name"' in response_format_regex({"type": "json_schema", "json_schema": {"schema": SCHEMA}})


STRATEGIES = [
    ("default", {}, {}),
    ("beam", {"num_beams": 3}, {}),
    ("diverse_beam", {"num_beams": 4, "num_beam_groups": 2}, {}),
    ("contrastive_search", {"top_k": 4, "penalty_alpha": 0.6}, {}),
    ("contrastive_decoding", {}, {}),
    ("context_aware", {"context": "Numbers and letters."}, {}),
    ("fsd", {}, {}),
    ("mirostat", {}, {"temperature": 1.0, "seed": 3}),
    ("mbr", {}, {"temperature": 1.0, "seed": 3}),
]


@pytest.mark.parametrize("strategy, options, sampling", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_every_strategy_keeps_to_the_constraint(engine, strategy, options, sampling):
    """A strategy that cuts the candidates down first (mirostat's surprise bound, FSD's and contrastive
    search's top k, contrastive decoding's plausible set) could keep none the constraint allows: mirostat
    then raised inside torch.multinomial, the others ended at once ('') or emitted a forbidden token."""
    pattern = r"[0-9]{3}-[a-z]{2}"
    for text in ("Numbers and letters. Write a code:", "Numbers and letters. Again"):
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
        cfg = GenerationConfig(max_new_tokens=12, strategy=strategy, strategy_options=options,
                               response_format={"type": "regex", "regex": pattern}, **sampling)
        out = engine.generate(prompt, cfg)
        assert re.fullmatch(pattern, out), (strategy, out)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["contrastive_search", "contrastive_decoding", "fsd"])
def test_strategies_keep_to_json_object_on_the_real_model(smollm, strategy):
    """The real model's top candidates for this prompt are words, none of which may open a JSON object:
    contrastive search's top 4 then held only forbidden tokens, and it wrote '<|im_start|>'."""
    out = smollm.generate("Write one sentence about rivers.", max_new_tokens=24, strategy=strategy,
                          response_format={"type": "json_object"})
    assert out.startswith("{"), out
