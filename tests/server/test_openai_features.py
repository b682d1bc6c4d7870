"""The OpenAI features clients rely on: logprobs / top_logprobs, echo, and tools / tool_choice."""
from __future__ import annotations

import json
import math

import pytest
import torch

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "Name a colour."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                   "required": ["timezone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(smollm, one_torch_thread):
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    with serve_in_thread(create_app(smollm, max_queue=8)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_chat_logprobs_are_the_models(client, smollm):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    prompt = smollm.chat_prompt(ASK)
    ids = prompt + smollm.tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)
    cache = smollm.model.new_cache(capacity=len(ids) + 8, fixed=True)
    with torch.inference_mode():
        logits = smollm.model(torch.tensor([ids]), torch.arange(len(ids)), cache)[0].float()
    expected = torch.log_softmax(logits, -1)
    for k, c in enumerate(content):   # greedy: the chosen token is the most likely, its logprob the model's
        assert len(c.top_logprobs) == 3 and c.token == c.top_logprobs[0].token
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.logprob <= 0
        row = expected[len(prompt) - 1 + k]
        assert c.logprob == pytest.approx(float(row.max()), abs=2e-3)


def test_streamed_logprobs_equal_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == \
        [(c.token, round(c.logprob, 4)) for c in whole.choices[0].logprobs.content]


def test_completion_logprobs_and_echo(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(1 <= len(top) <= 2 and max(top.values()) >= tl - 1e-6 for top, tl in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs))
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_unsupported_combinations_are_400(client):
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0, logprobs=True,
                                       extra_body={"tachy": {"strategy": "beam"}})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="y")


def weather_call(message) -> dict:
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    return {"name": call.function.name, "arguments": json.loads(call.function.arguments)}


def test_required_tool_call_is_valid_json_for_its_schema(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=40,
        temperature=0, tools=[WEATHER], tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    call = weather_call(r.choices[0].message)
    assert call["name"] == "get_weather" and set(call["arguments"]) == {"city"}
    assert isinstance(call["arguments"]["city"], str) and len(call["arguments"]["city"]) <= 20


def test_named_tool_and_streamed_tool_call(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What time is it in Tokyo?"}], max_tokens=40,
              temperature=0, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    r = client.chat.completions.create(**kw)
    call = weather_call(r.choices[0].message)
    assert call["name"] == "get_time" and set(call["arguments"]) == {"timezone"}
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1
    streamed = deltas[0][0]
    assert streamed.function.name == "get_time"
    assert json.loads(streamed.function.arguments) == call["arguments"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_choice_none_and_auto(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    none = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, tools=[WEATHER],
                                          tool_choice="none")
    assert none.choices[0].message.content == plain.choices[0].message.content   # tools neither shown nor used
    assert not none.choices[0].message.tool_calls
    for question in ("What is the weather in Rome?", "Say hello."):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                           max_tokens=40, temperature=0, tools=[WEATHER])
        message = r.choices[0].message
        if message.tool_calls:
            assert weather_call(message)["name"] == "get_weather"
        else:
            assert not message.content.lstrip().startswith("{")


def test_a_conversation_with_tool_results(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=20, temperature=0, tools=[WEATHER], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kw, match", [
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
    (dict(tool_choice="required"), "needs tools"),
    (dict(tools=[WEATHER, WEATHER]), "unique"),
    (dict(tools=[WEATHER], response_format={"type": "json_object"}), "cannot be combined"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
])
def test_bad_tool_requests_are_400(client, kw, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)


def test_logprob_values_are_finite(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0.8, seed=1,
                                       logprobs=True, top_logprobs=0)
    assert all(math.isfinite(c.logprob) and c.top_logprobs == [] for c in r.choices[0].logprobs.content)


def test_tokens_a_response_format_rules_out_have_the_lowest_logprob_not_a_500(client):
    """Under a constraint fewer tokens are allowed than ``top_logprobs`` asks for: the rest have probability 0,
    -inf, which JSON cannot carry (the answer was a 500, found by the fuzz test)."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=20, extra_body={"response_format": {"type": "regex",
                                                                                        "regex": "[ab]c"}})
    assert r.choices[0].message.content in ("ac", "bc")
    content = r.choices[0].logprobs.content
    assert all(math.isfinite(c.logprob) and c.logprob > -9999 for c in content)
    tops = [[t.logprob for t in c.top_logprobs] for c in content]
    assert all(len(top) == 20 and top == sorted(top, reverse=True) for top in tops)
    allowed = [sum(lp > -9999 for lp in top) for top in tops]   # "a", "b", "ac" ... then nothing allowed
    assert all(1 <= n < 20 for n in allowed) and allowed[0] >= 2, allowed
    completion = client.completions.create(model=MODEL, prompt="0", max_tokens=1, temperature=0, logprobs=2,
                                           extra_body={"response_format": {"type": "json_object"}})
    assert all(math.isfinite(v) for top in completion.choices[0].logprobs.top_logprobs for v in top.values())


def test_logit_bias_and_the_extra_sampling_controls_are_honoured(client, smollm):
    """logit_bias and vLLM's top_k / min_p / repetition_penalty reach the sampler: each answer is the engine's
    own with those options (tests/test_sampling.py checks what they do to the logits)."""
    from tachy import GenerationConfig

    prompt = smollm.chat_prompt(ASK)
    free = list(smollm.generate_tokens(prompt, GenerationConfig(max_new_tokens=1)))[0].tokens[0]
    for extra in ({"logit_bias": {str(free): -100}}, {"logit_bias": {str(free): 100, "17": -5.5}},
                  {"repetition_penalty": 1.8}, {"top_k": 1, "min_p": 0.2}, {"top_k": -1}):
        sampled = "logit_bias" not in extra
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, extra_body=extra,
                                           temperature=0.9 if sampled else 0, seed=3)
        options = {**extra, "logit_bias": {int(k): v for k, v in extra.get("logit_bias", {}).items()} or None,
                   "top_k": max(extra.get("top_k", 0), 0)}
        local = smollm.generate(prompt, GenerationConfig(max_new_tokens=12, temperature=0.9 if sampled else 0,
                                                         seed=3, **options))
        assert r.choices[0].message.content == local, extra
    banned = smollm.generate(prompt, GenerationConfig(max_new_tokens=4, logit_bias={free: -100}))
    forced = smollm.generate(prompt, GenerationConfig(max_new_tokens=4, logit_bias={free: 100}))
    assert forced == smollm.tokenizer.decode([free] * 4) and not banned.startswith(smollm.tokenizer.decode([free]))
