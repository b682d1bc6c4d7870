"""The C forward (models/cpu_forward.py, kernels/decoder.c) on tiny models with GGUF blocks.

It must compute the model (close to the PyTorch forward over the same blocks, and to transformers' float
model), and every token it computes must have the bits one-token decoding gives it: in a verify forward over a
chain or a tree, past a sliding window, and in a batch of sequences at different lengths.
"""
from __future__ import annotations

import random

import pytest
import torch

from tachy import kernels
from tachy.cache import BatchKVCache
from tests.conftest import hf_twin, tiny_config, tiny_gguf_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels unavailable")
ARCHS = ["llama", "qwen2", "gemma3"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def forward(model, tokens: list[int], cache, positions=None, mask=None) -> torch.Tensor:
    positions = torch.arange(cache.length, cache.length + len(tokens)) if positions is None else positions
    with torch.inference_mode():
        return model(torch.tensor([tokens]), positions, cache, mask)[0]


@pytest.fixture(autouse=True)
def attention_scores(attention_path):
    """Every test here runs with the fused multiply-adds and, where the CPU has AMX, with its tiles (decoder.c's
    amx_scores and amx_values: head dims that are multiples of 32, here gemma3's and the 64-wide shape)."""
    return attention_path


PASSAGE = ("It was a bright cold day in April, and the harbour was full of ships that had come in on the morning "
           "tide. The merchants stood on the quay and argued about the price of grain, while the sailors carried "
           "barrels and crates down the gangways. A young man in a blue coat watched them from the steps of the "
           "customs house. He had been at sea for three years, and he had not expected the town to look so small. "
           "His father had written that the old house by the church was empty now, and that the garden had gone "
           "wild. He thought of the letter as he walked up the hill, past the bakery and the school, and he "
           "wondered whether anyone would still remember his name.")


def test_amx_keeps_the_model_as_accurate(attention_scores, smollm):
    """On the embedded model the AMX path is taken (its bits differ from the fused multiply-adds': other
    summation orders) and predicts a passage as well: perplexity within 2.5% of the AVX-512 path's (1.2% on
    these 144 tokens; 0.1-0.2% on 1024-token passages of a novel). The kernels' own accuracy:
    tests/kernels/test_kernels.py; tiny random models attend almost uniformly and barely show it."""
    if attention_scores != "amx":
        pytest.skip("compares AMX with the fused multiply-adds")
    model = smollm.model
    if model.cpu_forward is None or model.config.head_dim % 32:
        pytest.skip("the embedded model runs the C forward with a head dim AMX takes")
    ids = smollm.tokenizer.encode(PASSAGE)

    def perplexity() -> tuple[torch.Tensor, float]:
        logits = forward(model, ids, model.new_cache(256)).float()
        return logits, torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp().item()

    amx, amx_ppl = perplexity()
    kernels.use_amx(False)
    fma, fma_ppl = perplexity()
    assert not torch.equal(amx, fma)
    assert abs(amx_ppl / fma_ppl - 1) < 0.025, (amx_ppl, fma_ppl)


@pytest.mark.parametrize("arch", ARCHS)
def test_it_computes_the_model(arch):
    model = tiny_gguf_model(arch, seed=3)
    assert model.cpu_forward is not None
    prompt = [random.Random(arch).randrange(model.config.vocab_size) for _ in range(40)]
    c_logits = forward(model, prompt, model.new_cache(64))
    saved, model.cpu_forward = model.cpu_forward, None     # the PyTorch forward over the same blocks
    torch_logits = forward(model, prompt, model.new_cache(64))
    model.cpu_forward = saved
    hf, _ = hf_twin(tiny_config(arch), 3)                   # the float model the blocks were quantized from
    with torch.inference_mode():
        hf_logits = hf(torch.tensor([prompt])).logits[0]
    assert rel(c_logits, torch_logits) < 3e-2
    assert rel(c_logits, hf_logits) < 6e-2
    assert (c_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean() > 0.9


def one_token_rows(model, prompt: list[int], path: list[int]) -> torch.Tensor:
    """Logits of each token of ``path`` decoded one at a time after ``prompt`` (a fresh cache)."""
    cache = model.new_cache(96, fixed=True)
    forward(model, prompt, cache)
    return torch.stack([forward(model, [t], cache)[0] for t in path])


# grouped_tokens' shapes: G query heads per kv head, so 16 // G tokens share each key (5 for SmolLM2's G=3)
CHUNK_SHAPES = [("llama", {}), ("qwen2", {}), ("gemma3", {}),
                ("llama", dict(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=288)),
                ("llama", dict(num_heads=2, num_kv_heads=2, head_dim=48)),
                ("gemma3", dict(num_heads=16, num_kv_heads=1, head_dim=16))]


def SHAPE_IDS(x) -> str:
    return x if isinstance(x, str) else "-".join(f"{k}{v}" for k, v in x.items()) or "default"


@pytest.mark.parametrize("arch,shape", CHUNK_SHAPES, ids=SHAPE_IDS)
def test_a_verify_chain_gives_one_token_decodings_bits(arch, shape):
    """Every shape grouped_tokens takes (decoder.c), also where the attention scale is not a power of two."""
    model = tiny_gguf_model(arch, seed=4, **shape)
    rng = random.Random(1)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(20)]   # gemma3's window is 8
    chain = [rng.randrange(model.config.vocab_size) for _ in range(17)]
    cache = model.new_cache(96, fixed=True)
    forward(model, prompt, cache)
    mask = torch.cat([torch.ones(17, 20, dtype=torch.bool), torch.ones(17, 17, dtype=torch.bool).tril()], dim=1)
    verify = forward(model, chain, cache, mask=mask)
    assert torch.equal(verify, one_token_rows(model, prompt, chain))


@pytest.mark.parametrize("arch,shape", CHUNK_SHAPES, ids=SHAPE_IDS)
def test_a_prompt_chunk_gives_one_token_decodings_bits(arch, shape):
    """A plain causal chunk reads its keys a block of tokens at a time (decoder.c's grouped_tokens: a horizontal
    sum network across tokens, where a block's own new keys are summed one by one); every token still gets
    the bits it gets decoded alone, from the first chunk and after a prefix, across gemma3's sliding window."""
    model = tiny_gguf_model(arch, seed=7, **shape)
    rng = random.Random(4)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(29)]
    whole = forward(model, tokens, model.new_cache(96, fixed=True))
    cache = model.new_cache(96, fixed=True)
    first = forward(model, tokens[:7], cache)
    rest = forward(model, tokens[7:], cache)
    step = model.new_cache(96, fixed=True)
    alone = torch.cat([forward(model, [t], step) for t in tokens])
    assert torch.equal(whole, alone)
    assert torch.equal(torch.cat([first, rest]), alone)


