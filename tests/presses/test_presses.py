"""Every registered press on tiny random models: exact budgets, protected slots, ratio 0 is lossless, the
compressed cache decodes like a masked full cache, and speculative decoding stays exact under a press."""
from __future__ import annotations

import pytest
import torch

from tachy import GenerationConfig, InvalidArgumentError, UnknownNameError
from tachy import Engine, GenerationStats
from tachy.presses import PRESSES, Press, available_presses, make_press
from tachy.presses.base import ragged
from tachy.presses.pyramidkv import pyramid_budgets
from tests.conftest import tiny_model

PROMPT = 60
EVICTING = [n for n in available_presses() if PRESSES[n].evicts]   # quantizing presses: tests/presses/test_kivi.py


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").float()


def prompt_ids(n: int = PROMPT, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (n,), generator=g).tolist()


def prefilled(model, press, ids, capacity=128):
    press.prepare(model)
    cache = model.new_cache(capacity=capacity, fixed=True)
    with press.observing(cache):
        logits = model(torch.tensor([ids]), torch.arange(len(ids)), cache)
    return cache, logits


def kept_positions(cache, layer=0, head=0) -> list[int]:
    valid = cache.valid[layer, 0, head, :cache.length]
    return cache.slot_pos[layer, 0, head, :cache.length][valid].tolist()


@pytest.mark.parametrize("name", EVICTING)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
@torch.inference_mode()
def test_press_keeps_exactly_its_budget(llama, name, ratio):
    press = make_press(name, ratio)
    cache, _ = prefilled(llama, press, prompt_ids())
    press.apply(cache)
    held = cache.valid[:, 0, :, :cache.length].sum(-1)          # [layers, kv_heads]
    budget = round(PROMPT * (1 - ratio))
    layers, heads = llama.config.num_layers, llama.config.num_kv_heads
    if name == "pyramidkv":
        assert int(held[:, 0].sum()) == budget * layers
        assert held[0, 0] >= held[-1, 0]                          # bottom layers keep more
    elif name == "ems":                                           # head-wise: each layer's total is exact
        assert held.sum(1).eq(budget * heads).all(), held
    elif name == "razor":   # protected heads keep all; the rest share the remainder (floor division)
        protected = held.eq(PROMPT)
        assert 1 <= int(protected.sum()) < layers * heads
        assert budget * layers * heads - layers * heads <= int(held.sum()) <= budget * layers * heads \
            or int(held[~protected].max()) == 4 + 1 + 16              # budget unreachable: minimal window
    elif name == "headkv":  # retrieval heads keep all; the rest share the remainder, at least sinks + window
        protected = held.eq(PROMPT)
        assert 1 <= int(protected.sum()) < layers * heads
        assert int(held.sum()) == budget * layers * heads or held[~protected].eq(4 + 32).all()
    else:
        assert held.eq(budget).all(), held
    assert cache.nbytes == int(held.sum()) * llama.config.head_dim * 4 * 2
    assert cache.position == PROMPT and cache.length == int(held.max())
    for layer in range(llama.config.num_layers):  # kept slots are distinct prompt positions, in order
        pos = kept_positions(cache, layer)
        assert pos == sorted(set(pos)) and all(0 <= p < PROMPT for p in pos)


@torch.inference_mode()
def test_streaming_llm_keeps_sinks_and_recent_window(llama):
    press = make_press("streaming_llm", 0.5)
    cache, _ = prefilled(llama, press, prompt_ids())
    press.apply(cache)
    assert kept_positions(cache) == [0, 1, 2, 3] + list(range(PROMPT - 26, PROMPT))


@pytest.mark.parametrize("name", ["snapkv", "vatp", "pyramidkv", "headkv"])
@torch.inference_mode()
def test_window_presses_never_drop_the_observation_window(llama, name):
    press = make_press(name, 0.5, window=8)
    cache, _ = prefilled(llama, press, prompt_ids())
    press.apply(cache)
    for layer in range(llama.config.num_layers):
        for head in range(llama.config.num_kv_heads):
            kept = kept_positions(cache, layer, head)
            assert set(range(PROMPT - min(8, len(kept)), PROMPT)) <= set(kept)


@torch.inference_mode()
def test_h2o_keeps_its_recent_share(llama):
    press = make_press("h2o", 0.5)
    cache, _ = prefilled(llama, press, prompt_ids())
    press.apply(cache)
    assert set(range(PROMPT - 15, PROMPT)) <= set(kept_positions(cache, 1, 1))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", EVICTING)
