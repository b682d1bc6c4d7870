"""SCOPE on tiny random models: the prompt part is the wrapped press's, untouched while decoding; the generated
tokens stay within their budget however long the generation; budgets that cover everything change nothing;
speculative decoding gives plain decoding's tokens; option errors are clear."""
from __future__ import annotations

import pytest
import torch

from tachy import Engine, GenerationConfig, GenerationStats, InvalidArgumentError, UnknownNameError
from tachy.presses import make_press
from tests.conftest import tiny_model
from tests.presses.test_presses import PROMPT, prefilled, prompt_ids

STRATEGIES = ["slide", "adaptive", "discontinuous"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").float()


def engine_for(arch: str) -> Engine:
    return Engine(tiny_model(arch, max_seq_len=512).float(), tokenizer=None, name="tiny")


def repetitive(n: int = 70) -> list[int]:
    return (prompt_ids(12, seed=1) * 8)[:n]


def generate(engine, ids, press, max_new_tokens, drafter=None):
    """(tokens, kv_bytes after each step, stats, the cache the press decoded on)."""
    caches = []
    if press is not None and not isinstance(press, str):
        start = press.start_decoding
        press.start_decoding = lambda cache: (caches.append((cache, cache.k.clone(), cache.length)),
                                              start(cache))[1]
    stats, held, tokens = GenerationStats(), [], []
    config = GenerationConfig(max_new_tokens=max_new_tokens, drafter=drafter, press=press)
    for step in engine.generate_tokens(ids, config, stats):
        held.append(stats.kv_bytes)
        tokens.extend(step.tokens)
    return tokens, held, stats, caches[-1] if caches else None


@torch.inference_mode()
def test_prefill_part_is_exactly_the_wrapped_press(llama):
    for prefill in ("snapkv", "pyramidkv", "h2o"):
        scope = make_press(f"scope:prefill={prefill}", 0.5)
        cache, _ = prefilled(llama, scope, prompt_ids())
        alone = make_press(prefill, 0.5)
        alone.adopt_queries(scope.collected)
        other = cache.clone()
        scope.apply(cache)
        alone.apply(other)
        assert cache.length == other.length < PROMPT
        for a, b in [(cache.k, other.k), (cache.v, other.v), (cache.valid, other.valid),
                     (cache.slot_pos, other.slot_pos)]:
            assert torch.equal(a[..., :cache.length, ...] if a.dim() == 5 else a[..., :cache.length],
                               b[..., :cache.length, ...] if b.dim() == 5 else b[..., :cache.length])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_cache_stays_within_budget_over_a_long_generation(arch, strategy):
    engine = engine_for(arch)
    cfg = engine.model.config
    per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4
    ids = prompt_ids(70)
    press = make_press(f"scope:decode_budget=16,recent=6,delta=4,strategy={strategy}", 0.5)
    tokens, held, stats, (cache, k0, start) = generate(engine, ids, press, 150)
    assert len(tokens) == 150
    assert start == round(69 * 0.5) + 1                    # the compressed prompt and its last token
    bound = (start + 16 + press.interval) * per_token
    assert max(held) <= bound < stats.kv_full_bytes / 3
    assert torch.equal(cache.k[:, :, :, :start], k0[:, :, :, :start])   # the prompt part is never touched
    assert cache.length - start <= 16 + press.interval
    positions = cache.slot_pos[:, 0, :, start:cache.length]
    newest = cache.position - 1                            # the last fed token
    assert (positions[..., -6:] == torch.arange(newest - 5, newest + 1)).all()   # the recent window is kept
    assert (positions[..., 1:] > positions[..., :-1]).all()                      # slot order is position order
    # 149 tokens fed: adaptive's budget (6 recent + one heavy hitter per 4 tokens) reached 16 long ago
    assert 16 <= cache.length - start <= 16 + press.interval


@torch.inference_mode()
def test_selection_keeps_the_recent_window_and_the_most_attended_older_tokens(llama):
    press = make_press("scope:decode_budget=10,recent=4", 0.5)
    cache, _ = prefilled(llama, press, prompt_ids())
    press.apply(cache)
    llama(torch.tensor([[5]]), torch.tensor([PROMPT]), cache)       # the prompt's last token
    eviction = press.start_decoding(cache)
    start = cache.length
    for step in range(20):
        llama(torch.tensor([[(7 * step) % 100]]), torch.tensor([PROMPT + 1 + step]), cache)
        eviction.committed([0])
    saved = {layer: list(q) for layer, q in press._decoded.items()}
    scores = press.accumulated(cache)                                   # [L, 1, Hkv, 20]
    press._decoded = saved
    before = cache.slot_pos[:, 0, :, start:cache.length].clone()
    press.evict_while_decoding(cache, start + 10)
    assert cache.length == start + 10
    kept = cache.slot_pos[:, 0, :, start:cache.length]
    for layer in range(cache.shape[0]):
        for head in range(cache.shape[2]):
            positions = before[layer, head].tolist()
            chosen = [positions.index(p) for p in kept[layer, head].tolist()]
            assert chosen[-4:] == [16, 17, 18, 19]                      # the 4 newest
            older = chosen[:-4]
            dropped = sorted(set(range(16)) - set(older))
            s = scores[layer, 0, head]
            assert len(older) == 6 and s[older].min() >= s[dropped].max()
    assert torch.allclose(press._scores, scores.gather(-1, torch.stack(
        [torch.stack([torch.tensor([before[l, h].tolist().index(p) for p in kept[l, h].tolist()])
                      for h in range(cache.shape[2])]) for l in range(cache.shape[0])])[:, None]))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_budgets_covering_everything_give_the_uncompressed_tokens(arch):
    engine = engine_for(arch)
    ids = prompt_ids(70)
    plain, _, _, _ = generate(engine, ids, None, 40)
    whole, held, stats, _ = generate(engine, ids, make_press("scope:decode_budget=64", 0.0), 40)
    assert whole == plain and held[-1] == stats.kv_full_bytes
    snap, _, _, _ = generate(engine, ids, make_press("snapkv", 0.5), 40)
    scoped, _, _, _ = generate(engine, ids, make_press("scope:decode_budget=64,strategy=discontinuous", 0.5), 40)
    assert scoped == snap


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("strategy,interval", [("slide", 4), ("adaptive", 3), ("discontinuous", 8)])
def test_speculative_greedy_equals_plain_greedy_while_evicting(arch, strategy, interval):
    """Drafts stop at the next selection and only committed rows' queries are scored, so prompt lookup and the
    self-draft (partly rejected drafts, rollbacks) give plain decoding's tokens."""
    engine = engine_for(arch)
    ids = repetitive()
    outs, accepted = {}, 0
    for drafter in (None, "pld", "default"):
        press = make_press(f"scope:decode_budget=12,recent=4,delta=3,interval={interval},strategy={strategy}", 0.5)
        evictions = []
        evict = press.evict_while_decoding
        press.evict_while_decoding = lambda cache, budget: (evictions.append(cache.position), evict(cache, budget))
        tokens, _, stats, _ = generate(engine, ids, press, 60, drafter)
        outs[drafter] = (tokens, evictions)
        accepted += stats.accepted
    assert outs[None] == outs["pld"] == outs["default"] and len(outs[None][0]) == 60
    assert len(outs[None][1]) >= 3 and accepted > 0      # it did evict, and drafts were accepted


def test_option_errors_are_clear():
    p = make_press("scope:decode_budget=64,strategy=discontinuous", 0.5)
    assert (p.recent, p.interval, p.evict_every, p.query_window) == (32, 16, 16, 32)
    assert make_press("scope:prefill=h2o", 0.5).query_window == -1
    inner = make_press("scope:prefill=snapkv:window=64,decode_budget=32", 0.5)._prefill_press
    assert (inner.name, inner.window, inner.compression_ratio) == ("snapkv", 64, 0.5)
    config = GenerationConfig(press="scope:decode_budget=64,strategy=adaptive", compression_ratio=0.5)
    assert (config.press.name, config.press.decode_budget, config.press.strategy) == ("scope", 64, "adaptive")
    cases = {"scope:strategy=fast": "strategy must be one of slide, adaptive, discontinuous",
             "scope:decode_budget=0": "decode_budget must be a whole number >= 1",
             "scope:decode_budget=8,recent=9": "recent .9. cannot exceed decode_budget .8.",
             "scope:interval=0": "interval must be",
             "scope:delta=1.5": "delta must be",
             "scope:prefill=streaming_llm:evict_every=4": "prefill must be one evicting prompt press",
             "scope+kivi4": "scope evicts while decoding and cannot be composed",
             "scope:window=4": "unexpected keyword"}
    for spec, message in cases.items():
        with pytest.raises(InvalidArgumentError, match=message):
            make_press(spec, 0.5)
    with pytest.raises(InvalidArgumentError, match="prefill must be one evicting"):
        make_press("scope:prefill=kivi4", 0.0)
    with pytest.raises(UnknownNameError):
        make_press("scope:prefill=nope", 0.5)
    with pytest.raises(InvalidArgumentError):
        GenerationConfig(press="scope:recent=-1", compression_ratio=0.5)


def test_grouped_attention_is_window_attention():
    from tachy.presses.base import window_attention
    from tachy.presses.scope import grouped_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 5, 8, generator=g), torch.randn(1, 2, 11, 8, generator=g)
    grouped = grouped_attention(q, k).view(1, 2, 3, 5, 11).reshape(1, 6, 5, 11)
    torch.testing.assert_close(grouped, window_attention(q, k))
    valid = torch.ones(1, 2, 11, dtype=torch.bool)
    valid[0, 1, 2] = False
    hidden = grouped_attention(q, k, valid)
    assert (hidden[0, 1, :, 2] == 0).all() and (hidden[0, 0, :, 2] > 0).all()
    torch.testing.assert_close(hidden.sum(-1), torch.ones(1, 2, 15))


