"""Decode tokens/s at a long context with a compressed vs the full KV cache (interleaved rounds, medians).

    PYTHONPATH=src python benchmarks/press_speed.py [--model smollm2-135m] [--context 4096] [--tokens 32]
        [--rounds 5] [--settings full,snapkv@0.5,snapkv@0.75,kivi4@0,snapkv+kivi4@0.75]

One 4k-token prompt (tinyshakespeare) is prefilled once; each round decodes ``--tokens`` greedy tokens from a
fresh compressed copy of the cache for every setting in turn (order rotating per round), so machine noise
spreads over all settings alike. Writes docs/results/presses-speed/results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tachy
from tachy.eval.sweep import Prefilled, Setting, greedy, read_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="full,snapkv@0.5,snapkv@0.75,kivi4@0,snapkv+kivi4@0.75")
    ap.add_argument("--out", default="docs/results/presses-speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [Setting("full", 0.0) if s == "full" else Setting(s.split("@")[0], float(s.split("@")[1]))
                for s in args.settings.split(",")]
    engine = tachy.load(args.model, progress=False)
    ids = engine.tokenizer.encode(read_text(None, "--text")[: args.context * 8])[: args.context]
    rates: dict[str, list[float]] = {s.label: [] for s in settings}
    kv: dict[str, int] = {}
    with torch.inference_mode():
        pre = Prefilled(engine, ids[:-1], args.tokens + 1)
        greedy(engine, pre.compressed(settings[0]), ids[-1], 4)   # warm-up
        for r in range(args.rounds):
            for s in settings[r % len(settings):] + settings[:r % len(settings)]:
                cache = pre.compressed(s)
                kv[s.label] = cache.nbytes
                start = time.perf_counter()
                n = len(greedy(engine, cache, ids[-1], args.tokens))
                rates[s.label].append(n / (time.perf_counter() - start))
    results = {"model": args.model, "context": args.context, "tokens": args.tokens, "rounds": args.rounds,
               "threads": args.threads,
               "settings": {k: {"tokens_per_s": statistics.median(v), "all": v, "kv_bytes": kv[k]}
                            for k, v in rates.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    full = results["settings"]["full"]["tokens_per_s"]
    lines = [f"{args.model}, {args.context}-token prompt, {args.tokens} greedy tokens x {args.rounds} interleaved "
             f"rounds, {args.threads} thread(s); median tokens/s.", "",
             "| setting | tokens/s | vs full | KV MiB |", "|---|---|---|---|"]
    for k, v in results["settings"].items():
        lines.append(f"| {k} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / full:.2f}x | "
                     f"{v['kv_bytes'] / 2**20:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
