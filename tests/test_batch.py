"""Continuous batching (tachy.batch): a request decoded inside a batch gives what it gives decoded alone."""
from __future__ import annotations

import dataclasses
import functools
import random

import pytest

from tachy.batch import BatchDecoder, StepCostFit, batchable
from tachy import GenerationConfig
from tachy.generation import Handoff
from tachy.errors import InvalidArgumentError
from tests.conftest import needs_data
from tests.decoding.helpers import tiny_engine


def alone(engine, prompt, config):
    """(token ids, text, finish_reason) of a lone plain generation."""
    config = dataclasses.replace(config, drafter=None)
    pieces = list(engine.stream(prompt, config))
    return [t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), pieces[-1].finish_reason


def batched(engine, requests, max_batch, packed=False):
    """Run ``requests`` = [(prompt, config, join_step)] through one BatchDecoder (plain rows unless ``packed``);
    a request joins at its step (or later, when a row is free). Returns per request (token ids, text,
    finish_reason) and the batch sizes."""
    decoder = BatchDecoder(engine, max_batch, packed=packed)
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
@needs_data
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


# -- packed mode: the C forward, rows that draft, prompts prefilled in chunks -----------------------------------
def packed_engine(arch: str, seed: int, **overrides):
    from tachy.engine import Engine
    from tests.conftest import tiny_gguf_model
    from tests.decoding.helpers import IdsTokenizer

    model = tiny_gguf_model(arch, seed=seed, **overrides)
    if model.cpu_forward is None:
        pytest.skip("tachy's C kernels do not run on this machine")
    return Engine(model, IdsTokenizer([3]), name="tiny")


def repetitive_prompt(rng: random.Random, vocab: int) -> list[int]:
    """Prompts that repeat themselves, so the model-free drafters find something to draft."""
    motif = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 9))]
    return (motif * 12)[:rng.randint(10, 90)]


def run_packed(engine, requests, max_batch: int, prefill_share: float = 0.5, **options):
    """Like ``batched``; also returns each request's last stats and how many steps each prompt's prefill
    took (steps from its join to its first token). ``options``: more BatchDecoder arguments."""
    decoder = BatchDecoder(engine, max_batch, prefill_share=prefill_share, **options)
    assert decoder.packed
    out = {i: ([], [], None, None) for i in range(len(requests))}
    joined, first = {}, {}
    todo = sorted(range(len(requests)), key=lambda i: requests[i][2])
    step = 0

    def take(events):
        for row, piece in events:
            ids, text, _, _ = out[row.tag]
            first.setdefault(row.tag, step)
            out[row.tag] = (ids + piece.token_ids, text + [piece.text], piece.finish_reason, piece.stats)

    while todo or decoder.rows:
        while todo and requests[todo[0]][2] <= step and decoder.free:
            i = todo.pop(0)
            joined[i] = step
            take(decoder.add(requests[i][0], requests[i][1], tag=i))
        take(decoder.step())
        step += 1
    results = [(ids, "".join(text), finish) for ids, text, finish, _ in out.values()]
    return results, [s for *_, s in out.values()], {i: first[i] - joined[i] for i in first}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_rows_draft_and_equal_alone(arch, monkeypatch):
    """Every drafter as a row (and a prediction), rows joining at different steps, prompts chunked into
    several forwards: each row's greedy tokens are its plain lone tokens, and drafts do get accepted."""
    engine = packed_engine(arch, seed=1)
    # chunk sizes from fixed step costs, not from this machine's timing (under load a measured prompt token
    # could look cheap enough that every prompt fits one chunk): a few tokens per chunk beside running rows
    engine._costs, engine._key_cost = [0.0] + [0.004 + 0.0005 * t for t in range(1, 65)], 0.0
    monkeypatch.setattr(BatchDecoder, "_observe_step", lambda *args: None)
    rng = random.Random(5)
    vocab = engine.config.vocab_size
    drafters = ["default", "sam", "pld", "recycling", "none", "lookahead", "trigram", "model-free", "gated",
                "default"]
    requests = []
    for i, drafter in enumerate(drafters):
        prompt = repetitive_prompt(rng, vocab)
        config = GenerationConfig(max_new_tokens=rng.randint(1, 40), ignore_eos=i % 3 != 0, drafter=drafter,
                                  prediction=prompt[-20:] if i == 9 else None)
        requests.append((prompt, config, rng.randint(0, 10)))
    got, stats, prefill_steps = run_packed(engine, requests, max_batch=4, prefill_share=0.05)
    for (prompt, config, _), result in zip(requests, got):
        assert result == alone(engine, prompt, config), f"{arch}: {config.drafter} on {prompt}"
    assert sum(s.accepted for s in stats) > 0
    assert max(prefill_steps.values()) > 1      # some prompt was read in several chunks beside running rows


