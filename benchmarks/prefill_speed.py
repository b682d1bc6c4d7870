"""Prefill (prompt processing) tokens/s by prompt length, on the engine's default forward: best of 3 runs.

Long prompts are where attention, not weight reads, decides the time (each token reads every earlier key), so
the speed falls with length; this tracks it. Text: monte_cristo_pg1184.txt. ``--llama-cpp`` also times
llama.cpp (llama-cpp-python, `make bench-env`; run with .venv-bench's python) prefilling the same token ids
from the same GGUF file, length by length beside tachy.

    python benchmarks/prefill_speed.py [--model smollm2-135m] [--lengths 500 1000 2000 2700] [--llama-cpp]
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import tachy
from tachy import kernels
from tachy.registry import resolve_model

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "monte_cristo_pg1184.txt"


def best_of(runs: int, prefill) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        prefill()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000, 2700])
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp on the same GGUF file and ids")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, progress=False)
    ids = engine.tokenizer.encode(BOOK.read_text()[100_000:100_000 + 8 * max(args.lengths)])
    native = engine.model.cpu_forward is not None
    llm = None
    if args.llama_cpp:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(resolve_model(args.model)), n_ctx=max(args.lengths) + 16,
                              n_threads=args.threads, n_threads_batch=args.threads, n_batch=512, verbose=False)
    for n in args.lengths:
        def tachy_prefill() -> None:
            cache = engine.model.new_cache(capacity=engine.cache_capacity(n, 1), fixed=True)
            with torch.inference_mode(), kernels.threads_to_kernels() if native else nullcontext():
                engine._prefill(ids[:n], cache)

        def llama_prefill() -> None:
            llm.reset()
            llm.eval(ids[:n])

        seconds = best_of(3, tachy_prefill)
        line = f"{args.model}: {n} tokens prefilled in {seconds:.2f} s, {n / seconds:.0f} tokens/s"
        if llm is not None:
            theirs = best_of(3, llama_prefill)
            line += f"; llama.cpp {theirs:.2f} s, {n / theirs:.0f} tokens/s ({theirs / seconds:.2f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
