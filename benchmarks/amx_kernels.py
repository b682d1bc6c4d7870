"""The C forward with Intel's AMX tiles against without them, side by side in one process (interleaved rounds).

Where the CPU has AMX (Sapphire Rapids on), the kernels score attention on its bf16 tiles and take the int8
matrix products' block sums from its int8 tiles (kernels/decoder.c ``amx_scores``, kernels/q8_matmul.c
``amx_tile``); ``kernels.use_amx`` switches both. Measured: prefill tokens/s by prompt length (a fresh cache
per run), and one forward over T new tokens after a 1000-token context (a verify step's shape: T tokens with a
causal mask, as speculative and batched steps run), milliseconds and each phase's share from the decoder's own
clocks. Each round times every case with AMX on and off in turn; reported: medians over rounds and their ratio.

    python benchmarks/amx_kernels.py [--model smollm2-135m] [--rounds 5] [--out docs/results/amx]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import tachy
from tachy import kernels

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "monte_cristo_pg1184.txt"
OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "amx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 8, 16, 64])
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not kernels.use_amx(True):
        sys.exit("no AMX here: the kernels run without it on this CPU (or TACHY_AMX=0), nothing to compare")
    engine = tachy.load(args.model, progress=False)
    model = engine.model
    if model.cpu_forward is None:
        sys.exit("the C forward does not run this model here")
    engine.warmup(17)
    ids = engine.tokenizer.encode(BOOK.read_text()[100_000:100_000 + 8 * max(args.lengths + [args.context + 64])])
    prefill = {(n, on): [] for n in args.lengths for on in (True, False)}
    step = {(T, on): [] for T in args.widths for on in (True, False)}
    phases = {(T, on): {} for T in args.widths for on in (True, False)}
    with torch.inference_mode(), kernels.threads_to_kernels():
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):   # who goes first alternates
                kernels.use_amx(on)
                for n in args.lengths:
                    cache = model.new_cache(capacity=engine.cache_capacity(n, 1), fixed=True)
                    start = time.perf_counter()
                    engine._prefill(ids[:n], cache)
                    prefill[n, on].append(time.perf_counter() - start)
                cache = model.new_cache(capacity=engine.cache_capacity(args.context + max(args.widths), 1),
                                        fixed=True)
                engine._prefill(ids[:args.context], cache)
                for T in args.widths:
                    L = cache.length
                    mask = torch.ones(T, L + T, dtype=torch.bool).tril(L)
                    tokens = torch.tensor([ids[L:L + T]])
                    kernels.forward_profile(reset=True)
                    start = time.perf_counter()
                    model(tokens, torch.arange(L, L + T), cache, mask)
                    step[T, on].append(time.perf_counter() - start)
                    for k, v in kernels.forward_profile(reset=True)[0].items():
                        phases[T, on].setdefault(k, []).append(v)
                    cache.rollback(T)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    kernels.use_amx(True)
    med = statistics.median
    lines = ["`" + " ".join(["python benchmarks/amx_kernels.py", *sys.argv[1:]]) + "`", "",
             f"{args.model}, 2 threads, medians of {args.rounds} interleaved rounds", "",
             "| prefill | without AMX | with AMX | speed-up |", "|---|---|---|---|"]
    for n in args.lengths:
        off, on = med(prefill[n, False]), med(prefill[n, True])
        lines.append(f"| {n} tokens | {n / off:.0f} tokens/s | {n / on:.0f} tokens/s | {off / on:.2f}x |")
    lines += ["", f"One forward over T new tokens after {args.context} tokens (causal mask), ms; attention and matrix "
              "products (q/k/v, output, gate/up, down, output layer) from the decoder's clocks", "",
              "| T | without AMX | with AMX | speed-up | attention without / with | products without / with |",
              "|---|---|---|---|---|---|"]
    products = ["q/k/v projection", "output projection + residual", "gate/up + activation", "down + residual",
                "final norm + output layer"]
    rows = {}
    for T in args.widths:
        off, on = med(step[T, False]), med(step[T, True])
        att = [med(phases[T, x]["attention"]) for x in (False, True)]
        mm = [sum(med(phases[T, x][p]) for p in products) for x in (False, True)]
        rows[T] = {"off_ms": off * 1e3, "on_ms": on * 1e3, "attention_ms": [a * 1e3 for a in att],
                   "products_ms": [m * 1e3 for m in mm]}
        lines.append(f"| {T} | {off * 1e3:.1f} | {on * 1e3:.1f} | {off / on:.2f}x | {att[0] * 1e3:.1f} / "
                     f"{att[1] * 1e3:.1f} | {mm[0] * 1e3:.1f} / {mm[1] * 1e3:.1f} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({
        "model": args.model, "rounds": args.rounds, "context": args.context,
        "prefill_s": {f"{n}/{'amx' if on else 'no amx'}": v for (n, on), v in prefill.items()},
        "forward": rows}, indent=1))


if __name__ == "__main__":
    main()