def test_short_prompts_read_whole_and_a_chunk_floor_keep_each_rows_lone_tokens(monkeypatch):
    """whole_prompt_tokens and min_chunk change only how many prompt tokens a forward carries: every row's
    greedy tokens stay its lone tokens, and short prompts joining beside running rows get their first token
    in the step they join instead of after several chunks."""
    engine = packed_engine("llama", seed=4)
    engine._costs, engine._key_cost = [0.0] + [0.004 + 0.0005 * t for t in range(1, 65)], 0.0
    monkeypatch.setattr(BatchDecoder, "_observe_step", lambda *args: None)
    rng = random.Random(9)
    requests = []
    for i in range(10):
        prompt = repetitive_prompt(rng, engine.config.vocab_size)
        prompt = prompt * 3 if i % 3 == 0 else prompt[:30]     # long prompts (read in chunks) and short ones
        config = GenerationConfig(max_new_tokens=rng.randint(5, 30), ignore_eos=True, drafter="default")
        requests.append((prompt, config, 2 * i))
    short = [i for i, (prompt, _, _) in enumerate(requests) if len(prompt) <= 30]
    chunked = run_packed(engine, requests, max_batch=4, prefill_share=0.05)
    whole = run_packed(engine, requests, max_batch=4, prefill_share=0.05, whole_prompt_tokens=32, min_chunk=24)
    for (prompt, config, _), a, b in zip(requests, chunked[0], whole[0]):
        assert a == b == alone(engine, prompt, config)
    assert max(chunked[2][i] for i in short) > 0         # chunked: some short prompt took several steps
    assert all(whole[2][i] == 0 for i in short)          # whole: each its first token in its first step
    with pytest.raises(InvalidArgumentError):
        BatchDecoder(engine, 4, min_chunk=0)


def test_packed_rows_draft_with_what_the_engines_drafter_learned():
    """Greedy rows draft with forks of the engine's drafter (what the lone path learned, they use, and the
    reverse); a seeded sampling row with a fresh one."""
    engine = packed_engine("llama", seed=3)
    prompt = repetitive_prompt(random.Random(7), engine.config.vocab_size)
    list(engine.stream(prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True, drafter="recycling")))
    shared = engine.shared_drafter("recycling")
    assert shared.adjacency is not None
    decoder = BatchDecoder(engine, 4)
    decoder.add(prompt, GenerationConfig(max_new_tokens=12, drafter="recycling"), "greedy")
    decoder.add(prompt, GenerationConfig(max_new_tokens=12, drafter="recycling", temperature=0.7, seed=1), "seeded")
    greedy, seeded = decoder.rows
    assert greedy.drafter is not shared and greedy.drafter.adjacency is shared.adjacency
    assert greedy.drafter.acceptance is shared.acceptance
    assert seeded.drafter.adjacency is None


