"""Our models against Hugging Face transformers on the real embedded checkpoints (smollm2-135m, gemma3-270m).

Both sides get the very same dequantized fp32 weights (``load_checkpoint``), transformers runs its eager
attention in fp32, ours stays fp32 too (no ``convert_weights``), with both cache kinds (``fixed=True``, the
engine's exact mode, on every prompt, and the growing ``fixed=False`` one on the first). Checked: prefill
logits, token-by-token cached decoding against one full transformers forward over the same sequence, 64-token
greedy continuations (each token transformers' argmax after the same prefix), and Gemma 3 past its 512-token
sliding window. Each model is loaded once and every transformers forward is computed once (``Pair.memo``).

Logit differences are relative: ``max |ours - hf| / max |hf|`` over the compared rows (logit scale ~28-42).
Measured on this CPU (torch 2.13, transformers 5.23): at most 2.7e-6 (smollm2) and 3.4e-6 (gemma3), i.e.
absolute differences up to ~1.1e-4. The bound REL_TOL = 1e-4 leaves a margin of ~30x, while a real numerics
bug (wrong rope base, norm offset, window, scale...) shows up at 1e-2 and above.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

MODELS = ["smollm2-135m", "gemma3-270m"]
REL_TOL = 1e-4
NEW_TOKENS = 64
KEY_BUCKET = 64

SMOLLM_CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a short Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "Give me three tips for staying focused while studying."}],
]
from tests.conftest import DATA

SHAKESPEARE = str(DATA / "tinyshakespeare.txt")
GEMMA_OFFSETS = [0, 250_000, 700_000]   # character offsets of the three plain-text passages
PASSAGE_CHARS = 400
LONG_PROMPT_TOKENS = 700                # > gemma3's sliding window of 512


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def shakespeare(offset: int, chars: int) -> str:
    if not Path(SHAKESPEARE).is_file():
        pytest.skip(f"development data not available ({SHAKESPEARE})")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n\n", offset) + 2   # start at a speaker's turn
    return text[start:start + chars]


@dataclass
class Pair:
    name: str
    cfg: object
    hf: object
    ours: object
    tok: object
    prompts: list[list[int]]
    eos: set[int]
    memo: dict = field(default_factory=dict)   # results shared between tests (computed once)


def build_pair(name: str) -> Pair:
    import transformers
    from transformers.initialization import no_init_weights

    from tachy.models import build_model
    from tachy.models.load import load_checkpoint
    from tachy.registry import resolve_model
    from tachy.tokenizer import Tokenizer

    cfg, sd, tok_dir = load_checkpoint(resolve_model(name), progress=False)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    with no_init_weights():   # every weight is loaded below; skipping the random init saves seconds
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    hf.tie_weights()          # no_init_weights skips the tying too
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert set(missing) <= allowed_missing and not unexpected, (missing, unexpected)
    if cfg.tie_embeddings:   # the missing lm_head must really be the (loaded) embedding
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf = hf.eval().float()
    assert hf.config._attn_implementation == "eager"

    ours = build_model(cfg)
    ours.load_hf_state_dict(sd)
    ours = ours.eval()
    assert ours.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.float32

    tok = Tokenizer.from_path(tok_dir)
    if name.startswith("smollm2"):
        assert tok.has_chat_template
        prompts = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False) for m in SMOLLM_CHATS]
    else:
        assert not tok.has_chat_template
        prompts = [tok.encode(shakespeare(o, PASSAGE_CHARS)) for o in GEMMA_OFFSETS]
        assert all(p[0] == tok.bos_token_id for p in prompts)
    return Pair(name, cfg, hf, ours, tok, prompts, set(cfg.eos_token_ids) | set(tok.eos_token_ids))


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    # One thread: on this small shared CPU, two-thread kernels stall on a busy core (measured 3x slower decoding).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    try:
        yield build_pair(request.param)
    finally:
        torch.set_grad_enabled(True)
        torch.set_num_threads(threads)


# ---- the two sides ---------------------------------------------------------------------------------------------
def new_cache(model, fixed: bool, total: int):
    if fixed:   # like the engine: sized once for the whole run, a multiple of 64
        return model.new_cache(capacity=-(-total // KEY_BUCKET) * KEY_BUCKET, fixed=True)
    return model.new_cache(capacity=16, fixed=False)   # small on purpose: exercises growth


def ours_greedy(model, prompt: list[int], n: int, fixed: bool, chunks: list[int] | None = None,
                skip_first_chunk_logits: bool = False):
    """Prefill (optionally in chunks), then argmax + one-token forwards. Returns (new tokens, prefill logits
    [P, V], decode logits [n, V]): row i of the decode logits is the forward that consumed new token i-1
    (row 0 is the prefill's last row). ``skip_first_chunk_logits``: the first chunk computes only its last row
    and the prefill logits start after it (saves output-layer time on long prompts)."""
    cache = new_cache(model, fixed, len(prompt) + n)
    parts, s = [], 0
    for j, c in enumerate(chunks or [len(prompt)]):
        skip = skip_first_chunk_logits and j == 0
        out = model(torch.tensor([prompt[s:s + c]]), torch.arange(s, s + c), cache, last_only=skip)[0]
        parts.append(out[:0] if skip else out)
        s += c
    assert s == len(prompt) and cache.length == len(prompt)
    prefill = torch.cat(parts)
    rows, tokens = [prefill[-1]], []
    for i in range(n):
        tokens.append(int(rows[-1].argmax()))
        if i == n - 1:
            break
        pos = len(prompt) + i
        rows.append(model(torch.tensor([[tokens[-1]]]), torch.tensor([pos]), cache)[0, 0])
    return tokens, prefill, torch.stack(rows)


def hf_logits(hf, ids: list[int], keep: int = 0) -> torch.Tensor:
    """transformers' logits for the last ``keep`` positions (0: all)."""
    return hf(torch.tensor([ids]), logits_to_keep=keep).logits[0].float()


def memo(p: Pair, key, fn):
    if key not in p.memo:
        p.memo[key] = fn()
    return p.memo[key]


def prompts_for(p: Pair, fixed: bool) -> list[int]:
    """Which prompts a cache kind runs: the engine's fixed cache every prompt, the growing one the first only
    (it checks the growth path; the arithmetic is the same)."""
    return list(range(len(p.prompts))) if fixed else [0]


def greedy_run(p: Pair, i: int, fixed: bool):
    return memo(p, ("ours", i, fixed), lambda: ours_greedy(p.ours, p.prompts[i], NEW_TOKENS, fixed))


def hf_decode_rows(p: Pair, i: int, tokens: list[int]) -> torch.Tensor:
    """transformers' logits [n, V] for the rows that predict ``tokens``, from one forward over the prompt
    and ``tokens[:-1]``."""
    seq = p.prompts[i] + tokens[:-1]
    return memo(p, ("hf_rows", tuple(seq)), lambda: hf_logits(p.hf, seq, keep=len(tokens)))


# ---- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fixed", [False, True], ids=["growing", "fixed"])
def test_prefill_logits_match_transformers(pair, fixed):
    worst = 0.0
    for i in prompts_for(pair, fixed):
        prompt = pair.prompts[i]
        ref = memo(pair, ("hf_prefill", i), lambda: hf_logits(pair.hf, prompt))
        _, ours, _ = greedy_run(pair, i, fixed)
        d = rel_diff(ours, ref)
        print(f"\n[{pair.name}] prefill prompt {i} ({len(prompt)} tokens, fixed={fixed}): rel max diff {d:.2e} "
              f"(abs {(ours - ref).abs().max().item():.2e}, logit scale {ref.abs().max().item():.1f})")
        worst = max(worst, d)
    assert worst < REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [False, True], ids=["growing", "fixed"])