@torch.inference_mode()
def test_ratio_zero_decodes_bit_identically(arch, name):
    """A press at ratio 0 compacts nothing; the compressed-cache path (per-head masks, slot positions and
    Gemma's sliding window from them) must then give the uncompressed logits bit for bit."""
    model = tiny_model(arch).float()
    ids = prompt_ids(40)
    full, _ = prefilled(model, make_press("streaming_llm", 0.0), ids)
    press = make_press(name, 0.0)
    squeezed, _ = prefilled(model, press, ids)
    press.apply(squeezed)
    for step, tok in enumerate([3, 17, 42, 8]):
        pos = torch.tensor([40 + step])
        a = model(torch.tensor([[tok]]), pos, full)
        b = model(torch.tensor([[tok]]), pos, squeezed)
        assert torch.equal(a, b)


@torch.inference_mode()
def test_evicted_cache_decodes_like_the_full_cache_with_evicted_slots_masked(llama):
    ids = prompt_ids()
    press = make_press("streaming_llm", 0.5)
    cache, _ = prefilled(llama, press, ids)
    full = cache.clone()
    press.apply(cache)
    keep = torch.zeros(PROMPT + 1, dtype=torch.bool)
    keep[kept_positions(cache)] = True
    keep[PROMPT] = True
    a = llama(torch.tensor([[7]]), torch.tensor([PROMPT]), cache)
    b = llama(torch.tensor([[7]]), torch.tensor([PROMPT]), full, mask=keep[None])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "streaming_llm", "razor", "ems", "headkv"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_speculative_greedy_equals_plain_greedy_under_a_press(arch, name):
    """Rollback after rejected drafts and tree commits keep the compressed cache consistent: a repetitive
    prompt gives prompt lookup long drafts, partly rejected, and the output must equal plain decoding's."""
    engine = Engine(tiny_model(arch).float(), tokenizer=None, name="tiny")
    ids = (prompt_ids(12, seed=1) * 6)[:70]
    outs, accepted, held = {}, 0, []
    press = make_press(name, 0.5)
    apply = press.apply
    press.apply = lambda cache, memo=None: (apply(cache, memo), held.append(cache.nbytes))
    for drafter in (None, "pld", "default"):
        config = GenerationConfig(max_new_tokens=40, drafter=drafter, press=press)
        steps = list(engine.generate_tokens(ids, config))
        outs[drafter] = [t for s in steps for t in s.tokens]
        accepted += sum(s.accepted for s in steps)
    assert outs[None] == outs["pld"] == outs["default"]
    assert accepted > 0   # drafts were actually accepted (and others rolled back)
    cfg = engine.model.config
    kept = round((len(ids) - 1) * 0.5) * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 2
    assert held == [held[0]] * 3 and (held[0] == kept or name in ("razor", "headkv") and held[0] < 2 * kept)


def test_pyramid_budgets_sum_and_shape():
    b = pyramid_budgets(30, 1000, 500, 20.0)
    assert sum(b) == 30 * 500 and b == sorted(b, reverse=True) and b[0] <= 1000 and b[-1] >= 1
    b = pyramid_budgets(30, 1000, 900, 20.0)            # capped at the prompt length, total still exact
    assert sum(b) == 30 * 900 and max(b) == 1000


def test_unknown_press_lists_the_available_ones():
    with pytest.raises(UnknownNameError) as e:
        make_press("nope", 0.5)
    for name in PRESSES:
        assert name in str(e.value)
    with pytest.raises(UnknownNameError):
        GenerationConfig(press="nope", compression_ratio=0.5)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_zero_one_is_an_error(ratio):
    with pytest.raises(InvalidArgumentError):
        make_press("snapkv", ratio)
    with pytest.raises(InvalidArgumentError):
        GenerationConfig(press="snapkv", compression_ratio=ratio)
    with pytest.raises(InvalidArgumentError, match="needs a press"):
        GenerationConfig(compression_ratio=0.5)