# -- packed rows on the PyTorch forward (CUDA's path): drafts cut to the spine, prompts prefilled alone ----------
def pytorch_engine(arch: str, seed: int, weights: str = "bf16", **overrides):
    """A tiny engine on the PyTorch forward with row-invariant linear layers: bf16 (oneDNN) or GGUF blocks
    (tachy's kernels one layer at a time, as under a press); fp32 (MKL) is not row-invariant (models/quant.py)."""
    from tachy.engine import Engine
    from tachy.models.quant import convert_weights
    from tests.conftest import tiny_gguf_model, tiny_model
    from tests.decoding.helpers import IdsTokenizer

    model = (convert_weights(tiny_model(arch, seed=seed, **overrides), "bf16") if weights == "bf16"
             else tiny_gguf_model(arch, seed=seed, **overrides))
    model.cpu_forward = None
    return Engine(model, IdsTokenizer([3]), name="tiny")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pytorch_packed_forward_gives_every_tree_node_its_lone_verify_bits(arch):
    """Three rows' draft trees (spines, side nodes and deeper branches) as the entries of one PyTorch forward
    over a BatchKVCache: every token's logits are bit for bit those of the lone verify forward of its row's
    tree (the same keys, masks and shapes), rows at different lengths across a key bucket (64) and Gemma 3's
    window (8). What lets a sampling row's drafter learn from its logits as it does alone."""
    import torch
    from tachy.cache import BatchKVCache
    from tachy.speculative.tree import DraftTree

    engine = pytorch_engine(arch, seed=3)
    model, cfg = engine.model, engine.config
    rng = random.Random(4)
    trees = [DraftTree.from_paths([[5, 6, 7], [5, 8], [9, 10, 11, 12], [5, 6, 13]]),
             DraftTree.chain([14, 15]), DraftTree.from_paths([[16], [17, 18], [19]])]
    prompts = [[rng.randrange(4, cfg.vocab_size) for _ in range(n)] for n in (61, 5, 30)]
    capacity = 128
    batch = BatchKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, 4, dtype=model.dtype)
    lone, rows, tokens, positions = [], [], [], []
    with torch.inference_mode():
        for slot, (prompt, tree) in enumerate(zip(prompts, trees)):
            cache = model.new_cache(capacity=capacity, fixed=True)
            engine._prefill(prompt, cache)
            batch.load(slot + 1, cache)
            root = [prompt[-1] + 1]
            n, base = len(tree) + 1, len(prompt)
            mask = torch.cat([torch.ones(n, base, dtype=torch.bool), tree.attention_mask()], dim=1)
            lone.append(model(torch.tensor([root + tree.tokens]), torch.tensor(tree.positions(base)), cache, mask)[0])
            rows += [slot + 1] * n
            tokens += root + tree.tokens
            positions += tree.positions(base)
        batch.rows = rows
        batch.entry_mask = torch.block_diag(*[tree.attention_mask() for tree in trees])
        got = model(torch.tensor(tokens)[:, None], torch.tensor(positions), batch)[:, 0]
    assert torch.equal(got, torch.cat(lone))