def test_cached_decode_matches_full_forward(pair, fixed):
    """Each one-token forward over our cache gives the logits transformers computes for that row in one
    forward over the whole sequence (prompt + our greedy continuation)."""
    worst = 0.0
    for i in prompts_for(pair, fixed):
        tokens, _, rows = greedy_run(pair, i, fixed)
        ref = hf_decode_rows(pair, i, tokens)      # rows predicting tokens[0..n-1]
        d = rel_diff(rows, ref)
        print(f"\n[{pair.name}] decode prompt {i} ({len(pair.prompts[i])}+{NEW_TOKENS - 1} steps, fixed={fixed}): "
              f"rel max diff {d:.2e}")
        worst = max(worst, d)
    assert worst < REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [False, True], ids=["growing", "fixed"])
def test_greedy_continuation_matches_transformers(pair, fixed):
    """Every greedy token is transformers' own argmax after the same prefix, up to the first EOS: the
    sequence transformers' greedy generate() produces (the logits agree to 1e-4, test above)."""
    for i in prompts_for(pair, fixed):
        ours, _, _ = greedy_run(pair, i, fixed)
        ref = hf_decode_rows(pair, i, ours).argmax(-1).tolist()
        end = next((j + 1 for j, t in enumerate(ref) if t in pair.eos), len(ref))
        assert ours[:end] == ref[:end], (pair.name, i, pair.tok.decode(ours), pair.tok.decode(ref))
        print(f"\n[{pair.name}] prompt {i}: {end} greedy tokens identical: {pair.tok.decode(ref[:end])!r}")


@pytest.mark.slow
def test_gemma3_past_sliding_window(pair):
    """A 700-token prompt: local layers must drop keys 512+ positions back, in prefill (one piece and in
    chunks that straddle the window) and in decoding."""
    if pair.cfg.arch != "gemma3":
        pytest.skip("Gemma 3 only")
    window = pair.cfg.sliding_window
    assert window == 512 and "sliding" in pair.cfg.layer_types
    prompt = pair.tok.encode(shakespeare(100_000, 4 * LONG_PROMPT_TOKENS))[:LONG_PROMPT_TOKENS]
    assert len(prompt) == LONG_PROMPT_TOKENS > window
    steps, first = 8, window - 64   # prefill rows compared: positions 448..699, before and past the window
    ref_seq = ref = None
    # one piece (the engine's path); chunks straddling the window in a growing and in a fixed cache (their
    # first chunk, positions 0..447, only fills the cache)
    for fixed, chunks in [(True, None), (False, [first, 252]), (True, [first, 100, 152])]:
        tokens, prefill, rows = ours_greedy(pair.ours, prompt, steps, fixed, chunks,
                                            skip_first_chunk_logits=chunks is not None)
        seq = prompt + tokens[:-1]
        if seq != ref_seq:   # transformers over prompt + 7 new tokens; its last 8 rows are the decode rows
            ref_seq, ref = seq, hf_logits(pair.hf, seq, keep=len(seq) - first)
        ref_prefill, ref_decode = ref[:LONG_PROMPT_TOKENS - first], ref[-steps:]
        dp = rel_diff(prefill[-(LONG_PROMPT_TOKENS - first):], ref_prefill)
        dd = rel_diff(rows, ref_decode)
        print(f"\n[{pair.name}] {len(prompt)}-token prompt, fixed={fixed}, chunks={chunks}: "
              f"prefill rel max diff {dp:.2e}, {steps} decode steps {dd:.2e}")
        assert dp < REL_TOL and dd < REL_TOL
        assert tokens == ref_decode.argmax(-1).tolist()   # transformers' greedy choice at every step
