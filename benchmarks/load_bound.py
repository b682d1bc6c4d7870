"""How long a load-test level's prompts take to read with nothing else running: a floor under that level's
wall time for any scheduler (every prompt must be prefilled), hence a ceiling on its aggregate tokens/s.

In process, no HTTP, prefix cache off, the level's very prompts (benchmarks/load_test.py: chat requests with
the chat template, completions raw): each prefilled alone (``Engine._prefill``), then all of them through a
``BatchDecoder`` of ``--rows`` rows with one new token each (prompt chunks packed into shared forwards).

With ``--max-tokens N`` it then runs the whole level in process, greedy, N new tokens a request, through plain
rows and through packed speculative rows (the load test's two batching schedulers, the prefix cache on for the
packed rows as in the server, the rows always full): each one's wall time, and for the packed rows how many
forwards carried prompt chunks and how many tokens were drafted and accepted. Where that level's time goes.

    python benchmarks/load_bound.py --level 4        # the concurrency-16 level of `--concurrency 1 2 4 8 16`
    python benchmarks/load_bound.py --level 2 --max-tokens 64   # ... of `--concurrency 1 2 16`, as served
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import prompt_ids, prompts  # noqa: E402

import tachy  # noqa: E402
from tachy import GenerationConfig  # noqa: E402
from tachy.batch import BatchDecoder  # noqa: E402
from tachy.prefix_cache import DEFAULT_MB  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--level", type=int, default=4, help="the level's index in the load test's --concurrency list")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--long-every", type=int, default=10)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=0, help="then the whole level with this many new tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, progress=False)
    engine.set_prefix_cache(None)
    ids = prompt_ids(engine, prompts(args.long_every, args.requests, first=args.level * args.requests))
    start = time.perf_counter()
    for x in ids:
        engine._prefill(x, engine.model.new_cache(capacity=engine.cache_capacity(len(x), 1), fixed=True))
    alone = time.perf_counter() - start
    decoder, queue, one = BatchDecoder(engine, max_batch=args.rows), list(ids), GenerationConfig(max_new_tokens=1)
    start = time.perf_counter()
    while queue or decoder.rows:
        while queue and decoder.free:
            decoder.add(queue.pop(0), one)
        decoder.step()
    packed = time.perf_counter() - start
    print(f"{len(ids)} prompts, {sum(map(len, ids))} tokens: prefilled one by one {alone:.1f} s, "
          f"packed in {args.rows} rows {packed:.1f} s")
    if args.max_tokens:
        engine.set_prefix_cache(DEFAULT_MB)   # the server's default (plain rows do not use it)
        for packed_rows in (False, True):
            whole_level(engine, ids, args.rows, args.max_tokens, packed_rows)


def whole_level(engine, ids: list[list[int]], rows: int, max_tokens: int, packed: bool) -> None:
    """The level's requests through one BatchDecoder, ``rows`` at a time, FIFO."""
    decoder, queue, config = BatchDecoder(engine, max_batch=rows, packed=packed), list(ids), \
        GenerationConfig(max_new_tokens=max_tokens)
    forwards = []   # packed: (running rows, drafted tokens, prompt tokens) of each forward
    observe = decoder._observe_step
    decoder._observe_step = lambda r, d, c, e: (forwards.append((r, d, c)), observe(r, d, c, e))
    done: dict[int, object] = {}
    start = time.perf_counter()
    while queue or decoder.rows:
        events = []
        while queue and decoder.free:
            events += decoder.add(queue.pop(0), config)   # plain rows: a row may end at its first token
        for row, _ in events + decoder.step():
            done[id(row)] = row
    wall = time.perf_counter() - start
    made = sum(row.stats.generated_tokens for row in done.values())
    line = f"{'packed speculative' if packed else 'plain'} rows: {made} tokens in {wall:.1f} s, {made / wall:.1f} tokens/s"
    if packed:
        line += (f"; {len(forwards)} forwards, {sum(c > 0 for _, _, c in forwards)} with prompt chunks; "
                 f"{sum(row.stats.drafted for row in done.values())} tokens drafted, "
                 f"{sum(row.stats.accepted for row in done.values())} accepted")
    print(line)


if __name__ == "__main__":
    main()
