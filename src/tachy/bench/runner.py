"""tachy bench: every method on the same prompts, interleaved prompt by prompt, against plain decoding.

Interleaving (the method order rotates each prompt) spreads machine noise over all methods alike. Speedup is
the ratio of tokens/s to vanilla's in the same run. Looping outputs (SmolLM2 often repeats itself verbatim,
which any copy-based drafter predicts perfectly) are flagged and a speedup without them is reported too, so
a win on degenerate text is not mistaken for a general one.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..decoding import GenerationConfig
from ..engine import Engine
from ..errors import UnknownNameError
from .prompts import Prompt


@dataclass
class Run:
    """One method on one prompt (all turns)."""

    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    draft_model_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)


def looping(ids: list[int], n: int = 8, repeats: int = 3) -> bool:
    """True when some n-gram of the output occurs ``repeats`` or more times: verbatim repetition loops."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        key = tuple(ids[i:i + n])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= repeats:
            return True
    return False


def run_prompt(engine: Engine, prompt: Prompt, config: GenerationConfig) -> Run:
    """All turns of one prompt with one method, feeding the method's own answers back."""
    run = Run()
    messages: list[dict] = []
    use_chat = engine.tokenizer.has_chat_template
    for turn in prompt.turns:
        messages.append({"role": "user", "content": turn})
        ids = engine.chat_prompt(messages) if use_chat else engine.tokenizer.encode(
            "\n\n".join(m["content"] for m in messages))
        out: list[int] = []
        start = time.perf_counter()
        for piece in engine.stream(ids, config):
            out.extend(piece.token_ids)
            stats = piece.stats
        run.seconds += time.perf_counter() - start
        run.tokens += len(out)
        run.forwards += stats.forwards
        run.accepted += stats.accepted
        run.draft_s += stats.draft_s
        run.draft_model_s += stats.draft_model_s
        run.outputs.append(out)
        messages.append({"role": "assistant", "content": engine.tokenizer.decode(out)})
    return run


def method_config(method: str, max_new_tokens: int, max_draft_tokens: int) -> GenerationConfig:
    drafter = None if method == "vanilla" else method
    # every method reads its prompt: one run after another on the same prompt would find its K/V in the
    # engine's prefix cache, and the prefill the bench times would be free for all but the first
    return GenerationConfig(max_new_tokens=max_new_tokens, drafter=drafter, max_draft_tokens=max_draft_tokens,
                            prefix_cache=False)


def run_bench(engine: Engine, prompts: list[Prompt], methods: list[str], max_new_tokens: int = 128,
              max_draft_tokens: int = 16, progress: bool = True) -> dict:
    """Run every method on every prompt, interleaved; return the results.json dictionary."""
    from ..speculative.drafters import available_drafters

    known = ["vanilla", *available_drafters()]
    for m in methods:
        if m.partition(":")[0] not in known:
            raise UnknownNameError(f"unknown method {m!r}; available: {', '.join(known)}")
    if "vanilla" not in methods:
        methods = ["vanilla", *methods]
    configs = {m: method_config(m, max_new_tokens, max_draft_tokens) for m in methods}
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    # warm-up so that the first measured prompt pays no one-time costs: kernels' setup, and each drafter built
    # (a draft model loaded, the default drafter's int4 copy made) and run once before timing (the method
    # that happened to come first used to pay up to a third of its first prompt's time for it)
    warm_prompt = engine.tokenizer.encode("Write a short story about a robot who learns to paint.")
    for config in configs.values():   # vanilla among them; generate builds and keeps each named drafter
        engine.generate(warm_prompt, dataclasses.replace(config, max_new_tokens=32))
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run", disable=not progress)
    for i, prompt in enumerate(prompts):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for m in order:
            bar.set_postfix_str(f"{prompt.category}/{m}")
            runs[m].append(run_prompt(engine, prompt, configs[m]))
            bar.update()
    bar.close()
    return summarize(engine, prompts, runs, max_new_tokens)


def _rate(runs: list[Run]) -> float:
    seconds = sum(r.seconds for r in runs)
    return sum(r.tokens for r in runs) / seconds if seconds else 0.0


def _mean_accepted(runs: list[Run]) -> float:
    forwards = sum(r.forwards for r in runs)
    return (forwards + sum(r.accepted for r in runs)) / forwards if forwards else 0.0


