"""How many draft tokens each verify step accepts, by the draft's length (the default drafter, greedy).

What a change to verification must be weighed against: e.g. computing a verify step's output-layer rows in two
passes pays only when the first two draft tokens are seldom both accepted (docs/benchmarks.md section 13).

    python benchmarks/draft_acceptance.py [--model gemma3-270m] [--prompts 20] [--max-tokens 128]

Prompts: vicuna_bench.jsonl's first turns, as chat turns where the model has a chat template, else as text.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import tachy
from tachy import GenerationConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna_bench.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    engine = tachy.load(args.model, progress=False)
    questions = [json.loads(line)["turns"][0] for line in DATA.read_text().splitlines()[:args.prompts]]
    accepted_by_size: dict[int, list[int]] = collections.defaultdict(list)
    for q in questions:
        ids = (engine.tokenizer.encode(q) if engine.tokenizer.chat_template is None
               else engine.chat_prompt([{"role": "user", "content": q}]))
        for step in engine.generate_tokens(ids, GenerationConfig(max_new_tokens=args.max_tokens)):
            if step.draft_size:
                accepted_by_size[step.draft_size].append(step.accepted)
    longer = [a for size, accepted in accepted_by_size.items() if size >= 3 for a in accepted]
    print(f"{args.model}, {len(questions)} prompts x {args.max_tokens} new tokens, default drafter:")
    print("| draft tokens | verify steps | mean accepted |\n|---:|---:|---:|")
    for size in sorted(accepted_by_size):
        accepted = accepted_by_size[size]
        print(f"| {size} | {len(accepted)} | {sum(accepted) / len(accepted):.2f} |")
    if longer:
        both = sum(a >= 2 for a in longer)
        print(f"Steps drafting 3 or more: {len(longer)}; the first two both accepted in {both} "
              f"({both / len(longer):.0%}).")


if __name__ == "__main__":
    main()