@pytest.mark.parametrize("weights", ["bf16", "gguf"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pytorch_forward_rows_draft_and_equal_alone(arch, weights):
    """Without the C forward, packed rows draft too, their trees cut as the lone path on this forward cuts
    them (the spine and its side nodes; commit_exact): every drafter as a row and a prediction, 20 rows joining
    at different steps, some crossing a key bucket (64) and Gemma 3's window (8). Each row's greedy tokens
    are its plain lone tokens, and drafts get accepted. (Committing past an accepted side node, whose row
    sees more than its path, broke a quarter of the Gemma 3 rows.)"""
    engine = pytorch_engine(arch, seed=1, weights=weights)
    drafters = ["default", "sam", "pld", "recycling", "none", "lookahead", "trigram", "model-free", "gated",
                "default"]
    accepted = 0
    for seed in (0, 1):
        rng = random.Random(seed)
        requests = []
        for i, drafter in enumerate(drafters):
            prompt = repetitive_prompt(rng, engine.config.vocab_size)
            config = GenerationConfig(max_new_tokens=rng.randint(1, 40), ignore_eos=i % 3 != 0, drafter=drafter,
                                      prediction=prompt[-20:] if i == 9 else None)
            requests.append((prompt, config, rng.randint(0, 10)))
        got, stats, _ = run_packed(engine, requests, max_batch=4)
        for (prompt, config, _), result in zip(requests, got):
            assert result == alone(engine, prompt, config), f"{arch}/{weights}: {config.drafter} on {prompt}"
        accepted += sum(s.accepted for s in stats if s is not None)
    assert accepted > 100


@pytest.mark.parametrize("forward", ["c", "pytorch"])
def test_seeded_sampling_rows_reproduce_the_lone_speculative_run(forward):
    """A sampled row drafts as it would alone (its own fresh drafter): same seed, same tokens. On the PyTorch
    forward it also cuts and commits as the lone path there does; its drafters run no model there (a row's
    model drafter drafts model-free instead, see batch.py), and a lower temperature lets some of the tiny
    random model's drafts be accepted."""
    if forward == "c":
        engine, temperature, least = packed_engine("llama", seed=2), 0.8, 1
        drafters = ["sam", "default", "pld", "none", "recycling", "gated"]
    else:
        engine, temperature, least = pytorch_engine("llama", seed=2, weights="gguf"), 0.3, 5
        drafters = ["sam", "pld", "none", "recycling", "gated", "trigram"]
    rng = random.Random(6)
    requests = []
    for i, drafter in enumerate(drafters):
        prompt = repetitive_prompt(rng, engine.config.vocab_size)
        config = GenerationConfig(max_new_tokens=30, temperature=temperature, top_p=0.95, seed=i, ignore_eos=True,
                                  drafter=drafter, repetition_penalty=1.2 if i == 2 else 1.0)
        requests.append((prompt, config, i))
    got, stats, _ = run_packed(engine, requests, max_batch=3)
    for (prompt, config, _), result in zip(requests, got):
        pieces = list(engine.stream(prompt, config))
        lone = ([t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), pieces[-1].finish_reason)
        assert result == lone, config.drafter
    assert sum(s.accepted for s in stats) >= least


def simulated_forwards(fit_or_decoder, steps: int, rows_scale: float, prompt_s: float, draft_s: float,
                       chunk_free_every: int = 0, seed: int = 0) -> None:
    """Forwards of a machine where running rows cost ``rows_scale`` times the engine's one-sequence costs and a
    prompt token ``prompt_s`` (+-5% noise), chunks at the 4-token floor as in the trap the fit replaced."""
    rng = random.Random(seed)
    for i in range(steps):
        rows, drafted = rng.randint(2, 8), rng.randint(0, 12)
        chunk = 0 if chunk_free_every and i % chunk_free_every == 0 else rng.choice([4, 4, 4, 6, 9])
        base = 0.004 + 0.0005 * rows                   # the engine's cost of the rows' roots
        elapsed = (rows_scale * base + draft_s * drafted + prompt_s * chunk) * rng.uniform(0.95, 1.05)
        if isinstance(fit_or_decoder, BatchDecoder):
            fit_or_decoder._observe_step(rows, drafted, chunk, elapsed)
        else:
            fit_or_decoder.observe(base, drafted, chunk, elapsed)


@pytest.mark.parametrize("chunk_free_every", [0, 5])
def test_step_cost_fit_tells_the_rows_cost_from_the_prompt_chunks(chunk_free_every):
    """The fit finds both terms, also when every forward carries a small chunk (no forward without one). The
    estimate it replaced charged all of the rows' underpredicted cost (here 1.5x the engine's) to the chunk's
    few tokens, several times a prompt token's real cost."""
    fit = StepCostFit(draft_token_s=0.0004, prompt_prior_s=0.0004)
    assert (fit.row_scale, fit.prompt_token_s) == (1.0, 0.0004)   # the priors until a forward is seen
    simulated_forwards(fit, 120, rows_scale=2.5, prompt_s=0.0007, draft_s=0.0004, chunk_free_every=chunk_free_every)
    assert fit.row_scale == pytest.approx(2.5, rel=0.1)
    assert fit.prompt_token_s == pytest.approx(0.0007, rel=0.2)


def test_step_cost_fit_of_draft_tokens_on_the_pytorch_forward():
    """On the PyTorch forward (no prompt chunks) the fit's second term is the draft tokens: a draft token that
    costs 5x the engine's marginal cost (each its own attention batch entry) is found, and the decoder's rows
    then weigh their drafts against it; the C forward keeps the engine's marginal cost."""
    fit = StepCostFit(draft_token_s=0.0004, prompt_prior_s=0.0004, fit_drafts=True)
    simulated_forwards(fit, 120, rows_scale=1.5, prompt_s=0.0, draft_s=0.002)
    assert fit.row_scale == pytest.approx(1.5, rel=0.1)
    assert fit.draft_token_s == pytest.approx(0.002, rel=0.2)
    engine = pytorch_engine("llama", seed=0)
    engine._costs, engine._key_cost = [0.0] + [0.004 + 0.0004 * t for t in range(1, 65)], 0.0
    decoder = BatchDecoder(engine, 8)
    simulated_forwards(decoder, 120, rows_scale=1.5, prompt_s=0.0, draft_s=0.002)
    costs = decoder._row_costs(8)
    assert costs[2] - costs[1] == pytest.approx(0.002, rel=0.2)
    c_fit = StepCostFit(draft_token_s=0.0004, prompt_prior_s=0.0004)
    simulated_forwards(c_fit, 120, rows_scale=1.5, prompt_s=0.0007, draft_s=0.002)
    assert c_fit.draft_token_s == 0.0004


def test_packed_chunks_and_row_shares_follow_the_fitted_costs():
    """What the decoder does with the fit: a chunk costs about prefill_share times the running rows' fitted
    cost, and a row's share of the forward (what its drafts are weighed against) is the fitted one."""
    engine = packed_engine("llama", seed=0)
    engine._costs, engine._key_cost = [0.0] + [0.004 + 0.0005 * t for t in range(1, 65)], 0.0
    decoder = BatchDecoder(engine, 8, prefill_share=0.5)
    before = decoder._chunk_budget(8), decoder._row_costs(8)[1]
    simulated_forwards(decoder, 120, rows_scale=2.5, prompt_s=0.0007, draft_s=0.0005)
    rows_cost = 2.5 * engine._costs[8]
    assert decoder._chunk_budget(8) == pytest.approx(0.5 * rows_cost / 0.0007, rel=0.25)
    assert decoder._chunk_budget(8) > 1.5 * before[0]     # priors: rows at the engine's cost, a prompt token marginal
    assert decoder._row_costs(8)[1] == pytest.approx(rows_cost / 8, rel=0.1)
    assert decoder._row_costs(8)[1] > 2 * before[1]
    assert decoder._row_costs(1) == engine._costs          # a row alone: the lone path's costs, unfitted


def test_packed_chunk_budget_follows_the_running_rows():
    engine = packed_engine("llama", seed=0)
    decoder = BatchDecoder(engine, 4, prefill_share=1.0)
    from tachy.generation import PREFILL_CHUNK

    assert decoder._chunk_budget(0) == PREFILL_CHUNK            # nothing running: read the prompt at full speed
    assert 4 <= decoder._chunk_budget(1) <= decoder._chunk_budget(40)
    with pytest.raises(InvalidArgumentError):
        BatchDecoder(engine, 4, prefill_share=0)
    assert batchable(GenerationConfig(prediction=[1, 2]), packed=True)
    assert not batchable(GenerationConfig(press="snapkv", compression_ratio=0.5), packed=True)


def test_logprobs_are_the_same_plain_speculative_and_batched():
    """Per-token log-probabilities (GenerationConfig.logprobs) do not depend on drafts or batching."""
    engine = packed_engine("llama", seed=3)
    rng = random.Random(7)
    prompts = [repetitive_prompt(rng, engine.config.vocab_size) for _ in range(3)]

    def lps(pieces):
        return [(x.token, round(x.logprob, 5), [(t, round(v, 5)) for t, v in x.top])
                for p in pieces for x in p.logprobs]

    plain = [lps(engine.stream(p, GenerationConfig(max_new_tokens=24, ignore_eos=True, drafter="none",
                                                    logprobs=3))) for p in prompts]
    spec = [lps(engine.stream(p, GenerationConfig(max_new_tokens=24, ignore_eos=True, drafter="sam",
                                                   logprobs=3))) for p in prompts]
    assert spec == plain and all(len(x) == 24 and len(x[0][2]) == 3 for x in plain)
    decoder = BatchDecoder(engine, 3)
    got = {i: [] for i in range(3)}
    for i, p in enumerate(prompts):
        for row, piece in decoder.add(p, GenerationConfig(max_new_tokens=24, ignore_eos=True, drafter="pld",
                                                          logprobs=3), tag=i):
            got[row.tag].append(piece)
    while decoder.rows:
        for row, piece in decoder.step():
            got[row.tag].append(piece)
    assert [lps(got[i]) for i in range(3)] == plain
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        GenerationConfig(logprobs=21)
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        GenerationConfig(logprobs=2, strategy="beam")


# -- preemption: a parked row resumes where it was ----------------------------------------------------------------
@pytest.mark.parametrize("rows", ["c forward", "pytorch forward", "plain"])
def test_parked_rows_resume_bit_for_bit(rows, monkeypatch):
    """Rows parked between steps (their cache rows taken by others meanwhile) and resumed later give their lone
    tokens: greedy with drafts (packed rows on either forward) or plain rows, and a seeded sampling row."""
    packed = rows != "plain"
    engine = {"c forward": lambda: packed_engine("llama", seed=3), "pytorch forward": lambda: pytorch_engine(
        "llama", seed=3, weights="gguf"), "plain": lambda: tiny_engine(seed=1, eos=(3,))[0]}[rows]()
    if packed:   # drafts and chunks from fixed step costs, not this machine's timing: the same steps, hence parks
        engine._costs, engine._key_cost = [0.0] + [0.004 + 0.0005 * t for t in range(1, 65)], 0.0
        monkeypatch.setattr(BatchDecoder, "_observe_step", lambda *args: None)
    rng = random.Random(7)
    vocab = engine.config.vocab_size
    configs = [GenerationConfig(max_new_tokens=40, ignore_eos=True, drafter="default"),
               GenerationConfig(max_new_tokens=30, ignore_eos=True, drafter="pld"),
               GenerationConfig(max_new_tokens=35, ignore_eos=True, temperature=0.9, seed=4, drafter="none"),
               GenerationConfig(max_new_tokens=12, ignore_eos=True)]
    prompts = [repetitive_prompt(rng, vocab) for _ in configs]
    decoder = BatchDecoder(engine, max_batch=2, packed=packed)
    out = {i: [] for i in range(len(configs))}
    todo, parks, step = list(range(len(configs))), 0, 0

    def take(events):
        for row, piece in events:
            out[row.tag] += piece.token_ids

    while todo or decoder.rows or decoder.parked:
        if step % 5 == 4 and not decoder.free:   # every few steps a row makes room for the next in line
            row = decoder.preemptible(1)
            if row is not None:
                decoder.park(row)
                parks += 1
        while decoder.free and (todo or decoder.parked):
            if decoder.parked and (step % 2 or not todo):
                decoder.resume()
            else:
                i = todo.pop(0)
                take(decoder.add(prompts[i], configs[i], tag=i))
        take(decoder.step())
        step += 1
    assert parks >= (2 if rows == "pytorch forward" else 3)   # prompts read at join: fewer steps
    for i, (prompt, config) in enumerate(zip(prompts, configs)):
        lone = [t for p in engine.stream(prompt, config if config.temperature else
                                         dataclasses.replace(config, drafter=None)) for t in p.token_ids]
        if config.temperature and not packed:   # a plain sampling row draws as a lone plain generation
            lone = alone(engine, prompt, config)[0]
        assert out[i] == lone, f"request {i} ({config.drafter})"


@pytest.mark.parametrize("weights", ["bf16", "gguf"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_handed_off_generation_goes_on_as_it_would_alone(arch, weights):
    """``Engine.stream`` hands a lone generation off between two steps (``Handoff``, after 0 to 4 of them) and
    ``BatchDecoder.adopt`` continues it as a row beside another request. Greedy ones (the default drafter
    alone, the int4 self-draft where it is the default; a row's model-free drafts after) give their lone
    tokens and text, a stop string's held-back text included; a seeded sampler without drafts draws on as it
    would alone (its generator moved with it). Gemma 3's window (8) is crossed before and after the move."""
    engine = pytorch_engine(arch, seed=2, weights=weights)
    rng = random.Random(9)
    vocab = engine.config.vocab_size
    configs = [GenerationConfig(max_new_tokens=40, ignore_eos=True),
               GenerationConfig(max_new_tokens=30, ignore_eos=True, drafter="pld", logprobs=2),
               GenerationConfig(max_new_tokens=35, ignore_eos=True, temperature=0.9, seed=4, drafter="none"),
               GenerationConfig(max_new_tokens=45, ignore_eos=True, stop=["9 9 9"], drafter="recycling")]
    for i, config in enumerate(configs):
        prompt = repetitive_prompt(rng, vocab)
        lone = list(engine.stream(prompt, config))
        steps_before = [0]

        def wanted(after=i):
            steps_before[0] += 1
            return steps_before[0] > after
        handoff = Handoff(wanted)
        pieces = list(engine.stream(prompt, config, handoff=handoff))
        assert handoff.taken and all(p.finish_reason is None for p in pieces)
        decoder = BatchDecoder(engine, max_batch=2)
        decoder.add(repetitive_prompt(rng, vocab), GenerationConfig(max_new_tokens=20), tag="other")
        decoder.adopt(handoff, config, tag="moved")
        while decoder.rows:
            pieces += [p for row, p in decoder.step() if row.tag == "moved"]
        for field in ("token_ids", "text", "logprobs"):
            assert [x for p in pieces for x in (getattr(p, field) or [])] == \
                   [x for p in lone for x in (getattr(p, field) or [])], (i, field)
        assert pieces[-1].finish_reason == lone[-1].finish_reason


def test_park_refuses_a_row_still_reading_its_prompt():
    engine = packed_engine("llama", seed=3)
    decoder = BatchDecoder(engine, max_batch=1)
    decoder.add(list(range(4, 40)), GenerationConfig(max_new_tokens=5))
    with pytest.raises(InvalidArgumentError, match="parked"):
        decoder.park(decoder.rows[0])
    with pytest.raises(InvalidArgumentError, match="nothing to resume"):
        decoder.resume()


@pytest.mark.parametrize("packed", [False, True])
def test_a_row_whose_own_work_fails_leaves_alone(packed):
    """A row's logits processor (or, packed, its drafter) raising ends that row only: its error is in
    ``failed``, its cache row is free, and the other rows still give their lone output."""
    engine = packed_engine("llama", seed=1) if packed else tiny_engine(seed=1, eos=(3,))[0]
    decoder = BatchDecoder(engine, max_batch=3, packed=packed)
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, drafter="sam" if packed else None)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11], [12, 13, 14, 12, 13, 14]]
    out = {i: [] for i in range(3)}

    def take(events):
        for row, piece in events:
            out[row.tag] += piece.token_ids

    for i, prompt in enumerate(prompts):
        take(decoder.add(prompt, config, tag=i))

    def broken(*args):
        raise RuntimeError("row 1 broke")

    failing = decoder.rows[1]
    if packed:
        take(decoder.step())   # the prompts are read and every row has its first token
        failing.drafter.propose = broken
    else:
        failing.processor = broken
    while decoder.rows:
        take(decoder.step())
    assert [(r.tag, str(e)) for r, e in decoder.failed] == [(1, "row 1 broke")]
    assert failing.done and failing.slot == -1 and failing not in decoder.rows
    for i in (0, 2):
        assert out[i] == alone(engine, prompts[i], config)[0]


@pytest.mark.parametrize("packed", [False, True])
def test_logit_bias_rows_equal_their_lone_plain_output(packed):
    """OpenAI's logit_bias is a logits processor like the penalties: it changes the greedy tokens, and a
    batch row (packed: drafting) or a lone speculative run gives the plain lone output under it."""
    engine = packed_engine("llama", seed=4) if packed else tiny_engine(seed=4, eos=(3,))[0]
    prompt = repetitive_prompt(random.Random(2), engine.config.vocab_size)
    free = alone(engine, prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True))[0]
    other = 5 if free[0] != 5 else 6
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, logit_bias={free[0]: -100.0, other: 0.5},
                              drafter="sam" if packed else None)
    lone = alone(engine, prompt, config)
    assert lone[0][0] != free[0]
    got, _ = batched(engine, [(prompt, config, 0), (prompt[:7], config, 1)], max_batch=2, packed=packed)
    assert got == [lone, alone(engine, prompt[:7], config)]
    speculative = list(engine.stream(prompt, dataclasses.replace(config, drafter="sam")))
    assert [t for p in speculative for t in p.token_ids] == lone[0]


