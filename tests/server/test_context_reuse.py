"""Context reuse through the server: the prefix cache serves a conversation's next turn (reported in
usage.prompt_tokens_details and /metrics) without changing the answer; APE's tachy.passages field."""
from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(smollm, one_torch_thread):
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    with serve_in_thread(create_app(smollm, max_queue=8)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_the_next_turn_reuses_the_conversation_and_keeps_its_answer(client, server):
    history = [{"role": "user", "content": "Describe a lighthouse keeper's day. " * 30}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=24, temperature=0)
    turn2 = history + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And at night?"}]
    hits = metric(server, "tachy_prefix_cache_hits_total")
    cold = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=16, temperature=0,
                                          extra_body={"tachy": {"prefix_cache": False}})
    chunks = list(client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    warm_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert warm_text == cold.choices[0].message.content
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 64 and cached % 64 == 0
    assert metric(server, "tachy_prefix_cache_hits_total") == hits + 1
    assert metric(server, "tachy_prefix_cache_reused_tokens_total") >= cached


def test_passages_run_ape_and_match_the_python_api(client, smollm):
    from tachy.context import ape_generate

    passages = ["Alice keeps the red key.\n\n", "Bob keeps the blue key.\n\n"]
    messages = [{"role": "system", "content": "Answer from the passages."},
                {"role": "user", "content": "Who keeps the blue key?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"tachy": {"passages": passages}})
    text = smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = text.index("Who keeps")
    enc = lambda t: smollm.tokenizer.encode(t, add_special_tokens=False)   # noqa: E731
    expected = ape_generate(smollm, enc(text[:start]), [enc(p) for p in passages], enc(text[start:]), 10)
    assert reply.choices[0].message.content == smollm.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(enc(text[:start])) + len(enc(text[start:])) + \
        sum(len(enc(p)) for p in passages)


def test_bad_passages_are_400(client):
    ask = [{"role": "user", "content": "Why?"}]
    for tachy in ({"passages": []}, {"passages": ["a"], "ape_temperature": 0}, {"passages": ["a"] * 65}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=ask, max_tokens=2, extra_body={"tachy": tachy})
    with pytest.raises(openai.BadRequestError, match="chat completions"):
        client.completions.create(model=MODEL, prompt="Why?", max_tokens=2,
                                  extra_body={"tachy": {"passages": ["a"]}})
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(model=MODEL, messages=ask, max_tokens=2,
                                       extra_body={"tachy": {"passages": ["word " * 9000]}})
