"""Batched serving through the openai client: concurrent (streaming) requests give one-at-a-time's text."""
from __future__ import annotations

import threading

import httpx
import pytest

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPTS = ["Write a haiku about the sea.", "Name three prime numbers.", "What is a CPU?",
           "Tell me a joke about cats.", "Describe Paris in one sentence."]


@pytest.fixture(scope="module")
def batch_server(smollm, one_torch_thread):
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    with serve_in_thread(create_app(smollm, max_queue=8, max_batch=4)) as url:
        yield url


def ask(client, i: int, stream: bool) -> tuple[str, str, int]:
    kw = dict(model=MODEL, max_tokens=20 + 3 * i, temperature=0, stop=["\n\n"] if i == 2 else None)
    if i % 2:   # completions endpoint
        kw["prompt"] = PROMPTS[i]
        if not stream:
            r = client.completions.create(**kw)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        kw["messages"] = [{"role": "user", "content": PROMPTS[i]}]
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1], chunks[-1].usage.completion_tokens


def lone(engine, i: int) -> str:
    """The engine's own (speculative, default drafter) answer to request ``i``, outside any batch."""
    from tachy import GenerationConfig

    config = GenerationConfig(max_new_tokens=20 + 3 * i, temperature=0, stop=["\n\n"] if i == 2 else None)
    if i % 2:
        return engine.generate(PROMPTS[i], config)
    return engine.chat([{"role": "user", "content": PROMPTS[i]}], config)


def test_concurrent_requests_equal_one_at_a_time(batch_server, smollm):
    client = openai.OpenAI(base_url=f"{batch_server}/v1", api_key="none", max_retries=0, timeout=300)
    sequential = [ask(client, i, stream=False) for i in range(len(PROMPTS))]
    assert [text for text, _, _ in sequential] == [lone(smollm, i) for i in range(len(PROMPTS))]
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(client, i, stream=i != 3)))
               for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [results[i] for i in range(len(PROMPTS))] == sequential
    steps = next(int(line.split()[-1]) for line in httpx.get(f"{batch_server}/metrics").text.splitlines()
                 if line.startswith("tachy_batch_steps_total"))
    assert steps > 0
