"""Perplexity under compression: prefill ``context`` tokens of a text, compress, then score the next
``tokens`` tokens teacher-forced over the compressed cache (one forward; under sparse attention one forward
per token, as decoding reads the cache). Several windows spread over the text
average out its local difficulty; every setting sees the same windows and the same prefill.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engine import Engine
from ..errors import InvalidArgumentError
from ..sparse import kv_read_per_token
from .sweep import DENSE, Prefilled, Setting, records


def run_ppl(engine: Engine, text: str, contexts: list[int], settings: list[Setting], tokens: int = 256,
            windows: int = 2, progress: bool = True) -> dict:
    """Perplexity of every setting at every context length; returns the results.json dictionary."""
    need = max(contexts) + tokens
    ids = engine.tokenizer.encode(text[: need * 8 * windows], add_special_tokens=False)
    if len(ids) < need:
        raise InvalidArgumentError(f"the text has only {len(ids)} tokens; {need} needed (the largest --context "
                                   f"plus --tokens): pass a longer text or a smaller --context")
    starts = [round(k * (len(ids) - need) / max(1, windows - 1)) for k in range(windows)]
    bos = [engine.tokenizer.bos_token_id] if engine.tokenizer.bos_token_id is not None else []
    nll = {(s.label, c): [] for s in settings for c in contexts}
    kv_bytes = {(s.label, c): [] for s in settings for c in contexts}
    kv_read = {(s.label, c): [] for s in settings for c in contexts}
    bar = tqdm(total=len(contexts) * windows * len(settings), disable=not progress, desc="ppl")
    for context in contexts:
        for start in starts:
            prompt = bos + ids[start:start + context - len(bos)]
            target = ids[start + context - len(bos): start + context - len(bos) + tokens]
            pre = Prefilled(engine, prompt, tokens, record=records(settings))
            for s in settings:
                cache = pre.compressed(s)
                kv_bytes[(s.label, context)].append(cache.nbytes)
                kv_read[(s.label, context)].append(kv_read_per_token(engine.config, s.attention, context,
                                                                     cache.nbytes / cache.uncompressed_nbytes))
                x = torch.tensor([target], device=engine.device)
                logits = score(engine, x, cache, one_by_one=s.attention != DENSE)
                nll[(s.label, context)].append(float(F.cross_entropy(logits, x[0, 1:], reduction="sum")))
                bar.update()
    bar.close()

    def ppl(label: str, context: int) -> float:
        return math.exp(sum(nll[(label, context)]) / (windows * (tokens - 1)))

    def mean_bytes(label: str, context: int, of: dict = kv_bytes) -> int:
        return round(sum(of[(label, context)]) / windows)

    full = settings[0].label
    return {
        "model": engine.name, "task": "ppl", "contexts": contexts, "tokens": tokens, "windows": windows,
        "baseline": {"attention": DENSE, "ppl": math.exp(sum(sum(nll[(full, c)]) for c in contexts)
                                     / (len(contexts) * windows * (tokens - 1))),
                     "kv_bytes": round(sum(mean_bytes(full, c) for c in contexts) / len(contexts)),
                     "per_context": [{"context": c, "ppl": ppl(full, c), "kv_bytes": mean_bytes(full, c),
                                      "kv_read_per_token": mean_bytes(full, c, kv_read)} for c in contexts]},
        "runs": [{"press": s.press, "ratio": s.ratio, "attention": s.attention, "context": c, "ppl": ppl(s.label, c),
                  "kv_bytes": mean_bytes(s.label, c), "kv_read_per_token": mean_bytes(s.label, c, kv_read)}
                 for s in settings[1:] for c in contexts],
    }


def score(engine: Engine, x: torch.Tensor, cache, one_by_one: bool) -> torch.Tensor:
    """Logits [n-1, V] predicting x[0, 1:] after the cache: one teacher-forced forward, or, under sparse
    attention (which chooses keys per decoded token), one forward per token, as decoding reads them."""
    positions = cache.position + torch.arange(x.shape[1], device=engine.device)
    if not one_by_one:
        return engine.model(x, positions, cache)[0, :-1].float()
    rows = [engine.model(x[:, i:i + 1], positions[i:i + 1], cache)[0, 0] for i in range(x.shape[1] - 1)]
    return torch.stack(rows).float()
