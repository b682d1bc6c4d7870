"""Cost of one target forward over T new tokens (a verify step) relative to a one-token decode step.

This ratio decides what speculative decoding can gain: a step committing k tokens pays cost(T) / cost(1).
Uses the engine's exact attention path (fixed-size cache) and, for the C forward, its thread split
(``kernels.threads_to_kernels``), as generation does.

    python benchmarks/verify_cost.py [--model smollm2-135m] [--context 300] [--dtype int4] [--draft-step]

``--draft-step`` also times DraftStep (models/draft_step.py), the lean step draft tokens run, feeding 1 to 5
tokens (a chain step, and a step that also checks a guessed continuation), in the same interleaved loop.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tachy
from tachy import kernels
from tachy.cache import key_bucket
from tachy.models.draft_step import DraftStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--draft-step", action="store_true", help="also time DraftStep feeding 1-5 tokens")
    args = ap.parse_args()
    engine = tachy.load(args.model, dtype=args.dtype, progress=False)
    engine.warmup(17)
    model = engine.model
    widths = [1, 2, 4, 8, 12, 16]
    with torch.inference_mode():
        cache = model.new_cache(key_bucket(args.context + 128), fixed=True)
        native = model.exact_trees(cache)   # the kernels' thread split, as Engine's steps
        model(torch.randint(0, 1000, (1, args.context)), torch.arange(args.context), cache, last_only=True)
        times: dict[int, list[float]] = {T: [] for T in widths}
        lean = DraftStep(model) if args.draft_step else None
        step_times: dict[int, list[float]] = {n: [] for n in range(1, 6)}
        for _ in range(args.repeats):           # interleaved over widths
            for n in step_times if lean is not None else ():
                with cache.plain_rows():        # DraftStep reads a plain, growing cache
                    start = time.perf_counter()
                    lean(7 if n == 1 else list(range(7, 7 + n)), cache)
                    step_times[n].append(time.perf_counter() - start)
                cache.rollback(n)
            for T in widths:
                # the mask too: a PyTorch op on two threads right before a forward slows it (thread_spin.py)
                with kernels.threads_to_kernels(native):
                    L = cache.length
                    mask = torch.ones(T, L + T, dtype=torch.bool).tril(L)
                    tokens, positions = torch.randint(0, 1000, (1, T)), torch.arange(L, L + T)
                    start = time.perf_counter()
                    model(tokens, positions, cache, mask)
                    times[T].append(time.perf_counter() - start)
                    cache.rollback(T)
    base = statistics.median(times[1])
    print(f"{args.model}, context {args.context}, median of {args.repeats}")
    print("| T | ms | vs T=1 |\n|---|---|---|")
    for T in widths:
        med = statistics.median(times[T])
        print(f"| {T} | {1000 * med:.1f} | {med / base:.2f}x |")
    for n, samples in step_times.items() if lean is not None else ():
        med = statistics.median(samples)
        print(f"| DraftStep, {n} | {1000 * med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
