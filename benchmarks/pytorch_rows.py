"""Batch rows on the PyTorch forward (what runs on CUDA, or where the C forward cannot): plain rows against
speculative rows, and the lone path, in process, the schedulers taking turns in each round.

The engine is loaded with ``--dtype`` weights (bf16 by default) and its C forward turned off, on ``--device``.
Each concurrency level's ``--requests`` requests (the load test's prompts, greedy, ``--max-tokens`` new tokens
each) run through:

* ``lone path``: one after the other on the engine's own speculative path (``Engine.stream``), whatever the
  concurrency: what one request at a time gives;
* ``plain rows``: a ``BatchDecoder(packed=False)`` of ``c`` rows kept full from the queue, one token per row
  per step (the server's ``--batching plain``);
* ``speculative rows``: the same with ``packed=True`` (the default): every row drafts with its own drafter,
  one forward verifies every row's draft (tachy.batch).

Reported per level: each scheduler's median aggregate tokens/s over the rounds, and speculative rows over
plain rows and over the lone path (per round, then the median). Every scheduler's tokens must be the lone
path's, request by request (greedy): the run stops with an error otherwise.

    python benchmarks/pytorch_rows.py [--concurrency 1 4 8] [--requests 16] [--max-tokens 64] [--rounds 3]

writes docs/results/pytorch_rows/results.json and results.md (``--out`` elsewhere). On a CPU this forward is
bound by PyTorch's per-op dispatch, not by memory bandwidth: what it shows of a GPU is the shape (extra
tokens in a forward cost little), not the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import device_name  # noqa: E402
from load_test import prompt_ids, prompts  # noqa: E402

import tachy  # noqa: E402
from tachy import GenerationConfig  # noqa: E402
from tachy.batch import BatchDecoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = ("lone path", "plain rows", "speculative rows")


def lone(engine, ids: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    return [[t for piece in engine.stream(x, config) for t in piece.token_ids] for x in ids]


def rows(engine, ids: list[list[int]], config: GenerationConfig, width: int, packed: bool) -> list[list[int]]:
    """The requests through one BatchDecoder of ``width`` rows, FIFO, the rows kept full."""
    decoder, queue = BatchDecoder(engine, max_batch=width, packed=packed), list(enumerate(ids))
    out: dict[int, list[int]] = {i: [] for i in range(len(ids))}
    while queue or decoder.rows:
        events = []
        while queue and decoder.free:
            i, x = queue.pop(0)
            events += decoder.add(x, config, tag=i)
        for row, piece in events + decoder.step():
            out[row.tag] += piece.token_ids
    return [out[i] for i in range(len(ids))]


def engine_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """The options of the scripts that run the PyTorch forward in process (this one, handoff.py)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16", help="weights (tachy.load's dtype)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / out)


def pytorch_forward_engine(args: argparse.Namespace):
    """The engine of ``engine_arguments`` with its C forward off and no prefix cache (each scheduler, and
    each round, reads its prompts as the first did)."""
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, dtype=args.dtype, device=args.device, progress=False)
    engine.model.cpu_forward = None
    engine.set_prefix_cache(None)
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    engine_arguments(ap, "pytorch_rows")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--long-every", type=int, default=0, help="every n-th prompt a 1-2k-token passage (0: none)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drafter", default="default")
    args = ap.parse_args()
    engine = pytorch_forward_engine(args)   # plain rows have no prefix cache: the same prompt work for all three
    config = GenerationConfig(max_new_tokens=args.max_tokens, drafter=args.drafter, ignore_eos=True)
    run = {"lone path": lambda ids, c: lone(engine, ids, config),
           "plain rows": lambda ids, c: rows(engine, ids, config, c, packed=False),
           "speculative rows": lambda ids, c: rows(engine, ids, config, c, packed=True)}
    lone(engine, prompt_ids(engine, prompts(0, 2)), config)   # kernels' first-use setup, not in any timing
    levels = []
    for level, width in enumerate(args.concurrency):
        ids = prompt_ids(engine, prompts(args.long_every, args.requests, first=(level + 1) * args.requests))
        tokens = args.requests * args.max_tokens
        times: dict[str, list[float]] = {name: [] for name in SCHEDULERS}
        reference = None
        for r in range(args.rounds):
            for name in SCHEDULERS[r % 3:] + SCHEDULERS[:r % 3]:   # who goes first rotates by round
                start = time.perf_counter()
                got = run[name](ids, width)
                times[name].append(time.perf_counter() - start)
                reference = reference or got
                if got != reference:
                    bad = next(i for i, (a, b) in enumerate(zip(got, reference)) if a != b)
                    raise SystemExit(f"{name} at concurrency {width}: request {bad}'s tokens differ")
        tps = {name: [tokens / t for t in ts] for name, ts in times.items()}
        level_result = {"concurrency": width, "tokens": tokens,
                        "tokens_per_s": {name: statistics.median(v) for name, v in tps.items()},
                        "rounds_tokens_per_s": tps,
                        "speculative_over_plain": statistics.median(
                            s / p for s, p in zip(tps["speculative rows"], tps["plain rows"])),
                        "speculative_over_lone": statistics.median(
                            s / p for s, p in zip(tps["speculative rows"], tps["lone path"]))}
        levels.append(level_result)
        print(json.dumps(level_result), flush=True)
    results = {"model": args.model, "dtype": args.dtype, "device": device_name(torch.device(args.device)),
               "threads": args.threads,
               "requests": args.requests, "max_tokens": args.max_tokens, "long_every": args.long_every,
               "rounds": args.rounds, "drafter": args.drafter, "command": "python " + " ".join(sys.argv),
               "levels": levels}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"Batch rows on the PyTorch forward: {args.model} ({args.dtype}) on {results['device']}, "
             f"{args.requests} requests of {args.max_tokens} tokens per level, greedy, drafter {args.drafter!r}, "
             f"median of {args.rounds} rounds; every scheduler gave the lone path's tokens.", "",
             f"`{results['command']}`", "",
             "| concurrency | lone path | plain rows | speculative rows | speculative / plain | speculative / lone |",
             "|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        t = lv["tokens_per_s"]
        lines.append(f"| {lv['concurrency']} | {t['lone path']:.1f} | {t['plain rows']:.1f} | "
                     f"{t['speculative rows']:.1f} | {lv['speculative_over_plain']:.2f}x | "
                     f"{lv['speculative_over_lone']:.2f}x |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
