"""Plain greedy decoding: tachy's weight formats vs Hugging Face transformers (and llama.cpp when installed).

All engines run the same prompts in one process, interleaved prompt by prompt, each generating exactly
--max-new-tokens tokens (EOS ignored); we report the median tokens/s per engine and its ratio to transformers.
Also the perplexity of each tachy weight format on a text file (default: tinyshakespeare), so the speed of a
format is shown next to what it costs in quality.

    python benchmarks/plain_decoding.py --out docs/results/plain_decoding
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import tachy
from tachy.bench.prompts import load_prompts, spread
from tachy import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def tachy_runner(engine):
    config = lambda n: GenerationConfig(max_new_tokens=n, drafter=None, ignore_eos=True)  # noqa: E731

    def run(ids: list[int], n: int) -> float:
        start = time.perf_counter()
        out = sum(len(p.token_ids) for p in engine.stream(ids, config(n)))
        assert out == n, out
        return n / (time.perf_counter() - start)
    return run


def hf_runner(engine, dtype: torch.dtype):
    """transformers' own model class and generate(), on the very weights tachy loaded (dequantized GGUF)."""
    import transformers
    from tachy.models.load import load_checkpoint
    from tachy.registry import resolve_model

    cfg, state_dict, _ = load_checkpoint(resolve_model(engine.name), progress=False)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    model = model.to(dtype).eval()

    def run(ids: list[int], n: int) -> float:
        x = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones_like(x), pad_token_id=0)
        assert out.shape[1] - x.shape[1] == n
        return n / (time.perf_counter() - start)
    return run


def llama_cpp_runner(gguf_path: Path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)

    def run(ids: list[int], n: int) -> float:
        start = time.perf_counter()
        count = 0
        for tok in llm.generate(ids, temp=0.0, reset=True):
            count += 1
            if count == n:
                break
        return n / (time.perf_counter() - start)
    return run


@torch.inference_mode()
def perplexity(engine, text: str, window: int, windows: int) -> float:
    ids = engine.tokenizer.encode(text)
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * window:(w + 1) * window + 1]
        if len(chunk) < 2:
            break
        cache = engine.model.new_cache(capacity=len(chunk))
        logits = engine.model(torch.tensor([chunk[:-1]], device=engine.device),
                              torch.arange(len(chunk) - 1, device=engine.device), cache)[0]
        target = torch.tensor(chunk[1:], device=engine.device)
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        count += len(target)
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default=str(DATA / "vicuna_bench.jsonl"))
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int4")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--ppl-text", default=str(DATA / "tinyshakespeare.txt"))
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "plain_decoding"))
    args = ap.parse_args()

    dtypes = args.dtypes.split(",")
    engines = {d: tachy.load(args.model, dtype=d, progress=False) for d in dtypes}
    runners = {f"tachy {d}": tachy_runner(e) for d, e in engines.items()}
    first = next(iter(engines.values()))
    if not args.no_hf:
        runners["transformers fp32"] = hf_runner(first, torch.float32)
        runners["transformers bf16"] = hf_runner(first, torch.bfloat16)
    try:
        from tachy.registry import resolve_model
        runners["llama.cpp (GGUF)"] = llama_cpp_runner(resolve_model(args.model))
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp left out", file=sys.stderr)

    prompts = spread(load_prompts(args.prompts), args.limit)
    inputs = [first.chat_prompt([{"role": "user", "content": p.turns[0]}]) for p in prompts]
    for run in runners.values():  # warm-up
        run(inputs[0], 8)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i, ids in enumerate(inputs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            rates[name].append(runners[name](ids, args.max_new_tokens))
            print(f"prompt {i}: {name}: {rates[name][-1]:.1f} tokens/s", file=sys.stderr)

    text = Path(args.ppl_text).read_text(encoding="utf-8")
    ppl = {d: perplexity(e, text, args.ppl_window, args.ppl_windows) for d, e in engines.items()}
    base = statistics.median(rates["transformers fp32"]) if "transformers fp32" in rates else None
    rows = []
    for name, r in rates.items():
        med = statistics.median(r)
        d = name.split()[-1] if name.startswith("tachy") else None
        rows.append({"engine": name, "tokens_per_s": med, "vs_transformers_fp32": med / base if base else None,
                     "perplexity": ppl.get(d), "weight_bytes": weight_bytes(engines[d].model) if d else None})
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": args.model, "prompts": len(prompts),
                                                  "max_new_tokens": args.max_new_tokens,
                                                  "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    lines = [f"Plain greedy decoding, `{args.model}`, {len(prompts)} prompts x {args.max_new_tokens} new tokens, "
             f"{torch.get_num_threads()} threads; median tokens/s over prompts, engines interleaved. Perplexity: "
             f"{args.ppl_windows} windows of {args.ppl_window} tokens of `{Path(args.ppl_text).name}`.", "",
             f"Command: `{command}`", "",
             "| engine | tokens/s | vs transformers fp32 | weight MB | perplexity |", "|---|---|---|---|---|"]
    for row in rows:
        vs = f"{row['vs_transformers_fp32']:.2f}x" if row["vs_transformers_fp32"] else "-"
        mb = f"{row['weight_bytes'] / 1e6:.0f}" if row["weight_bytes"] else "-"
        pp = f"{row['perplexity']:.3f}" if row["perplexity"] else "-"
        lines.append(f"| {row['engine']} | {row['tokens_per_s']:.1f} | {vs} | {mb} | {pp} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token (the embedding table is only indexed, so it is left out)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or name.endswith((".cos", ".sin")):
            continue
        total += t.numel() * t.element_size()
    head = getattr(model.lm_head, "weight", None)
    if head is not None and head is model.embed_tokens.weight:  # tied: the output layer reads the table
        total += head.numel() * head.element_size()
    return total


if __name__ == "__main__":
    main()