@pytest.mark.parametrize("packed", [False, True])
def test_pytorch_ops_between_c_forwards_run_on_one_thread(packed, monkeypatch, two_torch_threads):
    """With the C forward, PyTorch runs on one thread through a whole join, step, park and resume, through the
    lone path's set-up, prefill and first choice, and through a search strategy's steps, not only inside the
    forwards: an op on two threads there (an argmax, a cache's zero fill or copy) leaves OpenMP's threads
    spinning into the next forward, which then runs up to twice as slow on two cores (benchmarks.md section
    4). Where PyTorch already runs on one thread this is moot, so the test gives it two."""
    import torch

    import tachy.batch as batch_module
    from tachy.cache import KVCache
    from tachy.engine import Engine

    engine = packed_engine("llama", 0)
    # drafts and chunks from fixed step costs, not this machine's timing: with measured ones both rows once
    # ended within the first 4 steps, leaving none to park
    engine._costs, engine._key_cost = [0.0] + [0.004 + 0.0005 * t for t in range(1, 65)], 0.0
    monkeypatch.setattr(BatchDecoder, "_observe_step", lambda *args: None)
    seen: list[tuple[str, int]] = []
    watching = functools.partial(thread_watcher, seen)
    monkeypatch.setattr(batch_module, "verify_greedy", watching("verify", batch_module.verify_greedy))
    monkeypatch.setattr(Engine, "_choose", staticmethod(watching("choose", Engine._choose)))
    monkeypatch.setattr(batch_module.BatchKVCache, "row_kv", watching("park", batch_module.BatchKVCache.row_kv))
    monkeypatch.setattr(batch_module.BatchKVCache, "load_kv", watching("resume", batch_module.BatchKVCache.load_kv))
    monkeypatch.setattr(KVCache, "__init__", watching("new cache", KVCache.__init__))
    monkeypatch.setattr(KVCache, "select", watching("beam reorder", KVCache.select))
    rng = random.Random(5)
    decoder = BatchDecoder(engine, max_batch=3, packed=packed)
    for _ in range(2):
        decoder.add(repetitive_prompt(rng, 100), GenerationConfig(max_new_tokens=40))
    for _ in range(4):
        decoder.step()
    row = next(r for r in decoder.rows if not r.pending)
    decoder.park(row)
    decoder.resume()
    while decoder.rows:
        decoder.step()
    engine.generate(repetitive_prompt(rng, 100), max_new_tokens=4)
    engine.generate(repetitive_prompt(rng, 100), max_new_tokens=6, strategy="beam",
                    strategy_options={"num_beams": 3})
    assert torch.get_num_threads() == 2
    assert {name for name, _ in seen} == {"verify", "choose", "park", "resume", "new cache", "beam reorder"}
    assert [(name, threads) for name, threads in seen if threads != 1] == []


