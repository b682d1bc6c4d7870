"""What a PyTorch op on two threads right before a C forward costs that forward (kernels.threads_to_kernels).

After a parallel region, PyTorch's OpenMP threads spin for a while waiting for more work; on a 2-core machine
they then hold the cores the C forward's own thread pool needs. The engine therefore runs every PyTorch op
around its forwards (cache set-up and copies, choosing tokens, drafting, search strategies' bookkeeping) with
PyTorch on one thread. This times one forward of T tokens after 300 tokens of context, right after each of a
few small PyTorch ops run on PyTorch's threads (or on one), interleaved; before each case 50 ms of quiet (a
spin outlasts a 7 ms forward) and an untimed forward (waking the kernels' threads); medians.

    python benchmarks/thread_spin.py [--tokens 2] [--repeats 60]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tachy
from tachy import kernels
from tachy.cache import key_bucket


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2, help="new tokens per forward")
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    engine = tachy.load(args.model, progress=False)
    model, T = engine.model, args.tokens
    if model.cpu_forward is None:
        raise SystemExit("the C forward does not run on this machine: nothing to measure")
    vocab = engine.config.vocab_size
    ops = {"nothing": lambda: None,
           "causal mask [T, 300 + T]": lambda: torch.ones(T, 300 + T, dtype=torch.bool).tril(300),
           "softmax over the vocabulary": lambda: torch.softmax(torch.zeros(vocab), -1),
           "argmax over 2 x vocabulary": lambda: torch.zeros(2, vocab).argmax(-1),
           "zeroed 4 MB (a cache's fill)": lambda: torch.zeros(1 << 20)}
    times: dict[str, list[float]] = {f"{name}, {where}": [] for name in ops for where in ("two threads", "one")}
    with torch.inference_mode():
        cache = model.new_cache(key_bucket(300 + T + 1), fixed=True)
        with kernels.threads_to_kernels():
            model(torch.randint(0, 1000, (1, 300)), torch.arange(300), cache, last_only=True)
        for _ in range(args.repeats):
            for name, op in ops.items():
                for where in ("two threads", "one"):
                    time.sleep(0.05)   # a spin left by the previous case must not carry into this one,
                    with kernels.threads_to_kernels():   # and one forward wakes the kernels' threads again
                        model(torch.randint(0, 1000, (1, T)), torch.arange(300, 300 + T), cache)
                        cache.rollback(T)
                    with kernels.threads_to_kernels(where == "one"):
                        op()
                    tokens, positions = torch.randint(0, 1000, (1, T)), torch.arange(300, 300 + T)
                    with kernels.threads_to_kernels():
                        start = time.perf_counter()
                        model(tokens, positions, cache)
                        times[f"{name}, {where}"].append(time.perf_counter() - start)
                        cache.rollback(T)
    base = statistics.median(times["nothing, one"])
    print(f"{args.model}, one forward of {T} tokens after 300, PyTorch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| op right before the forward | on | forward ms | vs nothing |\n|---|---|---:|---:|")
    for key, samples in times.items():
        name, where = key.rsplit(", ", 1)
        med = statistics.median(samples)
        print(f"| {name} | {where} | {1000 * med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