def test_evict_after_moves_the_kept_slots_down_and_leaves_the_earlier_ones():
    from tachy.cache import KVCache

    cache = KVCache(2, 2, 4, capacity=32)
    cache.k.normal_()
    cache.v.normal_()
    cache.length = cache.position = 20
    k, v = cache.k.clone(), cache.v.clone()
    kept = torch.tensor([[12, 15, 19], [10, 11, 18]]).expand(2, 1, 2, 3)
    cache.evict_after(10, kept)
    assert cache.length == 13 and cache.position == 20
    assert torch.equal(cache.k[:, :, :, :10], k[:, :, :, :10]) and torch.equal(cache.v[:, :, :, :10], v[:, :, :, :10])
    for head, slots in enumerate([[12, 15, 19], [10, 11, 18]]):
        assert torch.equal(cache.k[:, :, head, 10:13], k[:, :, head, slots])
        assert torch.equal(cache.v[:, :, head, 10:13], v[:, :, head, slots])
        assert cache.slot_pos[0, 0, head, :13].tolist() == list(range(10)) + slots
    assert cache.valid[..., :13].all() and not cache.valid[..., 13:20].any()


def test_an_all_recent_budget_is_a_sliding_window_over_the_generated_tokens():
    """recent == decode_budget: no scoring (no observer: a plain cache keeps the C forward), the newest slots."""
    engine = engine_for("llama")
    press = make_press("scope:decode_budget=8,recent=8,interval=4", 0.0)
    assert not press.scoring
    tokens, held, stats, (cache, _, start) = generate(engine, prompt_ids(40), press, 50)
    assert cache.observer is None and len(tokens) == 50
    newest = cache.position - 1
    assert cache.slot_pos[0, 0, 0, start:cache.length].tolist() == list(range(newest - (cache.length - start) + 1,
                                                                               newest + 1))
    assert 8 <= cache.length - start <= 12


