"""What the batch scheduler's prompt-chunk budget costs in throughput, in process (no HTTP).

The load test's requests (benchmarks/load_test.py's prompts, raw text, 64 new tokens, greedy) go through one
``BatchDecoder`` of ``--rows`` rows from a FIFO queue, prefix cache off, under each budget in turn:
``plain`` (plain batching: each prompt prefilled whole, one token per row per step), ``default`` (speculative
batching's budget: a joining prompt's chunk costs about ``prefill_share`` times the running rows' tokens), and
``fixedN`` (every forward filled to N tokens with prompt chunks, the running rows' tokens first). Larger
budgets read prompts in wider, cheaper forwards, at the price of the running streams' inter-token latency (a
step is a forward; plain batching's steps exclude the whole-prompt prefills, which stall every row).

    python benchmarks/chunk_budget.py [--requests 100] [--budgets plain default fixed64 fixed128 fixed256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import prompts  # noqa: E402

import tachy  # noqa: E402
from tachy import GenerationConfig  # noqa: E402
from tachy.batch import BatchDecoder  # noqa: E402


def run(engine, ids: list[list[int]], rows: int, budget: str) -> tuple[float, int, float]:
    """(seconds, completion tokens, p99 step ms) of every request through one decoder."""
    decoder = BatchDecoder(engine, max_batch=rows, packed=budget != "plain")
    if budget.startswith("fixed"):
        width = int(budget[len("fixed"):])
        decoder._chunk_budget = lambda rows, drafted=0: max(width - rows - drafted, 4)
    queue, tokens, steps = list(ids), 0, []
    config = GenerationConfig(max_new_tokens=64)
    start = time.perf_counter()
    while queue or decoder.rows:
        while queue and decoder.free:
            for row, piece in decoder.add(queue.pop(0), config):
                tokens += row.stats.generated_tokens if piece.finish_reason else 0
        t = time.perf_counter()
        for row, piece in decoder.step():
            tokens += row.stats.generated_tokens if piece.finish_reason else 0
        steps.append(time.perf_counter() - t)
    return time.perf_counter() - start, tokens, 1000 * statistics.quantiles(steps, n=100)[98]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--budgets", nargs="+", default=["plain", "default", "fixed64", "fixed128", "fixed256"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, progress=False)
    engine.set_prefix_cache(None)
    ids = [engine.tokenizer.encode(text) for text in prompts(10, args.requests)]
    print(f"{len(ids)} requests, {sum(map(len, ids))} prompt tokens, {args.rows} rows")
    print("| budget | seconds | completion tokens/s | p99 step ms |\n|---|---:|---:|---:|")
    for budget in args.budgets:
        seconds, tokens, step_ms = run(engine, ids, args.rows, budget)
        print(f"| {budget} | {seconds:.1f} | {tokens / seconds:.1f} | {step_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