@torch.inference_mode()
def test_razor_keeps_retrieval_heads_whole_and_compensates_the_others(llama):
    press = make_press("razor", 0.5)
    cache, _ = prefilled(llama, press, prompt_ids())
    full = cache.clone()
    press.apply(cache)
    held = cache.valid[:, 0, :, :cache.length].sum(-1)
    layer, head = (held < PROMPT).nonzero()[0].tolist()
    kept = kept_positions(cache, layer, head)
    window = len(kept) - 5
    assert kept[:4] == [0, 1, 2, 3] and kept[5:] == list(range(PROMPT - window, PROMPT))
    dropped = full.k[layer, 0, head, 4:PROMPT - window].mean(0)       # slot 4: the compensation token
    torch.testing.assert_close(cache.k[layer, 0, head, 4], dropped)
    torch.testing.assert_close(cache.v[layer, 0, head, 4], full.v[layer, 0, head, 4:PROMPT - window].mean(0))
    protected = (held == PROMPT).nonzero()[0].tolist()
    torch.testing.assert_close(cache.k[protected[0], 0, protected[1], :PROMPT], full.k[protected[0], 0, protected[1], :PROMPT])


@torch.inference_mode()
def test_headkv_keeps_retrieval_heads_whole_and_the_voted_tokens_of_the_others(llama):
    press = make_press("headkv", 0.4, window=8)
    cache, _ = prefilled(llama, press, prompt_ids())
    full = cache.clone()
    votes = [press.attention_votes(press.queries(i), full.k[i, :, :, :PROMPT])[0] for i in range(cache.shape[0])]
    press.apply(cache)
    layers, heads = llama.config.num_layers, llama.config.num_kv_heads
    held = cache.valid[:, 0, :, :cache.length].sum(-1)
    protected = held.eq(PROMPT)
    assert protected.tolist() == press._protected.tolist() and 1 <= int(protected.sum()) < layers * heads
    assert int(held.sum()) == round(PROMPT * 0.6) * layers * heads          # the budget, exactly
    assert int(held[~protected].max()) - int(held[~protected].min()) <= 1    # the rest shared evenly
    layer, head = (~protected).nonzero()[0].tolist()
    kept = kept_positions(cache, layer, head)
    assert kept[:4] == [0, 1, 2, 3] and kept[-8:] == list(range(PROMPT - 8, PROMPT))
    dropped = sorted(set(range(4, PROMPT - 8)) - set(kept))   # between sinks and window: the most voted survive
    assert len(dropped) and votes[layer][head, kept[4:-8]].min() >= votes[layer][head, dropped].max()
    p_layer, p_head = protected.nonzero()[0].tolist()
    torch.testing.assert_close(cache.k[p_layer, 0, p_head, :PROMPT], full.k[p_layer, 0, p_head, :PROMPT])


def test_ems_merge_folds_evicted_tokens_into_their_nearest_kept_token():
    from tachy.presses.ems import merge

    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    v = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    w = torch.tensor([1.0, 1.0, 1.0, 3.0])
    kept = torch.tensor([True, True, False, False])
    merge(k, v, w, kept, torch.ones(4, dtype=torch.bool))
    assert v[0].item() == pytest.approx((1 + 3) / 2) and v[1].item() == pytest.approx((2 + 3 * 4) / 4)
    torch.testing.assert_close(k[1], torch.tensor([0.3 / 4, 3.7 / 4]))


@torch.inference_mode()
def test_razor_protects_only_full_attention_layers_on_gemma():
    model = tiny_model("gemma3").float()
    press = make_press("razor", 0.5)
    cache, _ = prefilled(model, press, prompt_ids())
    press.apply(cache)
    held = cache.valid[:, 0, 0, :cache.length].sum(-1)
    assert held.tolist() == [held[0].item()] * 5 + [PROMPT]        # layer 5 is the only full-attention layer


class RaggedPress(Press):
    """Head h of layer l keeps every (h + l + 2)-th slot: a different budget per head and per layer."""

    def compress(self, cache, layer, queries, keys, values, memo=None):
        S = keys.shape[2]
        return ragged([torch.arange(S - 1, -1, -(h + layer + 2)).flip(0) for h in range(keys.shape[1])])


