"""Prefill (prompt processing) tokens/s by prompt length, on the engine's default forward: best of 3 runs.

Long prompts are where attention, not weight reads, decides the time (each token reads every earlier key), so
the speed falls with length; this tracks it. Text: monte_cristo_pg1184.txt.

    python benchmarks/prefill_speed.py [--model smollm2-135m] [--lengths 500 1000 2000 2700]
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import tachy
from tachy import kernels

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "monte_cristo_pg1184.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000, 2700])
    args = ap.parse_args()
    engine = tachy.load(args.model, progress=False)
    ids = engine.tokenizer.encode(BOOK.read_text()[100_000:100_000 + 8 * max(args.lengths)])
    native = engine.model.cpu_forward is not None
    for n in args.lengths:
        best = float("inf")
        for _ in range(3):
            cache = engine.model.new_cache(capacity=engine.cache_capacity(n, 1), fixed=True)
            start = time.perf_counter()
            with torch.inference_mode(), kernels.threads_to_kernels() if native else nullcontext():
                engine._prefill(ids[:n], cache)
            best = min(best, time.perf_counter() - start)
        print(f"{args.model}: {n} tokens prefilled in {best:.2f} s, {n / best:.0f} tokens/s")


if __name__ == "__main__":
    main()