@pytest.mark.parametrize("arch,shape", CHUNK_SHAPES, ids=SHAPE_IDS)
def test_a_chunk_after_a_long_prefix_gives_one_token_decodings_bits(arch, shape):
    """Past 32 shared keys, a block of tokens' softmax goes straight into the value tiles (decoder.c's
    softmax_weights16, on AMX with 16 query rows: the 64-wide shape), in whole blocks of 32 keys and then the
    rest; every token keeps the bits it gets decoded alone."""
    model = tiny_gguf_model(arch, seed=9, max_seq_len=256, **shape)
    rng = random.Random(6)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(150)]
    cache = model.new_cache(160, fixed=True)
    forward(model, tokens[:100], cache)
    chunk = forward(model, tokens[100:], cache)   # 100-149 shared keys: 3-4 whole blocks, then a partial one
    step = model.new_cache(160, fixed=True)
    alone = torch.cat([forward(model, [t], step) for t in tokens])
    assert torch.equal(chunk, alone[100:])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_causal_mask_runs_as_a_plain_chunk(arch, monkeypatch):
    """A verify step's chain comes with a lower-triangular mask; the C forward drops it and takes its causal
    path (a run of tokens reads the cached keys once), with the same bits. A tree's mask stays."""
    from tachy.models.cpu_forward import CPUForward

    model = tiny_gguf_model(arch, seed=3)
    seen = []
    run = CPUForward._run
    monkeypatch.setattr(CPUForward, "_run", lambda self, cache, ids, pos, rows, slots, prefix, mask, *rest:
                        seen.append(mask) or run(self, cache, ids, pos, rows, slots, prefix, mask, *rest))
    rng = random.Random(3)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(40)]
    chain = [rng.randrange(model.config.vocab_size) for _ in range(9)]
    cache = model.new_cache(96, fixed=True)
    forward(model, prompt, cache)
    causal = torch.cat([torch.ones(9, 40, dtype=torch.bool), torch.ones(9, 9, dtype=torch.bool).tril()], dim=1)
    masked = forward(model, chain, cache, mask=causal)
    cache.rollback(9)
    plain = forward(model, chain, cache)
    assert seen[-2] is None and seen[-1] is None
    assert torch.equal(masked, plain)
    cache.rollback(9)
    tree = causal.clone()
    tree[5, 44] = False   # node 5 does not see node 4: a second branch
    forward(model, chain, cache, mask=tree)
    assert seen[-1] is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tree_node_gives_one_token_decodings_bits(arch):
    """Not only the leading chain: a side node reads its ancestors at scattered slots, in path order."""
    from tachy.speculative.tree import DraftTree

    model = tiny_gguf_model(arch, seed=5)
    rng = random.Random(2)
    V = model.config.vocab_size
    prompt = [rng.randrange(V) for _ in range(12)]
    tree = DraftTree.from_paths([[rng.randrange(V) for _ in range(5)], [rng.randrange(V) for _ in range(3)],
                                 [rng.randrange(V) for _ in range(4)]])
    tree = DraftTree(tree.tokens + [rng.randrange(V)], tree.parents + [len(tree.tokens) - 2])   # a deeper branch
    root = rng.randrange(V)
    cache = model.new_cache(96, fixed=True)
    forward(model, prompt, cache)
    n = len(tree)
    mask = torch.cat([torch.ones(n + 1, cache.length, dtype=torch.bool), tree.attention_mask()], dim=1)
    positions = cache.position + tree.position_offsets()
    verify = forward(model, [root] + tree.tokens, cache, positions=positions, mask=mask)
    for node in range(n):
        path, j = [], node
        while j >= 0:
            path.append(tree.tokens[j])
            j = tree.parents[j]
        rows = one_token_rows(model, prompt, [root] + path[::-1])
        assert torch.equal(verify[node + 1], rows[-1]), f"node {node} of {tree.parents}"
    assert torch.equal(verify[0], one_token_rows(model, prompt, [root])[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batch_gives_each_sequence_its_bits_alone(arch):
    model = tiny_gguf_model(arch, seed=6)
    rng = random.Random(3)
    V = model.config.vocab_size
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (5, 17, 11)]
    batch = BatchKVCache(model.config.num_layers, model.config.num_kv_heads, model.config.head_dim, 96,
                         batch=3, dtype=model.dtype)
    for row, prompt in enumerate(prompts):
        alone = model.new_cache(96, fixed=True)
        forward(model, prompt, alone)
        batch.load(row, alone)
    batch.rows = [2, 0, 1]
    steps = [[rng.randrange(V) for _ in range(3)] for _ in prompts]
    outs = []
    for s in range(3):
        tokens = torch.tensor([[steps[r][s]] for r in batch.rows])
        positions = torch.tensor([batch.lengths[r] for r in batch.rows])
        with torch.inference_mode():
            outs.append(model(tokens, positions, batch)[:, 0])
    for b, row in enumerate(batch.rows):
        expect = one_token_rows(model, prompts[row], steps[row])
        assert torch.equal(torch.stack([o[b] for o in outs]), expect), f"row {row}"
