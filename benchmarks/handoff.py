"""A request arriving during a lone generation on the PyTorch forward: handed off into a batch (now) against
waiting for that generation to end (before), in process through the server's Scheduler, taking turns.

On the PyTorch forward (CUDA's, or a CPU engine without the C forward) a lone request runs on the engine's own
path, its default drafter the int4 self-draft. A long request (``--long-tokens``) starts alone; once it has
sent ``--arrive-after`` tokens a short one (``--short-tokens``) arrives. ``handoff``: the lone generation
moves into a batch between two steps (``generation.Handoff``) and both decode as rows; ``wait``: the short
one waits for the long one's end (the scheduler's handoff turned off). Reported, medians over the rounds: the
short request's time to first token and to its last, and the long request's time in all. Both requests must
get their lone tokens (greedy) in both modes, or the run stops with an error.

    python benchmarks/handoff.py [--dtype bf16] [--rounds 5] [--out docs/results/handoff]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import device_name  # noqa: E402
from load_test import prompt_ids, prompts  # noqa: E402
from pytorch_rows import engine_arguments, pytorch_forward_engine  # noqa: E402

from tachy import GenerationConfig  # noqa: E402
from tachy.server.scheduler import Job, Scheduler  # noqa: E402

MODES = ("handoff", "wait")
TIMES = ("short_ttft", "short_total", "long_total")


async def one_round(engine, mode: str, long: tuple, short: tuple, arrive_after: int) -> dict:
    """Times (s): the short request's from its arrival, the long one's from its submission; whether the short
    request's first token came before the long one's last; each request's tokens."""
    loop = asyncio.get_running_loop()
    sched = Scheduler(engine, max_batch=8)
    if mode == "wait":
        sched._may_hand_off = lambda job: False
    start = time.perf_counter()
    long_job, short_job = Job([long], loop), Job([short], loop)
    sched.submit(long_job)
    out = {"long": [], "short": []}
    arrived = None
    while True:
        kind, _, piece = await long_job.channel.get()
        if kind == "end":
            break
        if kind == "error":
            raise SystemExit(f"the long request failed: {piece}")
        out["long"] += piece.token_ids
        if arrived is None and len(out["long"]) >= arrive_after:
            arrived = time.perf_counter()
            sched.submit(short_job)
            short_task = asyncio.ensure_future(drain(short_job, out["short"]))
    long_end = time.perf_counter()
    first, short_end = await short_task
    sched.close()
    return {"short_ttft": first - arrived, "short_total": short_end - arrived, "long_total": long_end - start,
            "short_started_first": first < long_end, "tokens": out}


async def drain(job: Job, tokens: list[int]) -> tuple[float, float]:
    first = None
    while True:
        kind, _, piece = await job.channel.get()
        if kind == "end":
            return first, time.perf_counter()
        if kind == "error":
            raise SystemExit(f"the short request failed: {piece}")
        first = first or time.perf_counter()
        tokens += piece.token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    engine_arguments(ap, "handoff")
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--short-tokens", type=int, default=32)
    ap.add_argument("--arrive-after", type=int, default=32, help="long-request tokens sent before the short one")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not 1 <= args.arrive_after < args.long_tokens:
        ap.error(f"--arrive-after must be at least 1 and below --long-tokens ({args.long_tokens})")
    engine = pytorch_forward_engine(args)
    long_ids, short_ids = prompt_ids(engine, prompts(0, 2, first=100))
    long = (long_ids, GenerationConfig(max_new_tokens=args.long_tokens, ignore_eos=True))
    short = (short_ids, GenerationConfig(max_new_tokens=args.short_tokens, ignore_eos=True))
    lone = {name: [t for piece in engine.stream(*request) for t in piece.token_ids]
            for name, request in (("long", long), ("short", short))}   # also the first-use setup
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % 2:] + MODES[:r % 2]:   # who goes first alternates
            result = asyncio.run(one_round(engine, mode, long, short, args.arrive_after))
            if result.pop("tokens") != lone:
                raise SystemExit(f"{mode}, round {r}: a request's tokens are not its lone tokens")
            runs[mode].append(result)
            print(mode, json.dumps({k: round(v, 3) for k, v in result.items()}), flush=True)
    medians = {mode: {k: statistics.median(run[k] for run in runs[mode]) for k in TIMES} for mode in MODES}
    results = {"model": args.model, "dtype": args.dtype, "device": device_name(torch.device(args.device)),
               "threads": args.threads, "long_tokens": args.long_tokens, "short_tokens": args.short_tokens,
               "arrive_after": args.arrive_after, "rounds": args.rounds,
               "command": "python " + " ".join(sys.argv), "medians": medians, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"A short request ({args.short_tokens} tokens) arriving after {args.arrive_after} tokens of a lone "
             f"one ({args.long_tokens} tokens) on the PyTorch forward: {args.model} ({args.dtype}) on "
             f"{results['device']}, greedy, medians of {args.rounds} rounds; both got their lone tokens.", "",
             f"`{results['command']}`", "",
             "| mode | short: first token (s) | short: last token (s) | long: all (s) |", "|---|---:|---:|---:|"]
    for mode in MODES:
        m = medians[mode]
        lines.append(f"| {mode} | {m['short_ttft']:.2f} | {m['short_total']:.2f} | {m['long_total']:.2f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
