"""Fuzz the request schema with hypothesis: whatever a client sends, the answer is never a 5xx.

Bodies start from a valid request and get fields replaced by values of any JSON type (and raw bytes are
sent too). max_tokens stays small when valid, so that the requests that pass validation generate quickly.
"""
from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["", MODEL, "default", "none", "sam", "rest", "content"]),
                    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3))   # lone surrogates
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
small_tokens = st.integers(1, 3)
valid_common = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.integers(1, 2), "stream": st.booleans(),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "seed": st.integers(-2**64, 2**64), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-3, 60000).map(str), st.text(max_size=4)),
                                  st.floats(-150, 150), max_size=4),
    "top_k": st.integers(-3, 100), "min_p": st.floats(-0.5, 1.5), "repetition_penalty": st.floats(-1, 12),
    "ignore_eos": st.booleans(),
    "prediction": st.fixed_dictionaries({"type": st.just("content"), "content": st.text(max_size=30)}),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "tachy": st.fixed_dictionaries({}, optional={
        "drafter": st.sampled_from(["default", "none", "sam", "pld", "rest", "trigram", "gated", "x"]),
        "max_draft_tokens": st.integers(0, 8), "prefix_cache": st.booleans(),
        "passages": st.lists(st.text(max_size=20), max_size=3), "ape_temperature": st.floats(-1, 2),
        "ape_scale": st.floats(-1, 2),
        "strategy": st.sampled_from(["default", "beam", "diverse_beam", "contrastive_search",
                                     "contrastive_decoding", "fsd", "mirostat", "mbr", "x"]),
        "strategy_options": st.dictionaries(st.sampled_from(["num_beams", "top_k", "tau", "alpha"]),
                                            st.integers(-1, 4), max_size=2)}),
}
valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": small_tokens,
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                                 "content": st.text(max_size=30)}), min_size=1, max_size=3)},
    optional={**valid_common, "max_completion_tokens": small_tokens, "logprobs": st.booleans(),
              "top_logprobs": st.integers(0, 20),
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                  {"name": st.sampled_from(["f", "g", "get_x"])}, optional={"parameters": st.just(
                      {"type": "object", "properties": {"a": {"type": "integer"}}})})}), max_size=2),
              "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function",
                                                                          "function": {"name": "f"}}])})
valid_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": small_tokens,
     "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 50000), max_size=5),
                         st.lists(st.text(max_size=10), max_size=2))},
    optional={**valid_common, "echo": st.booleans(), "logprobs": st.integers(0, 5), "suffix": st.none()})
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "echo",
          "tools", "tool_choice",
          "suffix", "user", "best_of", "modalities", "audio", "web_search_options", *valid_common]


def mutated(valid):
    """A valid body, or one with a field (or a field of a nested object) replaced by any JSON value."""
    def mutate(body, key, value, nested):
        if nested and isinstance(body.get(key), dict) and body[key]:
            inner = dict(body[key])
            inner[sorted(inner)[0]] = value
            value = inner
        if not (key in ("max_tokens", "max_completion_tokens") and isinstance(value, int) and value > 3):
            body = {**body, key: value}  # a valid large max_tokens would only make the test slow
        return body
    return st.one_of(valid, st.builds(mutate, valid, st.sampled_from(FIELDS), values, st.booleans()))


chat_bodies, completion_bodies = mutated(valid_chat), mutated(valid_completion)


@pytest.fixture(scope="module")
def http(smollm, one_torch_thread):
    from tachy.server import create_app

    with TestClient(create_app(smollm, max_queue=4), raise_server_exceptions=False) as client:
        yield client


def _check(response) -> None:
    hypothesis.event(f"status {response.status_code}")  # see --hypothesis-show-statistics
    assert response.status_code < 500, response.text
    # a stream has sent its 200 before it fails: a server error shows as its error chunk
    assert '"server_error"' not in response.text, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(body=chat_bodies)
def test_chat_schema_never_5xx(http, body):
    _check(http.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}))


@SETTINGS
@given(body=completion_bodies)
def test_completion_schema_never_5xx(http, body):
    _check(http.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"}))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_raw_bytes_never_5xx(http, raw, path):
    _check(http.post(path, content=raw, headers={"content-type": "application/json"}))


def test_base_model_chat_is_a_clear_400(http, smollm, monkeypatch):
    """gemma3-270m has no chat template; the same path on a template-less tokenizer."""
    monkeypatch.setattr(smollm.tokenizer, "chat_template", None)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    assert "/v1/completions" in r.json()["error"]["message"]
