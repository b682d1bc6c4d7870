"""Host time per target forward, outside the C forward: the lone engine path against a BatchDecoder holding one
row (the server's default scheduler at concurrency 1), on the same prompts, taking turns, in one process.

A decode step of SmolLM2-135M is a ~4 ms forward; what Python does around it (drafting, building the forward's
index tensors, verification, the text stream) is paid every step, by every request. Each forward is timed
(``CPUForward._run``), so the overhead is each path's wall time less its forwards' time: a number that the
machine's noise moves far less than the forwards themselves. Also checks that both paths give the same tokens.

    python benchmarks/step_overhead.py [--prompts 30] [--max-tokens 64] [--rounds 3] [--out DIR]

writes DIR/results.md (the table) when --out is given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import prompt_ids, prompts  # noqa: E402

import tachy  # noqa: E402
from tachy import GenerationConfig  # noqa: E402
from tachy.batch import BatchDecoder  # noqa: E402
from tachy.models import cpu_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=30, help="the load test's questions (no long passages)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, progress=False)
    engine.set_prefix_cache(None)   # both paths prefill every prompt
    ids = prompt_ids(engine, prompts(0, args.prompts, first=1000))
    decoder = BatchDecoder(engine, max_batch=8)

    def lone(x: list[int]) -> list[int]:
        return [t for piece in engine.stream(x, GenerationConfig(max_new_tokens=args.max_tokens))
                for t in piece.token_ids]

    def one_row(x: list[int]) -> list[int]:
        out = [t for _, response in decoder.add(x, GenerationConfig(max_new_tokens=args.max_tokens))
               for t in response.token_ids]
        while decoder.rows:
            out += [t for _, response in decoder.step() for t in response.token_ids]
        if decoder.failed:
            raise RuntimeError(f"a row failed: {decoder.failed}")
        return out

    forward_s = [0.0]
    forwards = [0]
    run = cpu_forward.CPUForward._run

    def timed_run(self, *a, **k):
        start = time.perf_counter()
        try:
            return run(self, *a, **k)
        finally:
            forward_s[0] += time.perf_counter() - start
            forwards[0] += 1

    cpu_forward.CPUForward._run = timed_run
    paths = {"lone engine path": lone, "batch decoder, one row": one_row}
    for f in paths.values():   # compiled kernels, measured step costs, warm caches
        f(ids[0])
    per_round = {name: [] for name in paths}
    for r in range(args.rounds):
        totals = {name: [0.0, 0.0, 0] for name in paths}   # wall, forwards' time, forwards
        for i, x in enumerate(ids):
            order = list(paths.items())[:: 1 if (i + r) % 2 else -1]
            outputs = {}
            for name, f in order:
                forward_s[0], forwards[0] = 0.0, 0
                start = time.perf_counter()
                outputs[name] = f(x)
                t = totals[name]
                t[0] += time.perf_counter() - start
                t[1] += forward_s[0]
                t[2] += forwards[0]
            if len(set(map(tuple, outputs.values()))) != 1:
                raise SystemExit(f"prompt {i}: the two paths' tokens differ")
        for name, (wall, fwd, n) in totals.items():
            per_round[name].append((wall, fwd, n))
            print(f"round {r + 1} {name}: {n} forwards, {fwd / n * 1e3:.3f} ms each, "
                  f"{(wall - fwd) / n * 1e3:.3f} ms outside them, wall {wall:.2f} s", flush=True)
    lines = [f"{args.model}, {args.prompts} prompts x {args.max_tokens} new tokens, {args.rounds} rounds "
             f"(medians), {args.threads} threads:", "",
             "| path | forward ms | outside the forward, ms per forward | wall s |", "|---|---:|---:|---:|"]
    for name, runs in per_round.items():
        lines.append(f"| {name} | {statistics.median(f / n * 1e3 for _, f, n in runs):.3f} | "
                     f"{statistics.median((w - f) / n * 1e3 for w, f, n in runs):.3f} | "
                     f"{statistics.median(w for w, _, _ in runs):.2f} |")
    walls = [a[0] / b[0] for a, b in zip(*per_round.values())]
    lines += ["", f"One row's speed / the lone path's, per round: {', '.join(f'{w:.3f}' for w in walls)}."]
    print("\n" + "\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
