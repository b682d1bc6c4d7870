"""Every decoding method of tachy.decoding on one prompt: its output and its speed.

One chat prompt that carries a context (so context-aware decoding has something to contrast) and each method
with its usual settings; per method we record the answer, the tokens generated, the wall-clock time of the
whole call (prefill included) and tokens per second over that time. Search methods do more work per token by
design (beams, candidates, samples); the table shows how much. Writes results.json and results.md.

    python benchmarks/decoding_methods.py --out docs/results/decoding          # ~3 min on a laptop CPU
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import tachy
from tachy.decoding.watermark import detect, watermark_config
from tachy import GenerationConfig

CONTEXT = "The team meeting moved from Monday to Thursday at 3 pm, and it will be held in room 12."
QUESTION = "When and where is the team meeting?"
PROMPT = [{"role": "user", "content": f"Read the note, then answer the question.\nNote: {CONTEXT}\n"
                                      f"Question: {QUESTION}"}]
SCHEMA = {"type": "object", "properties": {"day": {"type": "string", "maxLength": 12},
                                           "time": {"type": "string", "maxLength": 8},
                                           "room": {"type": "integer"}},
          "required": ["day", "time", "room"]}

# name -> GenerationConfig fields (max_new_tokens added by the script)
METHODS: dict[str, dict] = {
    "greedy (plain)": dict(drafter=None),
    "greedy + speculative drafts": dict(),
    "sampling T=0.8": dict(temperature=0.8, seed=0, drafter=None),
    "beam (4 beams)": dict(strategy="beam", strategy_options=dict(num_beams=4)),
    "beam (4 beams, patience 2, early stop)": dict(strategy="beam", strategy_options=dict(
        num_beams=4, patience=2.0, early_stopping=True)),
    "diverse beam (4 beams, 2 groups)": dict(strategy="diverse_beam", strategy_options=dict(
        num_beams=4, num_beam_groups=2, diversity_penalty=1.0)),
    "contrastive search (alpha 0.6, k 4)": dict(strategy="contrastive_search"),
    "contrastive decoding (amateur: 8 layers)": dict(strategy="contrastive_decoding", strategy_options=dict(
        amateur_layers=8)),
    "context-aware decoding (alpha 0.5)": dict(strategy="context_aware", strategy_options=dict(context=CONTEXT)),
    "mirostat (tau 3)": dict(strategy="mirostat", strategy_options=dict(tau=3.0), temperature=1.0, seed=0),
    "FSD (alpha 0.6, 3-gram)": dict(strategy="fsd"),
    "MBR (8 samples T=0.8, ngram_f1)": dict(strategy="mbr", strategy_options=dict(num_samples=8),
                                            temperature=0.8, seed=0, drafter=None),
    "JSON schema (greedy + drafts)": dict(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}),
    "watermark (T=0.8, delta 2)": dict(watermark=True, temperature=0.8, seed=0, drafter=None),
}


def run(engine, name: str, fields: dict, max_new_tokens: int) -> dict:
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, **fields)
    start = time.perf_counter()
    pieces = list(engine.stream_chat(PROMPT, cfg))
    wall = time.perf_counter() - start
    text = "".join(p.text for p in pieces)
    tokens = sum(len(p.token_ids) for p in pieces)
    row = dict(method=name, text=text, tokens=tokens, seconds=round(wall, 3),
               tokens_per_s=round(tokens / wall, 2) if wall else 0.0, finish=pieces[-1].finish_reason)
    if fields.get("watermark"):
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        row["watermark_z"] = round(detect(ids, engine.config.vocab_size, watermark_config(True)).z, 2)
    if "response_format" in fields:
        row["valid_json"] = _parses(text)
    return row


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Model {meta['model']} ({meta['dtype']}), {meta['threads']} thread(s), {meta['cpu']}; "
             f"max {meta['max_new_tokens']} new tokens; command: `{meta['command']}`", "",
             "| method | tokens | time (s) | tokens/s | output |", "|---|---:|---:|---:|---|"]
    for r in rows:
        extra = ""
        if "watermark_z" in r:
            extra = f" *(detector z = {r['watermark_z']})*"
        if "valid_json" in r:
            extra = f" *(valid JSON: {r['valid_json']})*"
        text = r["text"].replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {r['method']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {text}{extra} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="*", default=None, help="subset of method names (default: all)")
    p.add_argument("--out", type=Path, default=Path("docs/results/decoding"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = tachy.load(args.model, dtype=args.dtype, progress=False)
    engine.warmup()
    for drafter in (None, "default"):   # one-time work out of the table: the drafter's set-up and step costs
        run(engine, "warm-up", dict(drafter=drafter), 8)
    rows = []
    for name, fields in METHODS.items():
        if args.methods and name not in args.methods:
            continue
        row = run(engine, name, fields, args.max_new_tokens)
        print(f"{name:<45} {row['tokens']:>4} tokens {row['seconds']:7.2f} s {row['tokens_per_s']:7.1f} tok/s  "
              f"{row['text'][:60]!r}", flush=True)
        rows.append(row)
    meta = dict(model=args.model, dtype=str(next(engine.model.parameters()).dtype), threads=args.threads,
                cpu=platform.processor() or platform.machine(), max_new_tokens=args.max_new_tokens,
                torch=torch.__version__, command="python benchmarks/decoding_methods.py " + " ".join(
                    sys.argv[1:] if argv is None else argv))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2, ensure_ascii=False))
    (args.out / "results.md").write_text(markdown(rows, meta), encoding="utf-8")
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
