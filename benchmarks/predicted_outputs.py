"""Predicted Outputs on a code-editing workload: tokens/s with and without ``prediction``, greedy.

Prompts: the functions of the ``code_edit`` items of grounded_dev.jsonl, with either a small edit (workload
``rename``: rename the function, change nothing else, return the whole function) or the file's own edit
(workload ``code_edit``: add type hints and improve the docstring, which rewrites most lines). The prediction
is the original function, as an editor plugin would send it.
Methods, interleaved per prompt with a rotating order: plain decoding, the default drafter, the default
drafter plus the prediction, and the prediction alone (no other drafter). Greedy outputs must be identical
across methods (lossless); the script checks it and records it.

    python benchmarks/predicted_outputs.py [--workload rename|code_edit] [--limit 8] [--max-new-tokens 256]

writes docs/results/predicted_outputs/<workload>.json and <workload>.md.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import tachy
from tachy import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "grounded_dev.jsonl"
OUT = ROOT / "docs" / "results" / "predicted_outputs"
METHODS = {
    "plain": dict(drafter=None),
    "default": dict(drafter="default"),
    "default+prediction": dict(drafter="default", predict=True),
    "prediction only": dict(drafter=None, predict=True),
}


def load_items(path: Path, limit: int, workload: str) -> list[tuple[str, str, str]]:
    """(id, prompt, original code) of the code_edit items, shortest first."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = []
    for r in rows:
        code = re.search(r"```python\n(.*?)```", r["turns"][0], re.S) if r["category"] == "code_edit" else None
        name = re.search(r"def (\w+)", code.group(1)) if code else None
        if not name:
            continue
        prompt = r["turns"][0] if workload == "code_edit" else (
            f"Rename the function `{name.group(1)}` to `{name.group(1)}_v2`. Change nothing else and return "
            f"the whole function.\n\n```python\n{code.group(1)}```")
        items.append((r["id"], prompt, code.group(1)))
    return sorted(items, key=lambda x: len(x[1]))[:limit]


def run_once(engine, prompt_ids, code: str, method: dict, max_new_tokens: int) -> dict:
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, drafter=method["drafter"],
                              prediction=code if method.get("predict") else None)
    ids, stats = [], None
    start = time.perf_counter()
    for piece in engine.stream(prompt_ids, config):
        ids += piece.token_ids
        stats = piece.stats
    wall = time.perf_counter() - start
    return {"ids": ids, "tokens": stats.generated_tokens, "decode_tps": stats.tokens_per_s,
            "e2e_tps": stats.generated_tokens / wall, "mean_accepted": stats.mean_accepted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workload", choices=["rename", "code_edit"], default="rename")
    ap.add_argument("--limit", type=int, default=8, help="number of code_edit prompts (shortest first)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, progress=False)
    engine.warmup()
    items = load_items(DATA, args.limit, args.workload)
    names = list(METHODS)
    per_prompt, lossless = [], True
    for p, (pid, prompt, code) in enumerate(items):
        prompt_ids = engine.chat_prompt([{"role": "user", "content": prompt}])
        runs: dict[str, list[dict]] = {m: [] for m in names}
        for r in range(args.repeats):
            shift = (p + r) % len(names)
            for m in names[shift:] + names[:shift]:  # rotating order spreads machine noise over all methods
                runs[m].append(run_once(engine, prompt_ids, code, METHODS[m], args.max_new_tokens))
        same = all(run["ids"] == runs["plain"][0]["ids"] for m in names for run in runs[m])
        lossless &= same
        row = {"id": pid, "prompt_tokens": len(prompt_ids), "tokens": runs["plain"][0]["tokens"], "identical": same}
        for m in names:
            row[m] = {k: statistics.median(run[k] for run in runs[m])
                      for k in ("decode_tps", "e2e_tps", "mean_accepted")}
        per_prompt.append(row)
        print(f"{pid}: " + ", ".join(f"{m} {row[m]['decode_tps']:.1f}" for m in names) + " tokens/s"
              + ("" if same else "  OUTPUTS DIFFER"), file=sys.stderr, flush=True)
    summary = {}
    for m in names:
        summary[m] = {
            "median_decode_tps": statistics.median(r[m]["decode_tps"] for r in per_prompt),
            "median_e2e_tps": statistics.median(r[m]["e2e_tps"] for r in per_prompt),
            "median_mean_accepted": statistics.median(r[m]["mean_accepted"] for r in per_prompt),
            "median_speedup_vs_plain": statistics.median(r[m]["decode_tps"] / r["plain"]["decode_tps"]
                                                         for r in per_prompt),
            "median_speedup_vs_default": statistics.median(r[m]["decode_tps"] / r["default"]["decode_tps"]
                                                           for r in per_prompt),
        }
    command = "python benchmarks/predicted_outputs.py " + " ".join(sys.argv[1:])
    results = {"model": engine.name, "workload": args.workload, "prompts": len(items),
               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads, "lossless": lossless, "command": command,
               "summary": summary, "per_prompt": per_prompt}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.workload}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Predicted Outputs, {engine.name}, workload `{args.workload}` on {len(items)} functions of the "
             f"code_edit prompts of grounded_dev.jsonl, greedy, "
             f"{args.max_new_tokens} new tokens max, {args.threads} thread(s), medians over prompts of the median "
             f"of {args.repeats} interleaved runs. Outputs identical across methods: {lossless}.", "",
             f"Command: `{command}`", "",
             "| method | decode tokens/s | end-to-end tokens/s | tokens per forward | speedup vs plain | "
             "speedup vs default |", "|---|---:|---:|---:|---:|---:|"]
    for m in names:
        s = summary[m]
        lines.append(f"| {m} | {s['median_decode_tps']:.1f} | {s['median_e2e_tps']:.1f} | "
                     f"{s['median_mean_accepted']:.2f} | {s['median_speedup_vs_plain']:.2f}x | "
                     f"{s['median_speedup_vs_default']:.2f}x |")
    (args.out / f"{args.workload}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
