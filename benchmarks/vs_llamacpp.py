"""tachy against llama.cpp on the same GGUF file, side by side in one process.

Every engine gets the same token ids (tachy's chat template, first turn of each prompt), generates exactly
--max-new-tokens tokens greedily (EOS ignored) on --threads threads, and is timed from the prompt to its last
token; engines are interleaved prompt by prompt, in a rotating order. Prefill is timed apart on the same
prompts (tokens/s of prompt processing). The machine's memory bandwidth is measured in the same run, so plain
decoding can be compared with its floor (weight bytes read per token / bandwidth).

Engines: llama.cpp (llama-cpp-python, plain greedy decoding), tachy plain decoding on the file's own blocks
(``gguf``), tachy ``default`` (the same, with its default drafter), tachy plain decoding with bf16 weights;
optionally llama.cpp with its prompt-lookup drafter (``--llama-pld``). Identity: tachy ``default`` must equal
tachy plain on every prompt; tachy against llama.cpp is reported as agreement (their arithmetic differs).

    make bench-env
    .venv-bench/bin/python benchmarks/vs_llamacpp.py --out docs/results/vs_llamacpp
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import tachy
from tachy import GenerationConfig, GenerationStats, kernels
from tachy.bench.prompts import load_prompts, spread
from tachy.bench.runner import looping
from tachy.models.load import expected_shapes
from tachy.registry import resolve_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEV_FILES = ["vicuna_bench.jsonl", "grounded_dev.jsonl", "dolly_context_dev.jsonl", "mbpp_dev.jsonl",
             "gsm8k_train_dev.jsonl", "nq_open_dev.jsonl"]


def memory_bandwidth(threads: int, mib: int = 512) -> float:
    """GB/s of summing a float32 tensor larger than the caches (median of 9), on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(mib * (1 << 20) // 4)
    x.sum()
    times = []
    for _ in range(9):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return x.numel() * 4 / statistics.median(times) / 1e9


class LlamaCpp:
    def __init__(self, path: Path, threads: int, context: int, pld: bool = False):
        import llama_cpp

        draft = None
        if pld:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
            draft = LlamaPromptLookupDecoding(num_pred_tokens=10)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False, draft_model=draft)
        self.version = llama_cpp.__version__

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        """(tokens, seconds prompt -> last token, seconds prompt -> first token)."""
        self.llm.reset()
        out, first = [], 0.0
        start = time.perf_counter()
        for token in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       reset=True):
            out.append(token)
            if len(out) == 1:
                first = time.perf_counter() - start
            if len(out) == n:
                break
        return out, time.perf_counter() - start, first


