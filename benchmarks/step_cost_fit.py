"""What packed forwards cost against what the batch scheduler's fit says (tachy.batch.StepCostFit).

1. Timed directly: a forward over 8 running rows (one token each, each row 300 tokens into its own context),
   alone and with a prompt chunk of n tokens at position p riding along; a prompt token's cost is the
   difference per chunk token (medians of ``--rounds`` interleaved rounds). The rows' forward is set against
   the engine's measured cost of one sequence's 8-token forward (``Engine.step_costs``), which is what the
   fit scales.
2. The most speculation could give at concurrency 16: 16 rows each verifying k tokens (k - 1 drafted) against
   16 rows of one token, at 300 and 1,000 tokens of context per row. Were every draft accepted, a row would
   commit k tokens per forward, so k times the 1-token forward's time over the k-token forward's is the
   speed-up over plain batching's decode steps at perfect acceptance (prompt reading left out).
3. Fitted: the load test's requests (benchmarks/load_test.py's prompts, chat template on every other pair as
   the load test sends them) through one BatchDecoder of 8 rows, a closed loop that refills each free row at
   once; the fit's row scale and prompt-token cost as the run goes, and how many rows were reading their
   prompt per forward (rows that make no token yet).

    python benchmarks/step_cost_fit.py [--prompt-set code_edit] [--requests 48] [--max-tokens 256]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import PROMPT_SETS, prompt_ids, prompts  # noqa: E402

import tachy  # noqa: E402
from tachy import GenerationConfig, kernels  # noqa: E402
from tachy.batch import BatchDecoder  # noqa: E402
from tachy.cache import BatchKVCache  # noqa: E402

ROWS, CONTEXT = 8, 300


def filled_cache(engine, lengths: list[int], capacity: int) -> BatchKVCache:
    """A batch cache whose row r holds the K/V of lengths[r] random tokens (call under threads_to_kernels)."""
    cfg = engine.config
    cache = BatchKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, len(lengths),
                         dtype=engine.model.dtype, device=engine.device, lazy=False)
    for row, n in enumerate(lengths):
        ids = torch.randint(0, cfg.vocab_size, (n,))
        engine.model.cpu_forward.packed(cache, ids, torch.arange(n), torch.full((n,), row), torch.arange(n),
                                        torch.zeros(n, dtype=torch.long), None, torch.tensor([n - 1]))
    return cache


def timed_chunks(engine, rounds: int) -> None:
    cfg, forward = engine.config, engine.model.cpu_forward
    with kernels.threads_to_kernels(True):
        # rows 0-7 running, row 8 the joining prompt (room for chunks up to position 2,000)
        cache = filled_cache(engine, [CONTEXT] * ROWS + [2200], capacity=2400)

        def step(n: int, p: int) -> float:
            positions = torch.cat([torch.full((ROWS,), CONTEXT), torch.arange(p, p + n)])
            rows = torch.cat([torch.arange(ROWS), torch.full((n,), ROWS)])
            prefix = torch.cat([torch.full((ROWS,), CONTEXT), torch.full((n,), p)])
            start = time.perf_counter()
            forward.packed(cache, torch.randint(0, cfg.vocab_size, (ROWS + n,)), positions, rows, positions, prefix,
                           None, torch.arange(ROWS))
            return time.perf_counter() - start

        cases = [(0, 0)] + [(n, p) for n in (4, 16, 64) for p in (0, 500, 2000)]
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for case in cases:
                times[case].append(step(*case))
    alone = statistics.median(times[(0, 0)])
    engine_cost = engine.step_costs()[ROWS]
    print(f"{ROWS} running rows at {CONTEXT} tokens each: {1e3 * alone:.1f} ms; the engine's cost of one sequence's "
          f"{ROWS}-token forward: {1e3 * engine_cost:.1f} ms ({alone / engine_cost:.2f}x)")
    print("| chunk tokens | at position | ms per prompt token |\n|---:|---:|---:|")
    for n, p in cases[1:]:
        print(f"| {n} | {p} | {1e3 * (statistics.median(times[(n, p)]) - alone) / n:.2f} |")


def perfect_acceptance_bound(engine, rounds: int, rows: int = 16) -> None:
    cfg, forward = engine.config, engine.model.cpu_forward
    widths = [1, 2, 3, 4, 6, 8]
    print(f"\n{rows} rows verifying k tokens each: forward ms, and k x the 1-token forward / the k-token forward")
    print("| context per row | " + " | ".join(f"k = {k}" for k in widths) + " |\n|---:|" + "---:|" * len(widths))
    with kernels.threads_to_kernels(True):
        for context in (300, 1000):
            cache = filled_cache(engine, [context] * rows, capacity=context + 16)
            times = collections.defaultdict(list)
            for _ in range(rounds):
                for k in widths:
                    T = rows * k
                    positions = context + torch.arange(k).repeat(rows)
                    start = time.perf_counter()
                    forward.packed(cache, torch.randint(0, cfg.vocab_size, (T,)), positions,
                                   torch.arange(rows).repeat_interleave(k), positions, torch.full((T,), context),
                                   None, torch.arange(T))
                    times[k].append(time.perf_counter() - start)
            ms = {k: statistics.median(v) for k, v in times.items()}
            cells = [f"{1e3 * ms[k]:.1f} ({k * ms[1] / ms[k]:.2f}x)" for k in widths]
            print(f"| {context} | " + " | ".join(cells) + " |")


def fitted(engine, prompt_set: str, requests: int, max_tokens: int) -> None:
    ids = prompt_ids(engine, prompts(0, requests, 90_000, prompt_set))
    decoder = BatchDecoder(engine, ROWS)
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0)
    queue, steps, reading, tokens = collections.deque(ids), 0, 0, 0
    seen = []
    start = time.perf_counter()
    while queue or decoder.rows:
        while queue and decoder.free:
            decoder.add(queue.popleft(), config)
        reading += sum(bool(row.pending) for row in decoder.rows)
        for _, piece in decoder.step():
            tokens += len(piece.token_ids)
        steps += 1
        if decoder._fit is not None:
            seen.append((decoder._fit.row_scale, decoder._fit.prompt_token_s))
    wall = time.perf_counter() - start
    print(f"\n{requests} requests ({PROMPT_SETS[prompt_set]}, {sum(map(len, ids))} prompt tokens) through "
          f"{ROWS} rows: {tokens / wall:.1f} tokens/s, {steps} forwards, {reading / steps:.2f} rows reading their "
          "prompt per forward")
    print("fitted row scale / ms per prompt token, at every tenth of the run: " + ", ".join(
        f"{scale:.2f} / {1e3 * per:.2f}" for scale, per in seen[::max(1, len(seen) // 10)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-set", choices=list(PROMPT_SETS), default="code_edit")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    engine = tachy.load(args.model, progress=False)
    if engine.model.cpu_forward is None:
        sys.exit("needs tachy's C forward (a GGUF model on a CPU where the kernels load)")
    timed_chunks(engine, args.rounds)
    perfect_acceptance_bound(engine, args.rounds)
    fitted(engine, args.prompt_set, args.requests, args.max_tokens)


if __name__ == "__main__":
    main()
