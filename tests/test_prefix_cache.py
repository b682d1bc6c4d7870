"""The prefix cache (tachy.prefix_cache): a hit gives the cold prefill's logits bit for bit, the budget holds,
and pinned blocks survive eviction."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tachy import GenerationConfig
from tachy.batch import BatchDecoder
from tachy.errors import InvalidArgumentError
from tachy.prefix_cache import BLOCK_TOKENS, PrefixCache
from tests.test_batch import repetitive_prompt

LAYERS, HEADS, DIM = 2, 1, 4


def packed_engine(arch: str, seed: int):
    """A tiny model on the C forward, with a context window long enough for several blocks."""
    from tachy.engine import Engine
    from tests.conftest import tiny_gguf_model
    from tests.decoding.helpers import IdsTokenizer

    model = tiny_gguf_model(arch, seed=seed, max_seq_len=1024)
    if model.cpu_forward is None:
        pytest.skip("tachy's C kernels do not run on this machine")
    return Engine(model, IdsTokenizer([3]), name="tiny")


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYERS, HEADS, tokens, DIM, generator=g),
            torch.randn(LAYERS, HEADS, tokens, DIM, generator=g))


BLOCK_BYTES = 2 * LAYERS * HEADS * BLOCK_TOKENS * DIM * 4


def test_store_then_load_copies_whole_blocks_only():
    cache = PrefixCache(100 * BLOCK_BYTES)
    ids = list(range(1000, 1000 + 2 * BLOCK_TOKENS + 10))
    k, v = kv(len(ids))
    assert cache.store(ids, k, v) == 2                # the last 10 tokens make no whole block
    assert cache.store(ids, k, v) == 0                # already there
    k2, v2 = torch.zeros(LAYERS, HEADS, 300, DIM), torch.zeros(LAYERS, HEADS, 300, DIM)
    other = ids[:BLOCK_TOKENS + 5] + [7] * 100        # shares the first block only
    assert cache.load(other, k2, v2) == BLOCK_TOKENS
    assert torch.equal(k2[:, :, :BLOCK_TOKENS], k[:, :, :BLOCK_TOKENS])
    assert torch.equal(v2[:, :, :BLOCK_TOKENS], v[:, :, :BLOCK_TOKENS])
    assert not k2[:, :, BLOCK_TOKENS:].any()
    assert cache.load(ids, k2, v2) == 2 * BLOCK_TOKENS
    assert torch.equal(k2[:, :, :2 * BLOCK_TOKENS], k[:, :, :2 * BLOCK_TOKENS])
    assert cache.load([5] + ids, k2, v2) == 0         # a block matches only at its own offset
    assert cache.load(ids, k2, v2, tag="quest") == 0  # other K/V: blocks of another tag never serve
    s = cache.stats
    assert (s.lookups, s.hits, s.reused_tokens) == (4, 2, 3 * BLOCK_TOKENS)


def test_budget_evicts_least_recently_used_leaves():
    cache = PrefixCache(3 * BLOCK_BYTES)
    a, b = [1] * (2 * BLOCK_TOKENS), [2] * (2 * BLOCK_TOKENS)
    cache.store(a, *kv(len(a)))
    cache.store(b, *kv(len(b), seed=1))               # 4 blocks > 3: a's leaf goes (a is older)
    assert cache.nbytes <= cache.max_bytes and cache.blocks == 3
    assert cache.stats.evicted_blocks == 1
    k, v = torch.zeros(LAYERS, HEADS, 200, DIM), torch.zeros(LAYERS, HEADS, 200, DIM)
    assert cache.load(a, k, v) == BLOCK_TOKENS        # its first block stayed: a parent outlives its leaf
    assert cache.load(b, k, v) == 2 * BLOCK_TOKENS


def test_eviction_never_frees_a_pinned_block():
    cache = PrefixCache(2 * BLOCK_BYTES)
    a = list(range(2 * BLOCK_TOKENS))
    cache.store(a, *kv(len(a)))
    hit = cache.match(a)                               # both blocks in use
    assert hit.tokens == 2 * BLOCK_TOKENS
    assert cache.store([9] * BLOCK_TOKENS, *kv(BLOCK_TOKENS)) == 0   # no room: nothing evicted, nothing added
    assert cache.blocks == 2 and cache.nbytes <= cache.max_bytes
    assert all(block.k is not None for block in hit.blocks)
    cache.release(hit)
    assert cache.store([9] * BLOCK_TOKENS, *kv(BLOCK_TOKENS)) == 1   # released: the LRU leaf makes room
    assert cache.nbytes <= cache.max_bytes


def test_a_budget_of_zero_is_a_clear_error(smollm):
    with pytest.raises(InvalidArgumentError, match="above 0"):
        PrefixCache(0)
    with pytest.raises(InvalidArgumentError, match="above 0"):
        smollm.set_prefix_cache(0)


def tokens(pieces) -> list[int]:
    return [t for p in pieces for t in p.token_ids]


def prefill_logits(engine, ids: list[int], prefix: PrefixCache | None) -> tuple[torch.Tensor, int]:
    cache = engine.model.new_cache(capacity=engine.cache_capacity(len(ids), 8), fixed=True)
    if prefix is not None:
        cache.length = cache.position = prefix.load(ids[:-1], cache.k[:, 0], cache.v[:, 0])
    reused = cache.length
    logits = engine._prefill(ids, cache)
    if prefix is not None:
        prefix.store(ids, cache.k[:, 0], cache.v[:, 0])
    return logits, reused


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_hit_gives_the_cold_prefill_logits_bit_for_bit(arch):
    engine = packed_engine(arch, seed=3)
    prefix = PrefixCache(1 << 26)
    rng = random.Random(0)
    base = [rng.randrange(4, engine.config.vocab_size) for _ in range(3 * BLOCK_TOKENS + 7)]
    prefill_logits(engine, base, prefix)
    for n in range(6):
        ids = base[:rng.randint(BLOCK_TOKENS + 1, len(base))] + [rng.randrange(4, 50) for _ in range(n * 9)]
        cold, _ = prefill_logits(engine, ids, None)
        warm, reused = prefill_logits(engine, ids, prefix)
        assert reused >= BLOCK_TOKENS
        assert torch.equal(cold, warm)


@pytest.mark.parametrize("drafter", ["none", "default", "pld"])
def test_next_turn_reuses_generated_tokens_and_keeps_the_output(drafter):
    """A generation stores its committed tokens (drafts verified or rejected along the way): the next prompt,
    which extends it, hits them, and its output equals the output without the cache."""
    engine = packed_engine("llama", seed=4)
    rng = random.Random(1)
    for i in range(4):
        prompt = repetitive_prompt(rng, engine.config.vocab_size) + list(range(5, 5 + BLOCK_TOKENS))
        config = GenerationConfig(max_new_tokens=80, ignore_eos=True, drafter=drafter)
        first = [t for p in engine.stream(prompt, config) for t in p.token_ids]
        turn2 = prompt + first + [rng.randrange(4, 50) for _ in range(5)]
        warm = list(engine.stream(turn2, config))
        cold = list(engine.stream(turn2, dataclasses.replace(config, prefix_cache=False)))
        assert tokens(warm) == tokens(cold)
        cached = warm[-1].stats.cached_tokens
        assert cached == (len(prompt) + len(first) - 1) // BLOCK_TOKENS * BLOCK_TOKENS
        assert cold[-1].stats.cached_tokens == 0


def test_batch_rows_share_a_prompt_prefix_and_keep_their_outputs():
    engine = packed_engine("gemma3", seed=5)
    rng = random.Random(2)
    system = [rng.randrange(4, engine.config.vocab_size) for _ in range(2 * BLOCK_TOKENS + 3)]
    prompts = [system + repetitive_prompt(rng, engine.config.vocab_size) for _ in range(5)]
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    decoder = BatchDecoder(engine, max_batch=3)
    out = {i: [] for i in range(len(prompts))}
    stats = {}
    todo = list(range(len(prompts)))
    while todo or decoder.rows:
        while todo and decoder.free:
            i = todo.pop(0)
            decoder.add(prompts[i], config, tag=i)
        for row, piece in decoder.step():
            out[row.tag] += piece.token_ids
            stats[row.tag] = piece.stats
    for i, prompt in enumerate(prompts):
        alone = [t for p in engine.stream(prompt, dataclasses.replace(config, prefix_cache=False))
                 for t in p.token_ids]
        assert out[i] == alone
    assert sum(s.cached_tokens > 0 for s in stats.values()) == len(prompts) - 1   # all but the first: rows
    # joining together wait for the first prompt's blocks instead of reading the same system prompt again


def test_a_press_neither_reads_nor_fills_the_cache(smollm):
    engine = smollm
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 30)
    before = engine.prefix_cache.stats.stored_blocks
    list(engine.stream(prompt, GenerationConfig(max_new_tokens=2)))
    stored = engine.prefix_cache.stats.stored_blocks
    assert stored > before
    pressed = list(engine.stream(prompt, GenerationConfig(max_new_tokens=2, press="snapkv",
                                                          compression_ratio=0.5)))
    assert pressed[-1].stats.cached_tokens == 0
    assert engine.prefix_cache.stats.stored_blocks == stored


def test_second_chat_turn_with_long_history_is_identical(smollm):
    """The real model: a 1k+-token conversation's next turn reuses its history, output unchanged."""
    engine = smollm
    history = [{"role": "user", "content": "Tell me about the sea. " * 170}]
    config = GenerationConfig(max_new_tokens=24)
    answer = engine.chat(history, config)
    turn2 = history + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Shorter."}]
    ids = engine.chat_prompt(turn2)
    assert len(ids) > 1000
    warm = list(engine.stream(ids, config))
    cold = list(engine.stream(ids, dataclasses.replace(config, prefix_cache=False)))
    assert tokens(warm) == tokens(cold)
    assert warm[-1].stats.cached_tokens >= 1000 - BLOCK_TOKENS


def test_under_sparse_attention_only_the_prompt_is_stored_and_the_output_holds():
    """Sparse attention prefills densely but decodes sparsely: the generated tokens' K/V differ from what a
    prefill of the next turn computes, so only the prompt's blocks are stored, and a hit keeps the output."""
    engine = packed_engine("llama", seed=6)
    rng = random.Random(7)
    prompt = [rng.randrange(4, engine.config.vocab_size) for _ in range(5 * BLOCK_TOKENS)]
    config = GenerationConfig(max_new_tokens=70, ignore_eos=True, drafter="none",
                              attention="quest:budget=64,window=32,sinks=16")
    first = [t for p in engine.stream(prompt, config) for t in p.token_ids]
    turn2 = prompt + first + [9, 10, 11]
    warm = list(engine.stream(turn2, config))
    cold = list(engine.stream(turn2, dataclasses.replace(config, prefix_cache=False)))
    assert tokens(warm) == tokens(cold)
    assert warm[-1].stats.cached_tokens == len(prompt)   # the prompt's blocks, none of the generated ones
