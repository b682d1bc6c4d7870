"""The server through the official openai client (and raw HTTP where the client hides what we check)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tachy import GenerationConfig

from .conftest import API_KEY

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Write a long story about a dragon."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def greedy(**kw) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, **kw)


def test_chat_matches_the_engine(client, smollm):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    prompt_ids = smollm.chat_prompt(MESSAGES)
    assert r.choices[0].message.content == smollm.generate(prompt_ids, greedy(max_new_tokens=12))
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_matches_the_engine(client, smollm):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text == smollm.generate("The capital of France is", greedy(max_new_tokens=8))
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(smollm.tokenizer.encode("The capital of France is"))


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the tachy extension: one from_draft flag per generated token
    flags = [f for c in chunks if c.choices for f in (c.model_extra.get("tachy") or {}).get("from_draft", [])]
    assert len(flags) == 12


def test_completion_stream_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    segments = [s for c in chunks for s in c.get("tachy", {}).get("segments", [])]
    assert "".join(t for t, _ in segments) == "".join(c["choices"][0]["text"] for c in chunks)


def test_stop_sequence(client):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert " 7" in full, full
    r = client.completions.create(stop=[" 7", "never"], **kw)
    assert r.choices[0].text == full[:full.index(" 7")]
    assert r.choices[0].finish_reason == "stop"


def test_ignore_eos_goes_on_to_max_tokens(client):
    """vLLM's ``ignore_eos`` (benchmarks keep streams running with it): the answer that ended on the
    end-of-text token goes on, the same text first, until max_tokens."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=48, temperature=0)
    short = client.chat.completions.create(**kw)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 48
    long = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 48
    assert long.choices[0].message.content.startswith(short.choices[0].message.content)
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        client.chat.completions.create(**kw, response_format={"type": "json_object"},
                                       extra_body={"ignore_eos": True})


def test_n_choices_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy: both the same
    assert r.usage.completion_tokens == 12


def test_seed_reproduces_sampling(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_drafter_choice_is_lossless(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(extra_body={"tachy": {"drafter": "none"}}, **kw)
    drafted = client.chat.completions.create(extra_body={"tachy": {"drafter": "pld", "max_draft_tokens": 4}}, **kw)
    assert plain.choices[0].message.content == drafted.choices[0].message.content
    assert plain.model_extra["tachy"]["stats"][0]["accepted"] == 0


def test_prediction_is_lossless(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Repeat: the quick brown fox jumps."}],
              max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    predicted = client.chat.completions.create(prediction={"type": "content", "content": "the quick brown fox"},
                                               **kw).choices[0].message.content
    assert predicted == plain


# -- errors ------------------------------------------------------------------------------------------------
def _post(server, path, content, headers=AUTH):
    return httpx.post(f"{server}{path}", content=content, timeout=60,
                      headers={**headers, "content-type": "application/json"})


def _assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    (b'{"model": "smollm2-135m", "messages": [', None),                                     # malformed JSON
    (b'[1, 2]', None),                                                                     # not an object
    (b'{"model": "smollm2-135m", "messages": "hi"}', "messages"),                          # wrong type
    (b'{"model": "smollm2-135m", "messages": []}', "messages"),                            # empty
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "a"}], "max_tokens": -5}',
     "max_tokens"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "a"}], "max_tokens": "ten"}',
     "max_tokens"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "a"}], "temperature": 9}',
     "temperature"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}',
     "top_logprobs"),
])
def test_bad_chat_requests_get_400(server, body, param):
    err = _assert_openai_error(_post(server, "/v1/chat/completions", body), 400)
    assert err["param"] == param


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=MESSAGES, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def test_negative_max_tokens_via_client(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)


def test_unknown_drafter_400_lists_the_drafters(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body={"tachy": {"drafter": "nope"}})
    assert "nope" in e.value.message and "default" in e.value.message


def test_prompt_over_the_context_window(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # the prompt fits, prompt + max_tokens does not
        client.completions.create(model=MODEL, prompt="hello " * 8000, max_tokens=4000)


def test_body_too_large_413(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20), "max_tokens": 4}).encode()
    err = _assert_openai_error(_post(server, "/v1/completions", body), 413)
    assert err["code"] == "body_too_large"


def test_api_key(server):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        _assert_openai_error(_post(server, "/v1/completions", body, headers), 401)
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server}/health").status_code == 200  # health and metrics stay open
    for path in ("/openapi.json", "/docs", "/redoc"):   # the API's description is not served around the key
        assert httpx.get(f"{server}{path}", headers=AUTH).status_code == 404


def test_unknown_path_in_openai_format(server):
    _assert_openai_error(httpx.get(f"{server}/v1/nothing", headers=AUTH), 404)


