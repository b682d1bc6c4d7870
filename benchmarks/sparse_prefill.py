"""Prefill speed: dense attention vs prefill-time sparse attention (MInference, tachy.sparse) on one long prompt
(interleaved rounds, medians).

    PYTHONPATH=src python benchmarks/sparse_prefill.py [--model smollm2-135m] [--context 8192] [--rounds 2]
        [--threads 1] [--settings dense,minference] [--out docs/results/long_context/sparse-prefill]

Each round prefills the prompt of benchmarks/long_context.py (tinyshakespeare cut to ``--context`` tokens, then a
question, as a chat turn) under every setting in turn (order rotating per round), as ``Engine.generate_tokens``
does (``prepare`` - a calibration on first use, not timed -, ``attach_prefill``, then the chunked
``Engine._prefill``), and times the prefill alone. Reported per setting: median prefill seconds, the ratio to the
first setting (ratio of medians, and the median of per-round ratios), the C decoder's attention share of the
prefill (tq_profile), and whether the first token (argmax of the last logits) is the first setting's.
Writes results.json and results.md to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tachy
from tachy import kernels
from tachy.sparse import make_attention
from long_context import long_prompt

PHASES = 9   # tq_profile's phases and the forward count


def profile(reset: bool = False) -> list[float]:
    out = (torch.zeros(PHASES + 1, dtype=torch.float64))
    lib = kernels.library()
    if lib is not None:
        lib.tq_profile(out.data_ptr(), int(reset))
    return out.tolist()


def prefill(engine, ids: list[int], spec: str) -> tuple[float, int, float]:
    """(seconds, first token, attention seconds) of one prefill of ``ids`` under ``spec``."""
    method = make_attention(spec)
    cache = engine.model.new_cache(capacity=engine.cache_capacity(len(ids), 1), fixed=True)
    if method is not None and method.sparse_prefill:
        method.prepare(engine)
        method.attach_prefill(engine.model, cache, len(ids))
    profile(reset=True)
    start = time.perf_counter()
    with torch.inference_mode(), kernels.threads_to_kernels():
        logits = engine._prefill(ids, cache)
    seconds = time.perf_counter() - start
    return seconds, int(logits.argmax(-1)), profile()[3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="dense;minference", help="';'-separated attention specs")
    ap.add_argument("--out", default="docs/results/long_context/sparse-prefill")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = args.settings.split(";")
    methods = {s: make_attention(s) for s in settings}          # bad specs fail before the model loads
    engine = tachy.load(args.model, progress=False)
    ids = long_prompt(engine, min(args.context, engine.max_context - 2))
    for s, m in methods.items():   # calibrations (once per model, cached) before any timing
        if m is not None:
            m.prepare(engine)
    engine.generate(ids[:64], max_new_tokens=2, drafter=None)   # warm-up
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in settings[r % len(settings):] + settings[:r % len(settings)]:
            seconds, token, attention_s = prefill(engine, ids, s)
            runs[s].append({"prefill_s": seconds, "first_token": token, "attention_s": attention_s})
            print(f"round {r} {s}: prefill {seconds:.1f}s (attention {attention_s:.1f}s), first token {token}",
                  flush=True)
    base = settings[0]
    results = {"model": args.model, "prompt_tokens": len(ids), "rounds": args.rounds, "threads": args.threads,
               "settings": {}}
    for s in settings:
        med = statistics.median(x["prefill_s"] for x in runs[s])
        results["settings"][s] = {
            "prefill_s": med,
            "speedup": statistics.median(x["prefill_s"] for x in runs[base]) / med,
            "speedup_per_round": [b["prefill_s"] / x["prefill_s"] for x, b in zip(runs[s], runs[base])],
            "attention_s": statistics.median(x["attention_s"] for x in runs[s]),
            "same_first_token": all(x["first_token"] == runs[base][0]["first_token"] for x in runs[s]),
            "runs": runs[s]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"{args.model}, {len(ids)}-token prompt, {args.rounds} interleaved rounds, {args.threads} thread(s); "
             f"medians; speedup against `{base}`.", "",
             "| setting | prefill s | speedup (ratio of medians; median of per-round) | attention s "
             "| first token as base |",
             "|---|---|---|---|---|"]
    for s, v in results["settings"].items():
        lines.append(f"| {s} | {v['prefill_s']:.1f} | {v['speedup']:.2f}x; "
                     f"{statistics.median(v['speedup_per_round']):.2f}x | {v['attention_s']:.1f} | "
                     f"{'yes' if v['same_first_token'] else 'no'} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