def summarize(engine: Engine, prompts: list[Prompt], runs: dict[str, list[Run]], max_new_tokens: int) -> dict:
    vanilla = runs["vanilla"]
    loops = [any(looping(o) for o in r.outputs) for r in vanilla]
    categories = sorted({p.category for p in prompts})
    base_rate = _rate(vanilla)
    methods = {}
    for m, rs in runs.items():
        per_category = {}
        for c in categories:
            idx = [i for i, p in enumerate(prompts) if p.category == c]
            base = _rate([vanilla[i] for i in idx])
            per_category[c] = {"speedup": _rate([rs[i] for i in idx]) / base if base else 0.0,
                               "mean_accepted": _mean_accepted([rs[i] for i in idx])}
        clean = [i for i, loop in enumerate(loops) if not loop]
        clean_base = _rate([vanilla[i] for i in clean])
        identical = [r.outputs == v.outputs for r, v in zip(rs, vanilla)]
        per_prompt_speedup = [(r.tokens / r.seconds) / (v.tokens / v.seconds)
                              for r, v in zip(rs, vanilla) if r.seconds and v.seconds and v.tokens]
        total_s = sum(r.seconds for r in rs)
        methods[m] = {
            "tokens_per_s": _rate(rs),
            "speedup": _rate(rs) / base_rate if base_rate else 0.0,
            "mean_accepted": _mean_accepted(rs),
            "identical": all(identical),
            "per_category": per_category,
            "median_prompt_speedup": statistics.median(per_prompt_speedup) if per_prompt_speedup else 0.0,
            # None when every vanilla answer loops (nothing to compare)
            "speedup_without_loops": _rate([rs[i] for i in clean]) / clean_base if clean_base else None,
            "not_identical": [p.id for p, same in zip(prompts, identical) if not same],
            "draft_time_share": sum(r.draft_s for r in rs) / total_s if total_s else 0.0,
            "draft_model_time_share": sum(r.draft_model_s for r in rs) / total_s if total_s else 0.0,
            "tokens": sum(r.tokens for r in rs),
            "seconds": total_s,
        }
    return {
        "model": engine.name,
        "device": _device_name(engine.device),
        "dtype": engine.weights,   # gguf, bf16, fp32, int8 or int4 (a GGUF model's parameters are only its norms)
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "looping_prompts": [p.id for p, loop in zip(prompts, loops) if loop],
        "methods": methods,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def write_report(results: dict, out: Path, command: str) -> None:
    """results.json, results.md (table) and speedup.png (per-category speedup and mean accepted)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results, command))
    plot(results, out / "speedup.png")


def markdown_table(results: dict, command: str) -> str:
    methods = results["methods"]
    categories = sorted(next(iter(methods.values()))["per_category"])
    lines = [f"Model `{results['model']}` ({results['dtype']} weights) on {results['device']}, {results['prompts']} prompts, "
             f"{results['max_new_tokens']} new tokens per turn. Looping vanilla outputs: "
             f"{len(results['looping_prompts'])}/{results['prompts']}.", "", f"Command: `{command}`", "",
             "| method | tokens/s | speedup | speedup w/o loops | median prompt speedup | tokens/forward "
             "| identical | drafter time | of which draft model |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in methods.items():
        clean = r["speedup_without_loops"]
        lines.append(f"| {m} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{'-' if clean is None else f'{clean:.2f}x'} | "
                     f"{r['median_prompt_speedup']:.2f}x | {r['mean_accepted']:.2f} | "
                     f"{'yes' if r['identical'] else 'NO'} | {100 * r['draft_time_share']:.1f}% | "
                     f"{100 * r['draft_model_time_share']:.1f}% |")
    lines += ["", "Per category: speedup (tokens per forward)", "",
              "| method | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for m, r in methods.items():
        cells = [f"{r['per_category'][c]['speedup']:.2f}x ({r['per_category'][c]['mean_accepted']:.1f})"
                 for c in categories]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results["methods"] if m != "vanilla"] or ["vanilla"]
    categories = sorted(results["methods"]["vanilla"]["per_category"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [results["methods"][m]["per_category"][c]["speedup"] for c in categories]
        ax1.bar([i + j * width for i in range(len(categories))], vals, width, label=m)
    ax1.axhline(1.0, color="black", lw=0.8, ls="--")
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=30, ha="right")
    ax1.set_ylabel("speedup vs vanilla (tokens/s ratio)")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{results['model']}, {results['prompts']} prompts, {results['max_new_tokens']} new tokens")
    ax2.bar(methods, [results["methods"][m]["mean_accepted"] for m in methods], color="tab:gray")
    ax2.set_ylabel("tokens per target forward")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