# -- queue, disconnects, health, metrics -----------------------------------------------------------------
def _health(server) -> dict:
    return httpx.get(f"{server}/health").json()


def _wait(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def serial_server(smollm, one_torch_thread):
    """One request at a time (--max-batch 1) and one waiting: the queue is easy to fill."""
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    with serve_in_thread(create_app(smollm, api_key=API_KEY, max_queue=1, max_batch=1)) as url:
        yield url


def test_full_queue_429_and_disconnect_frees_the_slot(serial_server):
    server = serial_server
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    # A: a long stream (plain decoding, 2000 tokens: a minute or more on a CPU) that we read once and drop
    long = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=2000, temperature=0,
                                     stream=True, extra_body={"tachy": {"drafter": "none"}})
    next(iter(long))
    # B waits in the queue (max_queue=1) ...
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("b", client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, temperature=0)))
    waiter.start()
    _wait(lambda: _health(server)["queue_depth"] == 1)
    # ... so C is turned away
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "queue_full"
    # dropping A mid-stream frees the worker: B completes long before A's 2000 tokens would have
    start = time.monotonic()
    long.close()
    waiter.join(60)
    assert "b" in result and result["b"].usage.completion_tokens == 4
    assert time.monotonic() - start < 20
    _wait(lambda: _health(server) == {**_health(server), "queue_depth": 0, "running": 0})


def test_non_stream_client_gone_frees_the_worker(server):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0,
            "tachy": {"drafter": "none"}}
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 2 s and closes the connection
        httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=2.0)
    start = time.monotonic()
    _wait(lambda: _health(server)["running"] == 0, timeout=30)
    assert time.monotonic() - start < 10  # long before 2000 tokens


def test_health_models_metrics(server, client):
    assert _health(server)["status"] == "ok"
    assert [m.id for m in client.models.list()] == [MODEL]
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['tachy_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["tachy_generation_tokens_total"] >= 3
    assert values["tachy_queue_depth"] == 0
    assert values["tachy_mean_accepted_tokens"] >= 1.0
    assert values["tachy_tokens_per_second"] > 0


def test_a_model_is_retrieved_by_name(server, client):
    """The openai client's models.retrieve (GET /v1/models/{id}) was a bare 404."""
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no/such-model")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server}/v1/models/{MODEL}").status_code == 401   # the key guards it like the list


def test_response_format_json_schema_parses_and_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give the largest city of France as JSON."}],
        max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "population"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


def test_response_format_bad_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body={"response_format": {"type": "yaml"}})


def test_decoding_strategy_per_request(client, smollm):
    """Beam search through the tachy extension gives the engine's beam search answer."""
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body={"tachy": {"strategy": "beam",
                                                             "strategy_options": {"num_beams": 3}}})
    expected = smollm.generate(smollm.chat_prompt(MESSAGES), greedy(max_new_tokens=8, strategy="beam",
                                                                  strategy_options={"num_beams": 3}))
    assert r.choices[0].message.content == expected
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body={"tachy": {"strategy": "nope"}})
    assert "beam" in e.value.message    # the error lists the strategies


def test_kv_press_per_request(client, smollm):
    prompt = "Once upon a time, in a land far away, there lived a king who had three daughters. " * 6
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"tachy": {"press": "snapkv", "compression_ratio": 0.5}})
    assert r.choices[0].text == smollm.generate(prompt, greedy(max_new_tokens=8, press="snapkv",
                                                               compression_ratio=0.5))
    stats = r.model_extra["tachy"]["stats"][0]
    assert 0 < stats["kv_bytes"] < 0.6 * stats["kv_full_bytes"]    # the press's saving, reported
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"tachy": {"press": "nope"}})
    assert "snapkv" in e.value.message   # the error lists the presses


def test_scope_press_per_request(client, smollm):
    """SCOPE's options travel in the press string; its decoding budget bounds the KV a long answer holds."""
    prompt = "Once upon a time, in a land far away, there lived a king who had three daughters. " * 6
    press = "scope:decode_budget=8,recent=4,strategy=discontinuous,delta=4"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"tachy": {"press": press, "compression_ratio": 0.5}})
    assert r.choices[0].text == smollm.generate(prompt, greedy(max_new_tokens=24, press=press,
                                                               compression_ratio=0.5))
    stats = r.model_extra["tachy"]["stats"][0]
    assert 0 < stats["kv_bytes"] < 0.6 * stats["kv_full_bytes"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4,
                                  extra_body={"tachy": {"press": "scope:strategy=fast"}})
    assert "slide, adaptive, discontinuous" in e.value.message
