"""The answers of extra settings on ``tachy eval needle``'s prompts, without re-running its dense baseline (a dense
8k prefill is minutes on a busy core): the same haystack, needle numbers (same seed) and scoring as the eval, so
the rows compare with an earlier eval run's baseline over the same contexts and depths.

    PYTHONPATH=src python benchmarks/needle_answers.py --context 8000 --depths 0,0.25,0.5,0.75,1 \
        --attention "minference:dense_layers=6" [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import tachy
from tachy.eval.needle import ANSWER_TOKENS, Haystack, needle_prompt
from tachy.eval.sweep import Setting, answer, read_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--attention", required=True, help="';'-separated attention specs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = tachy.load(args.model, progress=False)
    depths = [float(d) for d in args.depths.split(",")]
    hay = Haystack(engine, read_text(None, "--text"), args.context)
    rng = random.Random(0)   # run_needle's seed and order: the same number at each depth
    cells = [(d, rng.randrange(10000, 99999)) for d in depths]
    rows = []
    for spec in args.attention.split(";"):
        for depth, number in cells:
            ids = needle_prompt(engine, hay, args.context, depth, number)
            start = time.perf_counter()
            a = answer(engine, ids, Setting("none", 0.0, spec), ANSWER_TOKENS)
            out = engine.tokenizer.decode(a.tokens)
            rows.append({"attention": spec, "context": args.context, "depth": depth, "number": number, "answer": out,
                         "correct": str(number) in out, "prefill_s": a.stats.prefill_s,
                         "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
        got = [r["correct"] for r in rows if r["attention"] == spec]
        print(f"{spec}: {sum(got)}/{len(got)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "command": vars(args), "answers": rows}, f, indent=1)


if __name__ == "__main__":
    main()
