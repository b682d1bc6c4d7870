"""Quality cost of each weight format, beside llama.cpp on the same GGUF file.

Perplexity over fixed windows of a held-out text, and how often each format's next-token argmax agrees with
the fp32 (dequantized) model's. `gguf` runs the file's own quantized blocks through tachy's C kernels, so its
perplexity should sit next to llama.cpp's, which runs the same blocks.

    python benchmarks/format_perplexity.py --out docs/results/format_perplexity   # needs `make bench-env`
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tachy
from tachy.registry import resolve_model

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "monte_cristo_pg1184.txt"
FORMATS = ("fp32", "bf16", "gguf")


def windows(ids: list[int], count: int, length: int) -> list[list[int]]:
    """`count` evenly spaced windows over the text, so the score does not hang on one passage."""
    return [ids[k * (len(ids) - length) // (count - 1):][:length] for k in range(count)]


def tachy_logits(engine, window: list[int]) -> torch.Tensor:
    x = torch.tensor([window])
    cache = engine.model.new_cache(capacity=len(window) + 8, fixed=True)
    with torch.inference_mode():
        return engine.model(x, torch.arange(len(window)), cache)[0].float()


def llama_cpp_logits(llm, window: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(window)
    return torch.tensor(np.array(llm.scores[:len(window)]))


def score(logits: list[torch.Tensor], wins: list[list[int]], reference: list[torch.Tensor]) -> dict:
    nll = sum(float(F.cross_entropy(lg[:-1], torch.tensor(w[1:]), reduction="sum")) for lg, w in zip(logits, wins))
    agree = sum(int((lg.argmax(-1) == ref.argmax(-1)).sum()) for lg, ref in zip(logits, reference))
    tokens = sum(len(w) for w in wins)
    return {"perplexity": math.exp(nll / (tokens - len(wins))), "top1_agreement_with_fp32": agree / tokens}


def run_model(name: str, count: int, length: int, threads: int) -> dict:
    import llama_cpp

    text = TEXT.read_text()[200_000:400_000]
    engines = {fmt: tachy.load(name, dtype=fmt, progress=False) for fmt in FORMATS}
    ids = engines["gguf"].tokenizer.encode(text, add_special_tokens=False)
    wins = windows(ids, count, length)
    logits = {fmt: [tachy_logits(e, w) for w in wins] for fmt, e in engines.items()}
    llm = llama_cpp.Llama(model_path=str(resolve_model(name)), n_ctx=length + 8, n_batch=length,
                          n_threads=threads, logits_all=True, verbose=False)
    logits["llama.cpp"] = [llama_cpp_logits(llm, w) for w in wins]
    return {engine: score(lg, wins, logits["fp32"]) for engine, lg in logits.items()}


def report(results: dict) -> str:
    lines = [f"Perplexity over {results['windows']} windows of {results['window_tokens']} tokens of "
             f"`{Path(results['text']).name}` (characters 200k-400k), and next-token argmax agreement with tachy's "
             "fp32 (dequantized) weights; llama.cpp reads the same GGUF file.", "",
             "| model | engine / format | perplexity | vs fp32 | top-1 agreement with fp32 |", "|---|---|---|---|---|"]
    for model, rows in results["models"].items():
        base = rows["fp32"]["perplexity"]
        for engine, r in rows.items():
            label = engine if engine == "llama.cpp" else f"tachy {engine}"
            lines.append(f"| {model} | {label} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% "
                         f"| {r['top1_agreement_with_fp32']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/format_perplexity"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"text": str(TEXT), "windows": args.windows, "window_tokens": args.window_tokens, "models": {}}
    for name in args.models.split(","):
        results["models"][name] = run_model(name, args.windows, args.window_tokens, args.threads)
        print(name, json.dumps(results["models"][name]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
