"""Continuous batching (tachy.batch): a request decoded inside a batch gives what it gives decoded alone."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tachy.batch import BatchDecoder, batchable
from tachy import GenerationConfig
from tachy.errors import InvalidArgumentError
from tests.decoding.helpers import tiny_engine


def alone(engine, prompt, config):
    """(token ids, text, finish_reason) of a lone plain generation."""
    config = dataclasses.replace(config, drafter=None)
    pieces = list(engine.stream(prompt, config))
    return [t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), pieces[-1].finish_reason


def batched(engine, requests, max_batch):
    """Run ``requests`` = [(prompt, config, join_step)] through one BatchDecoder; a request joins at its step
    (or later, when a row is free). Returns per request (token ids, text, finish_reason) and the batch sizes."""
    decoder = BatchDecoder(engine, max_batch)
    out = {i: ([], [], None) for i in range(len(requests))}
    todo = sorted(range(len(requests)), key=lambda i: requests[i][2])
    sizes, step = [], 0

    def take(events):
        for row, piece in events:
            ids, text, _ = out[row.tag]
            out[row.tag] = (ids + piece.token_ids, text + [piece.text], piece.finish_reason)

    while todo or decoder.rows:
        while todo and requests[todo[0]][2] <= step and decoder.free:
            i = todo.pop(0)
            take(decoder.add(requests[i][0], requests[i][1], tag=i))
        sizes.append(len(decoder.rows))
        take(decoder.step())
        step += 1
    return [(ids, "".join(text), finish) for ids, text, finish in out.values()], sizes


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_greedy_equals_alone_tiny(arch):
    """Rows joining and leaving at different steps, prompts long enough to cross a key bucket (64) and
    Gemma 3's sliding window (8); max_seq_len 128 also ends some rows at the context window."""
    engine, _ = tiny_engine(seed=1, arch=arch, eos=(3,))
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    requests = []
    for i in range(10):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 80))]
        config = GenerationConfig(max_new_tokens=rng.randint(1, 60), ignore_eos=i % 3 != 0,
                                  stop=["7 1"] if i == 4 else [])
        requests.append((prompt, config, rng.randint(0, 12)))
    got, sizes = batched(engine, requests, max_batch=4)
    assert max(sizes) == 4 and min(sizes[:-1]) >= 1
    for (prompt, config, _), result in zip(requests, got):
        assert result == alone(engine, prompt, config), f"{arch}: prompt {prompt}"


def test_batched_sampling_and_penalties_tiny():
    """Seeded sampling rows and penalty processors reproduce the lone plain generation."""
    engine, _ = tiny_engine(seed=2, eos=(3,))
    rng = random.Random(1)
    requests = []
    for i in range(6):
        prompt = [rng.randrange(4, 101) for _ in range(rng.randint(2, 40))]
        config = GenerationConfig(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True,
                                  repetition_penalty=1.3 if i % 2 else 1.0, top_k=20 if i == 3 else 0)
        requests.append((prompt, config, i))
    requests.append(([5, 6, 7], GenerationConfig(max_new_tokens=20, presence_penalty=1.0, ignore_eos=True), 2))
    got, _ = batched(engine, requests, max_batch=3)
    for (prompt, config, _), result in zip(requests, got):
        assert result == alone(engine, prompt, config)


def test_remove_frees_the_row_and_rejects():
    engine, _ = tiny_engine(seed=0)
    decoder = BatchDecoder(engine, max_batch=1)
    decoder.add([5, 6], GenerationConfig(max_new_tokens=50, ignore_eos=True), tag="a")
    assert decoder.free == 0
    with pytest.raises(InvalidArgumentError):
        decoder.add([5, 6], GenerationConfig(max_new_tokens=5), tag="b")
    decoder.remove(decoder.rows[0])
    assert decoder.free == 1 and decoder.step() == []
    decoder.add([9, 8, 7], GenerationConfig(max_new_tokens=5, ignore_eos=True), tag="c")
    assert decoder.rows[0].slot == 0
    assert not batchable(GenerationConfig(strategy="beam"))
    assert not batchable(GenerationConfig(prediction=[1, 2]))
    assert batchable(GenerationConfig(temperature=0.7, drafter="default"))


@pytest.mark.slow
def test_batched_greedy_equals_alone_smollm(smollm, one_torch_thread):
    """bf16 SmolLM2 (the engine's default): 12 chat prompts, 6 rows, joins at different steps, token for
    token equal to each prompt decoded alone; one prompt is long enough for a second key bucket."""
    from tests.conftest import DATA
    import json

    lines = [json.loads(x) for x in (DATA / "vicuna_bench.jsonl").read_text().splitlines()[:12]]
    rng = random.Random(3)
    requests = []
    for i, item in enumerate(lines):
        text = item.get("prompt") or item.get("turns", [""])[0]
        if i == 5:
            text = text * 4
        prompt = smollm.chat_prompt([{"role": "user", "content": text}])
        config = GenerationConfig(max_new_tokens=rng.randint(8, 40), stop=["\n\n"] if i == 7 else [])
        requests.append((prompt, config, rng.randint(0, 20)))
    got, sizes = batched(smollm, requests, max_batch=6)
    assert max(sizes) == 6
    for (prompt, config, _), result in zip(requests, got):
        assert result == alone(smollm, prompt, config)
