"""Where a plain decode step's time goes: the C forward by phase, next to the PyTorch forward by op.

For the C forward (the default on a GGUF file): each phase's milliseconds per token from the decoder's own
clocks (kernels.forward_profile), the weight bytes it reads and the bandwidth that implies, and what the
engine spends around the forward (drafting, verification, bookkeeping). For the PyTorch forward (bf16
weights, the path every non-CPU device takes): torch.profiler's op count and top ops per token, which is what
the C forward replaced. Same prompt, 2 threads, in one run.

    python benchmarks/step_profile.py --out docs/results/step_profile
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tachy
from tachy import GenerationConfig, GenerationStats, kernels

PROMPT = "Write a detailed explanation of how photosynthesis works, step by step."


def prompt_ids(engine: tachy.Engine) -> list[int]:
    """The prompt as a chat turn, or as plain text for a model without a chat template (gemma3's GGUF)."""
    if engine.tokenizer.chat_template is None:
        return engine.tokenizer.encode(PROMPT)
    return engine.chat_prompt([{"role": "user", "content": PROMPT}])


def c_forward_profile(name: str, tokens: int) -> dict:
    engine = tachy.load(name, dtype="gguf", progress=False)
    prompt = prompt_ids(engine)
    config = GenerationConfig(max_new_tokens=tokens, drafter=None, ignore_eos=True)
    list(engine.generate_tokens(prompt, config))                       # warm
    kernels.forward_profile(reset=True)
    list(engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=1, drafter=None)))   # the prefill alone
    prefill_phases, _ = kernels.forward_profile(reset=True)
    stats = GenerationStats()
    start = time.perf_counter()
    list(engine.generate_tokens(prompt, config, stats))
    wall = time.perf_counter() - start - stats.prefill_s
    phases, calls = kernels.forward_profile(reset=True)
    steps = calls - 1                          # the first forward is the prefill: its time is taken out
    per_token = {k: (v - prefill_phases[k]) / steps * 1e3 for k, v in phases.items()}
    per_token_sum = sum(per_token.values())
    model = engine.model
    bytes_of = {"q/k/v projection": sum(l.self_attn.qkv_proj.nbytes for l in model.layers),
                "output projection + residual": sum(l.self_attn.o_proj.nbytes for l in model.layers),
                "gate/up + activation": sum(l.mlp.gate_up_proj.nbytes for l in model.layers),
                "down + residual": sum(l.mlp.down_proj.nbytes for l in model.layers),
                "final norm + output layer": model.lm_head.nbytes}
    return {"model": name, "tokens": tokens, "step_ms": wall / (stats.forwards) * 1e3,
            "forward_ms": per_token_sum, "phases_ms": per_token, "prefill_s": stats.prefill_s,
            "weight_bytes": bytes_of,
            "bandwidth_gbs": {k: bytes_of[k] / (per_token[k] / 1e3) / 1e9 for k in bytes_of if per_token[k] > 0}}


def torch_forward_profile(name: str, tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    engine = tachy.load(name, dtype="bf16", progress=False)
    engine.model.cpu_forward = None                                    # the PyTorch forward
    prompt = prompt_ids(engine)
    config = GenerationConfig(max_new_tokens=tokens, drafter=None, ignore_eos=True)
    list(engine.generate_tokens(prompt, config))
    stats = GenerationStats()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        list(engine.generate_tokens(prompt, config, stats))
    events = prof.key_averages()
    steps = stats.forwards
    ops = sorted(((e.key, e.count / steps, e.self_cpu_time_total / steps / 1e3) for e in events
                  if e.key.startswith("aten::")), key=lambda r: -r[2])
    return {"model": name, "step_ms": stats.decode_s / steps * 1e3,
            "aten_ops_per_token": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
            "top_ops": [{"op": k, "calls_per_token": c, "self_ms_per_token": ms} for k, c, ms in ops[:8]]}


def report(c: dict, t: dict) -> str:
    lines = [f"`{c['model']}`, {c['tokens']} decode steps after a chat prompt, 2 threads.", "",
             f"C forward (GGUF blocks): {c['step_ms']:.2f} ms per step, of which {c['forward_ms']:.2f} ms in the "
             f"forward and {c['step_ms'] - c['forward_ms']:.2f} ms around it (Python: choosing the token, "
             "bookkeeping).", "",
             "| phase | ms per token | share | weight MB | GB/s |", "|---|---|---|---|---|"]
    bandwidth = c["bandwidth_gbs"]
    for k, ms in c["phases_ms"].items():
        mb = c["weight_bytes"].get(k)
        mb_text = "" if mb is None else f"{mb / 1e6:.1f}"
        gbs_text = "" if k not in bandwidth else f"{bandwidth[k]:.1f}"
        lines.append(f"| {k} | {ms:.3f} | {ms / c['forward_ms']:.0%} | {mb_text} | {gbs_text} |")
    lines += ["", f"PyTorch forward (bf16 weights): {t['step_ms']:.2f} ms per step, "
              f"{t['aten_ops_per_token']:.0f} aten ops per token; the costliest:", "",
              "| op | calls per token | self ms per token |", "|---|---|---|"]
    for row in t["top_ops"]:
        lines.append(f"| {row['op']} | {row['calls_per_token']:.0f} | {row['self_ms_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results/step_profile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c = c_forward_profile(args.model, args.tokens)
    t = torch_forward_profile(args.model, args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"c_forward": c, "torch_forward": t}, indent=2))
    (out / "results.md").write_text(report(c, t))
    print(report(c, t))


if __name__ == "__main__":
    main()
