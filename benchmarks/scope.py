"""Long generations under a KV budget: SCOPE's decoding strategies vs a prompt press alone (whose cache grows
with every generated token) and StreamingLLM evicting while decoding, against the full cache.

    PYTHONPATH=src python benchmarks/scope.py [--model smollm2-135m] [--context 1536] [--tokens 1024]
        [--rounds 2] [--threads 1] [--settings full,snapkv@0.5,scope:strategy=slide@0.5,...]
        [--out docs/results/scope]

A setting is ``PRESS@RATIO`` (``full``: no press; options may hold commas, the ``@`` ends a setting). The
prompt is the first ``--context`` tokens of tinyshakespeare as plain text; every setting then
* decodes ``--tokens`` greedy tokens through ``Engine.generate_tokens`` (EOS ignored), in ``--rounds``
  interleaved rounds (order rotating per round; the tokens are the same each round), reporting the KV bytes
  held at the end and at the peak, and the median decode tokens/s;
* is compared with the full cache's greedy tokens, and with those of ``--versus`` (the prefill press alone,
  whose prompt cache SCOPE shares): how many agree before the first difference, and the share of positions
  that agree;
* scores the text's real continuation (the next ``--tokens`` tokens) teacher-forced, one token per forward
  with the press's decoding-time eviction exactly as the engine runs it: perplexity over all of them and over
  the second half (where the generated part outgrows a decoding budget).
Writes results.json and results.md to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import tachy
from tachy import GenerationConfig, GenerationStats, kernels
from tachy.eval.sweep import read_text
from tachy.presses import make_press

DEFAULT_SETTINGS = ("full,snapkv@0.5,streaming_llm:evict_every=64@0.33,scope:strategy=slide@0.5,"
                    "scope:strategy=adaptive@0.5,scope:strategy=discontinuous@0.5")


def split_settings(text: str) -> list[str]:
    """'full,scope:strategy=slide,recent=256@0.5' -> ['full', 'scope:strategy=slide,recent=256@0.5']: a
    setting ends at its '@RATIO' (press options have commas too)."""
    settings, current = [], ""
    for piece in text.split(","):
        current = f"{current},{piece}" if current else piece
        if current == "full" or re.search(r"@[0-9.]+$", current):
            settings.append(current)
            current = ""
    if current:
        raise SystemExit(f"setting {current!r} has no @RATIO")
    return settings


def parse(setting: str) -> tuple[str | None, float]:
    if setting == "full":
        return None, 0.0
    press, _, ratio = setting.rpartition("@")
    return press, float(ratio)


def generate(engine, ids: list[int], setting: str, tokens: int) -> dict:
    press, ratio = parse(setting)
    stats, held = GenerationStats(), []
    out: list[int] = []
    config = GenerationConfig(max_new_tokens=tokens, press=press, compression_ratio=ratio)
    for step in engine.generate_tokens(ids, config, stats):
        out.extend(step.tokens)
        held.append(stats.kv_bytes)
    return {"tokens": out, "kv_bytes": stats.kv_bytes, "kv_peak_bytes": max(held),
            "kv_full_bytes": stats.kv_full_bytes,
            "decode_tokens_per_s": (stats.generated_tokens - 1) / stats.decode_s}


@torch.inference_mode()
def forced_nll(engine, ids: list[int], continuation: list[int], setting: str) -> list[float]:
    """Negative log-likelihood of each continuation token, fed one per forward after the (compressed) prompt,
    with the press evicting while decoding as in ``Engine.generate_tokens``."""
    name, ratio = parse(setting)
    press = None if name is None else make_press(name, ratio)
    model = engine.model
    cache = model.new_cache(capacity=engine.cache_capacity(len(ids), len(continuation)), fixed=True)
    threads = kernels.threads_to_kernels if model.exact_trees(cache) else nullcontext
    with threads():
        logits = engine._prefill(ids, cache, press)[-1]
    eviction = press.start_decoding(cache) if press is not None and press.active else None
    threads = kernels.threads_to_kernels if model.exact_trees(cache) else nullcontext
    nll = []
    for token in continuation:
        nll.append(-float(logits.float().log_softmax(-1)[token]))
        with threads():
            if eviction is not None:
                eviction.step(cache)
            logits = model(torch.tensor([[token]], device=engine.device),
                           torch.tensor([cache.position], device=engine.device), cache)[0, -1]
        if eviction is not None:
            eviction.committed([0])
    return nll


def agreement(tokens: list[int], reference: list[int]) -> tuple[int, float]:
    """(tokens equal before the first difference, share of positions equal)."""
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    same = sum(a == b for a, b in zip(tokens, reference)) / max(1, len(reference))
    return first, same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--versus", default="snapkv@0.5",
                    help="a second reference for greedy agreement: the prefill press alone (same prompt cache)")
    ap.add_argument("--out", default="docs/results/scope")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = split_settings(args.settings)
    if settings[0] != "full":
        raise SystemExit("the first setting must be full (the reference)")
    engine = tachy.load(args.model, progress=False)
    text = engine.tokenizer.encode(read_text(None, "--text")[: (args.context + args.tokens) * 8],
                                   add_special_tokens=False)
    ids, continuation = text[: args.context], text[args.context: args.context + args.tokens]
    runs: dict[str, dict] = {}
    rates: dict[str, list[float]] = {s: [] for s in settings}
    begin = time.perf_counter()
    for r in range(args.rounds):
        for s in settings[r % len(settings):] + settings[:r % len(settings)]:
            run = generate(engine, ids, s, args.tokens)
            rates[s].append(run["decode_tokens_per_s"])
            if s in runs and run["tokens"] != runs[s]["tokens"]:
                raise SystemExit(f"{s}: round {r} decoded other tokens than round 0")
            runs.setdefault(s, run)
            print(f"round {r} {s}: {run['decode_tokens_per_s']:.1f} tok/s, KV {run['kv_bytes'] / 2**20:.1f} MiB "
                  f"({time.perf_counter() - begin:.0f} s)", flush=True)
    reference = runs["full"]["tokens"]
    versus = runs[args.versus]["tokens"] if args.versus in runs else None
    half = len(continuation) // 2
    results = {"model": args.model, "context": len(ids), "tokens": args.tokens, "rounds": args.rounds,
               "versus": args.versus if versus is not None else None,
               "threads": args.threads, "settings": {}}
    for s in settings:
        nll = forced_nll(engine, ids, continuation, s)
        run = runs[s]
        tokens = run.pop("tokens")
        first, same = agreement(tokens, reference)
        first_v, same_v = agreement(tokens, versus) if versus is not None else (None, None)
        results["settings"][s] = {**run, "decode_tokens_per_s": statistics.median(rates[s]), "all_rates": rates[s],
                                  "agree_prefix": first, "agree_share": same,
                                  "agree_versus_prefix": first_v, "agree_versus_share": same_v,
                                  "ppl": math.exp(sum(nll) / len(nll)),
                                  "ppl_second_half": math.exp(sum(nll[half:]) / len(nll[half:]))}
        print(f"{s}: ppl {results['settings'][s]['ppl']:.3f} ({time.perf_counter() - begin:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    full = results["settings"]["full"]
    lines = [f"{args.model}, {len(ids)}-token prompt (tinyshakespeare), {args.tokens} generated tokens, "
             f"{args.threads} thread(s), decode tokens/s median of {args.rounds} interleaved rounds; perplexity of "
             f"the text's next {len(continuation)} tokens teacher-forced (2nd half: its last "
             f"{len(continuation) - half}).",
             "", "| setting | KV at end MiB (vs full) | KV peak MiB | decode tok/s | greedy tokens = full: prefix / "
             f"share | = {results['versus']}: prefix / share | ppl (Δ) | ppl 2nd half (Δ) |",
             "|---|---|---|---|---|---|---|---|"]
    for s, v in results["settings"].items():
        lines.append(f"| {s} | {v['kv_bytes'] / 2**20:.1f} ({v['kv_full_bytes'] / v['kv_bytes']:.1f}x less) | "
                     f"{v['kv_peak_bytes'] / 2**20:.1f} | {v['decode_tokens_per_s']:.1f} | "
                     f"{v['agree_prefix']} / {100 * v['agree_share']:.0f}% | "
                     + ("-" if versus is None else f"{v['agree_versus_prefix']} / {100 * v['agree_versus_share']:.0f}%")
                     + f" | {v['ppl']:.3f} "
                     f"({100 * (v['ppl'] / full['ppl'] - 1):+.1f}%) | {v['ppl_second_half']:.3f} "
                     f"({100 * (v['ppl_second_half'] / full['ppl_second_half'] - 1):+.1f}%) |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