def thread_watcher(seen: list, name: str, fn):
    """``fn``, recording ``(name, PyTorch's thread count)`` into ``seen`` at each call."""
    import torch

    def watched(*args, **kwargs):
        seen.append((name, torch.get_num_threads()))
        return fn(*args, **kwargs)
    return watched


@pytest.mark.parametrize("packed", [True, False])
def test_batch_steps_over_gguf_blocks_on_the_pytorch_forward_run_pytorch_on_one_thread(packed, monkeypatch,
                                                                                         two_torch_threads):
    """GGUF blocks through the PyTorch forward (the C forward off) run on tachy's kernels too: a batch's joins
    and steps give the kernels PyTorch's threads (``Engine.runs_kernels``), as the lone path does. Unguarded, 8
    rows of 2 draft entries each took 146 ms per forward on a 2-core CPU, guarded 90 (batch.py)."""
    import torch

    import tachy.batch as batch_module
    from tachy.models.gguf_linear import GGUFLinear

    engine = pytorch_engine("llama", 0, weights="gguf")
    if not engine.runs_kernels:
        pytest.skip("tachy's kernels do not run on this machine")
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(GGUFLinear, "forward", thread_watcher(seen, "linear", GGUFLinear.forward))
    monkeypatch.setattr(batch_module, "verify_greedy", thread_watcher(seen, "verify", batch_module.verify_greedy))
    rng = random.Random(5)
    decoder = BatchDecoder(engine, max_batch=3, packed=packed)
    for _ in range(2):
        decoder.add(repetitive_prompt(rng, 100), GenerationConfig(max_new_tokens=12))
    while decoder.rows:
        decoder.step()
    assert torch.get_num_threads() == 2
    assert {name for name, _ in seen} == {"linear", "verify"}
    assert [(name, threads) for name, threads in seen if threads != 1] == []


