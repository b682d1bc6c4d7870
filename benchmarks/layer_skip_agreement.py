"""Would a cheaper self-draft work? Top-1 agreement of the int4 copy with the bf16 target, all layers vs skipped.

The target answers 8 dev prompts greedily (96 tokens each); each variant of the int4 copy is then run
teacher-forced over prompt + answer, and we count how often its argmax equals the target's next token.

    python benchmarks/layer_skip_agreement.py [--model smollm2-135m]
"""
from __future__ import annotations

import argparse

import torch

import tachy
from tachy import GenerationConfig
from tachy.bench.prompts import load_prompts, spread

FILES = ["vicuna_bench", "grounded_dev", "mbpp_dev", "gsm8k_train_dev", "nq_open_dev", "dolly_context_dev"]


def agreement(model, answers: list[tuple[list[int], list[int]]], keep: list[int]) -> float:
    """Share of answer tokens the model's teacher-forced argmax predicts, running only layers ``keep``."""
    layers = model.layers
    model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    hits = total = 0
    try:
        with torch.inference_mode():
            for prompt, answer in answers:
                seq = prompt + answer
                logits = model(torch.tensor([seq]), torch.arange(len(seq)), model.new_cache(len(seq)))[0]
                predicted = logits[len(prompt) - 1: len(seq) - 1].argmax(-1).tolist()
                hits += sum(a == b for a, b in zip(predicted, answer))
                total += len(answer)
    finally:
        model.layers = layers
    return hits / total


def target_answers(target, data: str, prompts: int = 8, tokens: int = 96) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy answer) token lists of ``target`` for ``prompts`` dev prompts spread over the files."""
    answers = []
    for p in spread(sum((load_prompts(f"{data}/{f}.jsonl") for f in FILES), []), prompts):
        ids = target.chat_prompt([{"role": "user", "content": p.turns[0]}])[-200:]
        out = [t for r in target.stream(ids, GenerationConfig(max_new_tokens=tokens, drafter=None))
               for t in r.token_ids]
        answers.append((ids, out))
    return answers


def target_from_args(description: str):
    """``--model`` / ``--data`` parsed, the bf16 target loaded, and its answers: (args, target, answers)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    target = tachy.load(args.model, progress=False)
    return args, target, target_answers(target, args.data)


def main() -> None:
    args, target, answers = target_from_args(__doc__.splitlines()[0])
    draft = tachy.load(args.model, dtype="int4", progress=False).model
    n = len(draft.layers)
    variants = {
        "all layers": list(range(n)),
        "skip 4 (13, 16, 19, 22)": [i for i in range(n) if i not in (13, 16, 19, 22)],
        "skip 8 (10-17)": [i for i in range(n) if not 10 <= i <= 17],
        "skip 8 (20-27)": [i for i in range(n) if not 20 <= i <= 27],
        "skip every 3rd from 3 to 27": [i for i in range(n) if not (i % 3 == 0 and 3 <= i <= 27)],
        "skip odd 9-27": [i for i in range(n) if not (i % 2 == 1 and 9 <= i <= 27)],
    }
    print("| int4 copy runs | layers | top-1 agreement with the bf16 target |\n|---|---|---|")
    for name, keep in variants.items():
        print(f"| {name} | {len(keep)} | {agreement(draft, answers, keep):.3f} |")


if __name__ == "__main__":
    main()