@torch.inference_mode()
def test_sliding_layers_score_what_their_queries_see_and_drop_what_they_never_read_again():
    """Gemma 3's sliding layers (window 8 in the tiny model): a query's attention is spread over the slots it saw
    (checked one query and head at a time, on a sliding and on the global layer), and at selection
    the slots the next query cannot see go first, so every slot still inside the window is kept."""
    model = tiny_model("gemma3").float()
    press = make_press("scope:decode_budget=10,recent=2", 0.5)
    cache, _ = prefilled(model, press, prompt_ids())
    press.apply(cache)
    model(torch.tensor([[5]]), torch.tensor([PROMPT]), cache)
    eviction = press.start_decoding(cache)
    start = cache.length
    for step in range(20):
        model(torch.tensor([[(7 * step) % 100]]), torch.tensor([PROMPT + 1 + step]), cache)
        eviction.committed([0])
    assert press._windows == [8] * 5 + [None]
    saved = {layer: list(q) for layer, q in press._decoded.items()}
    scores = press.accumulated(cache)
    press._decoded = saved
    S, H, Hkv = cache.length, model.config.num_heads, cache.shape[2]
    for layer, window in [(0, 8), (5, None)]:   # one query and one head at a time
        q, k = torch.cat(saved[layer], dim=2)[0], cache.k[layer, 0, :, :S]
        pos, valid = cache.slot_pos[layer, 0, :, :S], cache.valid[layer, 0, :, :S]
        expect = torch.zeros(Hkv, S - start)
        for i in range(20):
            for h in range(H):
                kv = h // (H // Hkv)
                seen = valid[kv] & (torch.arange(S) <= start + i)
                if window is not None:
                    seen &= PROMPT + 1 + i - pos[kv] < window
                attn = (q[h, i] @ k[kv].T).masked_fill(~seen, float("-inf")).softmax(-1)
                expect[kv] += attn[start:] / (H // Hkv)
        torch.testing.assert_close(scores[layer, 0], expect)
    press.evict_while_decoding(cache, start + 10)
    for layer in range(5):
        for head in range(cache.shape[2]):
            kept = cache.slot_pos[layer, 0, head, start:cache.length].tolist()
            assert set(range(PROMPT + 1 + 20 - 7, PROMPT + 1 + 20)) <= set(kept)   # all the next query sees