class Tachy:
    def __init__(self, engine: tachy.Engine, drafter: str | None):
        self.engine, self.drafter = engine, drafter

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        config = GenerationConfig(max_new_tokens=n, drafter=self.drafter, ignore_eos=True)
        stats = GenerationStats()
        start = time.perf_counter()
        out = [t for step in self.engine.generate_tokens(ids, config, stats) for t in step.tokens]
        return out[:n], time.perf_counter() - start, stats.prefill_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", default=",".join(str(DATA / f) for f in DEV_FILES),
                   help="comma-separated prompt files (MT-Bench layout); the default is the 30 combined dev prompts")
    p.add_argument("--limit", type=int, default=30, help="prompts taken round-robin over categories")
    p.add_argument("--extra", default=str(DATA / "vicuna_bench.jsonl"),
                   help="a second prompt set reported apart (MT-Bench style), '' for none")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-pld", action="store_true", help="also llama.cpp with its prompt-lookup drafter")
    p.add_argument("--no-bf16", action="store_true", help="leave out tachy with bf16 weights")
    p.add_argument("--out", default="docs/results/vs_llamacpp")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)

    sets = {"dev": spread([q for f in args.prompts.split(",") for q in load_prompts(f)], args.limit)}
    if args.extra:
        sets["mt-bench-style"] = load_prompts(args.extra)
    gguf = tachy.load(args.model, dtype="gguf", progress=False)
    gguf.set_prefix_cache(None)   # tachy plain and default read the same prompts: each must prefill its own
    tok = gguf.tokenizer
    prompts = {name: [(q, gguf.chat_prompt([{"role": "user", "content": q.turns[0]}]) if tok.has_chat_template
                       else tok.encode(q.turns[0])) for q in qs] for name, qs in sets.items()}
    context = max(len(ids) for qs in prompts.values() for _, ids in qs) + args.max_new_tokens + 64
    engines = {"llama.cpp": LlamaCpp(path, args.threads, context)}
    if args.llama_pld:
        engines["llama.cpp pld"] = LlamaCpp(path, args.threads, context, pld=True)
    engines["tachy plain"] = Tachy(gguf, None)
    engines["tachy default"] = Tachy(gguf, "default")
    if not args.no_bf16:
        bf16 = tachy.load(args.model, dtype="bf16", progress=False)
        bf16.set_prefix_cache(None)
        engines["tachy bf16 plain"] = Tachy(bf16, None)
    bandwidth = memory_bandwidth(args.threads)
    weight_bytes = {"gguf": path.stat().st_size,
                    "bf16": 2 * sum(math.prod(shape) for shape in expected_shapes(gguf.config).values())}

    first_ids = next(iter(prompts.values()))[0][1]
    for e in engines.values():                     # warm-up: first calls build kernels' state
        e.generate(first_ids, 8)

    results: dict = {"model": args.model, "file": path.name, "threads": args.threads,
                     "max_new_tokens": args.max_new_tokens, "memory_bandwidth_gbs": bandwidth,
                     "weight_bytes": weight_bytes, "llama_cpp": engines["llama.cpp"].version,
                     "tachy_kernels": kernels.simd(), "sets": {}}
    names = list(engines)
    for set_name, qs in prompts.items():
        rows = []
        for i, (q, ids) in enumerate(qs):
            order = names[i % len(names):] + names[:i % len(names)]
            row = {"id": q.id, "category": q.category, "prompt_tokens": len(ids), "engines": {}}
            for name in order:
                out, total, first = engines[name].generate(ids, args.max_new_tokens)
                row["engines"][name] = {"tokens": out, "seconds": total, "prefill_s": first}
            # a verbatim loop is easy for any drafter: speeds are also reported without those prompts
            row["looping"] = looping(row["engines"]["tachy plain"]["tokens"])
            rows.append(row)
            line = "  ".join(f"{n} {args.max_new_tokens / row['engines'][n]['seconds']:6.1f}" for n in names)
            print(f"[{set_name} {i + 1}/{len(qs)}] {q.category:15s} {line}", flush=True)
        results["sets"][set_name] = summarize(rows, names, args.max_new_tokens)
        results["sets"][set_name]["prompts"] = [{k: v for k, v in r.items() if k != "engines"} | {
            "seconds": {n: r["engines"][n]["seconds"] for n in names},
            "identical_to_tachy_plain": {n: r["engines"][n]["tokens"] == r["engines"]["tachy plain"]["tokens"]
                                         for n in names}} for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    plot(results, out / "speed.png")
    print(report(results))


def summarize(rows: list[dict], names: list[str], n: int) -> dict:
    """Per engine: tokens/s over all prompts (total tokens / total seconds), vs llama.cpp (also over the prompts
    whose output does not loop), prefill tokens/s, per-category ratios, identity with tachy plain."""
    summary: dict = {"engines": {}, "looping_prompts": [r["id"] for r in rows if r["looping"]]}
    base = sum(r["engines"]["llama.cpp"]["seconds"] for r in rows)
    clean = [r for r in rows if not r["looping"]]
    cats = sorted({r["category"] for r in rows})
    for name in names:
        seconds = sum(r["engines"][name]["seconds"] for r in rows)
        prefill = sum(r["engines"][name]["prefill_s"] for r in rows)
        per_cat = {}
        for c in cats:
            mine = sum(r["engines"][name]["seconds"] for r in rows if r["category"] == c)
            theirs = sum(r["engines"]["llama.cpp"]["seconds"] for r in rows if r["category"] == c)
            per_cat[c] = theirs / mine
        ratios = [r["engines"]["llama.cpp"]["seconds"] / r["engines"][name]["seconds"] for r in rows]
        same = [r["engines"][name]["tokens"] == r["engines"]["tachy plain"]["tokens"] for r in rows]
        long_rows = [r for r in rows if r["prompt_tokens"] >= 500]
        long_prefill = (sum(r["prompt_tokens"] for r in long_rows) /
                        sum(r["engines"][name]["prefill_s"] for r in long_rows)) if long_rows else None
        summary["engines"][name] = {
            "tokens_per_s": len(rows) * n / seconds, "vs_llama_cpp": base / seconds,
            "vs_llama_cpp_without_loops": sum(r["engines"]["llama.cpp"]["seconds"] for r in clean) /
            sum(r["engines"][name]["seconds"] for r in clean) if clean else None,
            "long_prompt_prefill_tokens_per_s": long_prefill, "long_prompts": len(long_rows),
            "median_prompt_vs_llama_cpp": statistics.median(ratios), "min_category_vs_llama_cpp": min(per_cat.values()),
            "prefill_tokens_per_s": sum(r["prompt_tokens"] for r in rows) / prefill,
            "identical_to_tachy_plain": f"{sum(same)}/{len(same)}", "per_category": per_cat}
    return summary


def report(results: dict) -> str:
    bw, wb = results["memory_bandwidth_gbs"], results["weight_bytes"]
    lines = [f"Model `{results['model']}` ({results['file']}), {results['threads']} threads, "
             f"{results['max_new_tokens']} new tokens per prompt, greedy; llama-cpp-python {results['llama_cpp']}; "
             f"tachy's kernels: {results.get('tachy_kernels') or 'unknown'} build. "
             f"Memory bandwidth measured in the same run: {bw:.1f} GB/s, so reading the weights once takes "
             f"{wb['gguf'] / bw / 1e6:.2f} ms (GGUF file, {wb['gguf'] / 1e6:.0f} MB) or "
             f"{wb['bf16'] / bw / 1e6:.2f} ms (bf16, {wb['bf16'] / 1e6:.0f} MB)."]
    for set_name, s in results["sets"].items():
        n_long = next(iter(s["engines"].values()))["long_prompts"]
        loops = len(s["looping_prompts"])
        lines += ["", f"**{set_name}** ({len(s['prompts'])} prompts; tachy plain's output loops on {loops}: an "
                  "8-gram repeated 3 times)", "",
                  "| engine | tokens/s | vs llama.cpp | without the looping prompts | median prompt | lowest category "
                  f"| prefill tokens/s | prefill tokens/s, {n_long} prompts of 500+ tokens | ms per token "
                  "| identical to tachy plain |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in s["engines"].items():
            long = "-" if e["long_prompt_prefill_tokens_per_s"] is None else f"{e['long_prompt_prefill_tokens_per_s']:.0f}"
            clean = "-" if e["vs_llama_cpp_without_loops"] is None else f"{e['vs_llama_cpp_without_loops']:.2f}x"
            lines.append(f"| {name} | {e['tokens_per_s']:.1f} | {e['vs_llama_cpp']:.2f}x | {clean} | "
                         f"{e['median_prompt_vs_llama_cpp']:.2f}x | {e['min_category_vs_llama_cpp']:.2f}x | "
                         f"{e['prefill_tokens_per_s']:.0f} | {long} | {1000 / e['tokens_per_s']:.2f} | "
                         f"{e['identical_to_tachy_plain']} |")
        cats = list(next(iter(s["engines"].values()))["per_category"])
        lines += ["", "Per category, speed relative to llama.cpp:", "",
                  "| engine | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for name, e in s["engines"].items():
            lines.append(f"| {name} | " + " | ".join(f"{e['per_category'][c]:.2f}x" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        engines = results["sets"][set_name]["engines"]
        names = list(engines)
        ax.bar(names, [engines[n]["tokens_per_s"] for n in names], color=["#888"] + ["#3a7"] * (len(names) - 1))
        ax.set_title(f"{results['model']}, {set_name}: tokens/s (prompt to last token)")
        ax.tick_params(axis="x", rotation=20)
        for i, n in enumerate(names):
            ax.text(i, engines[n]["tokens_per_s"], f"{engines[n]['vs_llama_cpp']:.2f}x", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