@pytest.mark.slow
def test_no_large_pytorch_op_on_two_threads_around_c_forwards(smollm):
    """The general form of the test above, on the embedded model: no PyTorch function touching a tensor of
    32k elements or more (PyTorch's grain for splitting work over threads) runs with PyTorch on two threads
    while the lone path, the batch decoder (both modes) or a search strategy generates: sampling, logprobs,
    penalties and a response_format included."""
    import torch
    from torch.overrides import TorchFunctionMode

    if smollm.model.cpu_forward is None:
        pytest.skip("tachy's C kernels do not run on this machine")
    big: list[str] = []

    def large(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.numel() >= 32768
        return isinstance(value, (list, tuple)) and any(large(v) for v in value)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # work makes a tensor (metadata such as element_size or shape does not)
            if torch.get_num_threads() > 1 and isinstance(out, torch.Tensor) and \
                    (large(args) or large(list((kwargs or {}).values())) or large(out)):
                big.append(getattr(func, "__name__", str(func)))
            return out

    configs = [GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=8, temperature=0.8, seed=1),
               GenerationConfig(max_new_tokens=8, logprobs=3, presence_penalty=0.5),
               GenerationConfig(max_new_tokens=8, response_format={"type": "json_object"})]
    prompts = [smollm.chat_prompt([{"role": "user", "content": q}]) for q in ("Hi", "Cats?", "List 3 fruits")]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        smollm.generate(prompts[0], max_new_tokens=2)   # one-time set-up (step costs) outside the watch
        with Watch():
            for config in configs:
                smollm.generate(prompts[0], config)
            smollm.generate(prompts[1], max_new_tokens=6, strategy="beam", strategy_options={"num_beams": 2})
            for packed in (True, False):
                decoder = BatchDecoder(smollm, max_batch=4, packed=packed)
                for prompt, config in zip(prompts + prompts[:1], configs):
                    decoder.add(prompt, config)
                while decoder.rows:
                    decoder.step()
    finally:
        torch.set_num_threads(before)
    assert big == []


def test_a_press_decodes_with_the_kernels_on_pytorchs_threads(monkeypatch):
    """A press's cache takes the PyTorch forward, whose linear layers are still the GGUF kernels: its decoding
    steps run under kernels.threads_to_kernels too (bf16 weights, all PyTorch's, would not)."""
    import torch

    import tachy.engine as engine_module

    engine = packed_engine("llama", 0)
    seen: list[int] = []
    real = engine_module.verify_greedy

    def watched(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "verify_greedy", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine.generate(repetitive_prompt(random.Random(2), 100), max_new_tokens=6, press="streaming_llm",
                        compression_ratio=0.5)
    finally:
        torch.set_num_threads(before)
    assert engine._gguf_linears and seen and set(seen) == {1}, seen