@pytest.mark.parametrize("name,kwargs", [("ragged", {}), ("ems", {"merging": False}), ("pyramidkv", {})])
@torch.inference_mode()
def test_headwise_compaction_decodes_like_the_full_cache_with_per_head_masks(llama, name, kwargs):
    """Compacted ragged budgets must equal the uncompacted cache with the evicted entries masked per head."""
    ids = prompt_ids()
    press = RaggedPress(0.5) if name == "ragged" else make_press(name, 0.5, **kwargs)
    cache, _ = prefilled(llama, press, ids)
    full = cache.clone()
    press.apply(cache)
    L, _, H, _ = cache.shape
    full.valid = torch.zeros(L, 1, H, full.capacity, dtype=torch.bool)
    full.slot_pos = torch.arange(full.capacity).expand(L, 1, H, -1).clone()
    for layer in range(L):
        for head in range(H):
            full.valid[layer, 0, head, kept_positions(cache, layer, head)] = True
    held = cache.valid[:, 0, :, :cache.length].sum(-1)
    assert name != "ragged" or held[0].tolist() == [30, 20] and held[2].tolist() == [15, 12]
    for step, tok in enumerate([7, 9]):
        a = llama(torch.tensor([[tok]]), torch.tensor([PROMPT + step]), cache)
        b = llama(torch.tensor([[tok]]), torch.tensor([PROMPT + step]), full)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generation_stats_report_the_kv_bytes_held():
    """GenerationStats carries what the cache holds after the press, next to what a plain cache would hold."""
    engine = Engine(tiny_model("llama").float(), tokenizer=None, name="tiny")
    cfg = engine.model.config
    per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4      # float32 K and V
    ids, held = prompt_ids(), {}
    for press in (None, make_press("snapkv", 0.5)):
        stats = GenerationStats()
        steps = list(engine.generate_tokens(ids, GenerationConfig(max_new_tokens=10, press=press), stats))
        cached = len(ids) + sum(len(s.tokens) for s in steps) - 1                 # the last token is not fed
        assert stats.kv_full_bytes == cached * per_token
        held[press is None] = stats.kv_bytes
    assert held[True] == (len(ids) + 9) * per_token
    kept = round((len(ids) - 1) * 0.5) + 1 + 9      # half the prompt but its last token, then every new token
    assert held[False] == kept * per_token


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streaming_llm_evicting_while_decoding_bounds_the_cache_and_stays_exact(arch):
    """With evict_every the cache is cut back to its post-prefill size every 8 new slots: memory stays bounded,
    and plain and speculative decoding (drafts stop at the next eviction) give the same tokens."""
    engine = Engine(tiny_model(arch).float(), tokenizer=None, name="tiny")
    cfg = engine.model.config
    per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4
    ids = (prompt_ids(12, seed=1) * 6)[:70]
    press = make_press("streaming_llm:evict_every=8", 0.5)
    budget = round(69 * 0.5) + 1                       # the compressed prompt and its last token
    outs, accepted = {}, 0
    for drafter in (None, "pld", "default"):
        stats, held = GenerationStats(), []
        for step in engine.generate_tokens(ids, GenerationConfig(max_new_tokens=40, drafter=drafter, press=press),
                                           stats):
            held.append(stats.kv_bytes)
            outs.setdefault(drafter, []).extend(step.tokens)
        accepted += stats.accepted
        assert max(held) <= (budget + 8) * per_token < stats.kv_full_bytes
        assert min(held[1:]) >= budget * per_token
    assert outs[None] == outs["pld"] == outs["default"] and len(outs[None]) == 40
    assert accepted > 0


@torch.inference_mode()
def test_streaming_llm_eviction_while_decoding_keeps_sinks_and_the_newest_tokens(llama):
    press = make_press("streaming_llm", 0.5, evict_every=4)
    cache, _ = prefilled(llama, press, prompt_ids())
    press.apply(cache)
    budget = cache.length                             # 30: 4 sinks + the 26 newest prompt tokens
    for step, tok in enumerate([5, 6, 7, 8, 9]):
        llama(torch.tensor([[tok]]), torch.tensor([PROMPT + step]), cache)
    press.evict_while_decoding(cache, budget)
    assert cache.length == budget and cache.position == PROMPT + 5
    assert kept_positions(cache, 1, 1) == [0, 1, 2, 3] + list(range(PROMPT + 5 - 26, PROMPT + 5))


def test_press_options_in_the_name_and_their_errors():
    assert make_press("streaming_llm:evict_every=64", 0.5).evict_every == 64
    with pytest.raises(InvalidArgumentError):
        make_press("streaming_llm:evict_every=-1", 0.5)
    with pytest.raises(InvalidArgumentError, match="nope"):
        make_press("snapkv:nope=1", 0.5)
    with pytest.raises(InvalidArgumentError, match="single press"):
        make_press("snapkv+kivi4:window=8", 0.5)
