"""GPU smoke check: the three things a CUDA run must show before tachy's GPU path is called working.

1. parity: our model against transformers on the same fp32 weights on the device (prefill logits of a few
   chat prompts; relative max difference, must stay under --parity-tol);
2. identity: for every registered drafter, speculative greedy decoding gives exactly the tokens of plain
   greedy decoding, on the engine as ``tachy.load`` gives it on the device (bf16 on CUDA);
3. speed: decode tokens/s and tokens per target forward of plain decoding and of every drafter (the same runs);
4. batch rows: all the prompts at once as rows of one ``BatchDecoder`` (the server's batches), plain rows and
   rows that draft (default drafter): each row's tokens are its plain greedy tokens, and aggregate tokens/s
   (prompts included; ``benchmarks/pytorch_rows.py --device cuda`` measures more requests and concurrencies).

    python benchmarks/gpu_smoke.py [--device cuda] [--model smollm2-135m] [--new-tokens 128]

writes docs/results/gpu_smoke/results.json and results.md, and exits 1 if parity or identity fails (a drafter
that cannot run on the engine's weights, such as the int4 self-draft of GGUF blocks, is listed as such). Without
CUDA it refuses (exit 2) and says so; ``--device cpu`` runs the same checks on the CPU to show the script
works (tiny settings: ``--device cpu --new-tokens 8 --prompts 1 --out /tmp/smoke``), never written as GPU
results.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # pytorch_rows (batch_rows)
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "gpu_smoke"
PROMPTS = [   # chat prompts: open-ended, code, and one whose answer copies from the prompt
    "Explain how a rainbow forms, in three sentences.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Rename the function to `area` and change nothing else:\n\ndef f(w, h):\n    \"\"\"Width times height.\"\"\"\n"
    "    return w * h\n",
    "List five rivers in Europe and the countries they flow through.",
]
# drafters that need options to run get them here (the others run as registered)
DRAFTER_SPECS = {"draft-model": "draft-model:model={model},dtype=int4"}


def refuse_without_cuda(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_smoke: no CUDA device here (torch {torch.__version__}, {build}); this check needs a GPU. "
              f"`--device cpu` runs it on the CPU to test the script itself.", file=sys.stderr)
        sys.exit(2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    try:   # the model name, where Linux says it
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"CPU {model} (torch {torch.__version__})"


def parity(model_name: str, device: torch.device, prompts: list[str]) -> dict:
    """Prefill logits of our model and transformers' (eager attention), both fp32 on ``device``."""
    import transformers

    from tachy.models import model_from_state_dict
    from tachy.models.load import load_checkpoint
    from tachy.registry import resolve_model
    from tachy.tokenizer import Tokenizer

    cfg, sd, tok_dir = load_checkpoint(resolve_model(model_name), progress=False)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    hf = hf.to(device).eval()
    ours = model_from_state_dict(cfg, sd).to(device).eval()
    tok = Tokenizer.from_path(tok_dir)
    rows = []
    with torch.no_grad():
        for text in prompts:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
            x = torch.tensor([ids], device=device)
            ref = hf(x).logits[0].float()
            cache = ours.new_cache(capacity=-(-len(ids) // 64) * 64, fixed=True)
            got = ours(x, torch.arange(len(ids), device=device), cache)[0].float()
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            rows.append({"prompt_tokens": len(ids), "rel_max_diff": rel,
                         "same_next_token": int(got[-1].argmax()) == int(ref[-1].argmax())})
    del hf, ours
    return {"prompts": rows, "worst_rel_max_diff": max(r["rel_max_diff"] for r in rows)}


def run(engine, ids: list[int], new_tokens: int, drafter) -> tuple[list[int], dict]:
    from tachy import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, drafter=drafter, ignore_eos=True)
    out, stats = [], None
    for piece in engine.stream(ids, config):
        out += piece.token_ids
        stats = piece.stats
    return out, {"tokens_per_s": stats.tokens_per_s, "mean_accepted": stats.mean_accepted}


def identity_and_speed(engine, prompts: list[str], new_tokens: int, drafters: list[str],
                       model_name: str) -> tuple[dict, list[list[int]]]:
    """Plain greedy, then every drafter on the same prompts: identical tokens? and how fast. Also returns plain
    greedy's tokens per prompt (what batch_rows checks its rows against)."""
    from tachy.errors import InvalidArgumentError
    from tachy.speculative.drafters import DatastoreDrafter, build_datastore

    ids = [engine.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    run(engine, ids[0], min(new_tokens, 8), None)   # warm-up (kernels, allocator)
    plain = [run(engine, p, new_tokens, None) for p in ids]
    with tempfile.TemporaryDirectory() as tmp:   # `rest` drafts from a datastore: the prompts' own text
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n\n".join(prompts), encoding="utf-8")
        datastore = build_datastore(corpus, engine.tokenizer)
    results = {"plain": summary([s for _, s in plain], mismatches=[])}
    for name in drafters:
        drafter = DatastoreDrafter(datastore=datastore) if name == "rest" else \
            DRAFTER_SPECS.get(name, name).format(model=model_name)
        try:
            runs = [run(engine, p, new_tokens, drafter) for p in ids]
        except InvalidArgumentError as e:   # e.g. the int4 self-draft of weights that are not float
            results[name] = {"not_applicable": str(e)}
            print(f"gpu_smoke: {name}: not applicable: {e}", file=sys.stderr, flush=True)
            continue
        mismatches = [i for i, ((out, _), (ref, _)) in enumerate(zip(runs, plain)) if out != ref]
        results[name] = summary([s for _, s in runs], mismatches)
        print(f"gpu_smoke: {name}: {results[name]}", file=sys.stderr, flush=True)
    return results, [out for out, _ in plain]


def batch_rows(engine, prompts: list[str], new_tokens: int, plain: list[list[int]]) -> dict:
    """Every prompt at once as a row of one BatchDecoder, plain rows and rows that draft: identical tokens to
    plain greedy decoding? and aggregate tokens/s."""
    from tachy import GenerationConfig
    from pytorch_rows import rows

    ids = [engine.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, drafter="default", ignore_eos=True)
    out = {}
    for name, packed in (("plain rows", False), ("speculative rows", True)):
        start = time.perf_counter()
        got = rows(engine, ids, config, len(ids), packed)
        seconds = time.perf_counter() - start
        mismatches = [i for i, (a, b) in enumerate(zip(got, plain)) if a != b]
        out[name] = {"tokens_per_s": round(len(ids) * new_tokens / seconds, 1), "identical_to_plain": not mismatches,
                     "mismatched_prompts": mismatches}
        print(f"gpu_smoke: {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def summary(stats: list[dict], mismatches: list[int]) -> dict:
    return {"tokens_per_s_median": round(statistics.median(s["tokens_per_s"] for s in stats), 1),
            "mean_accepted_median": round(statistics.median(s["mean_accepted"] for s in stats), 2),
            "identical_to_plain": not mismatches, "mismatched_prompts": mismatches}


def report(results: dict) -> str:
    p = results["parity"]
    lines = [f"GPU smoke check of {results['model']} on {results['device']}, {results['weights']} weights, "
             f"{results['new_tokens']} new tokens per prompt, {len(p['prompts'])} chat prompts, greedy.", "",
             f"Command: `{results['command']}`", "",
             f"Parity (fp32, ours vs transformers eager, prefill logits): worst relative max difference "
             f"{p['worst_rel_max_diff']:.2e} (tolerance {results['parity_tol']:.0e}); next token equal on "
             f"{sum(r['same_next_token'] for r in p['prompts'])} of {len(p['prompts'])} prompts.", "",
             "| drafter | identical to plain greedy | decode tokens/s (median) | tokens per forward | speedup |",
             "|---|---|---:|---:|---:|"]
    base = results["speed"]["plain"]["tokens_per_s_median"]
    for name, r in results["speed"].items():
        if "not_applicable" in r:
            lines.append(f"| {name} | not applicable to these weights: {r['not_applicable']} | | | |")
            continue
        same = "yes" if r["identical_to_plain"] else f"NO (prompts {r['mismatched_prompts']})"
        lines.append(f"| {name} | {same} | {r['tokens_per_s_median']} | {r['mean_accepted_median']} | "
                     f"{r['tokens_per_s_median'] / base:.2f}x |")
    lines += ["", f"All {len(p['prompts'])} prompts at once as batch rows (prompts included in the time):", "",
              "| rows | identical to plain greedy | aggregate tokens/s |", "|---|---|---:|"]
    for name, r in results["batch"].items():
        same = "yes" if r["identical_to_plain"] else f"NO (prompts {r['mismatched_prompts']})"
        lines.append(f"| {name} | {same} | {r['tokens_per_s']} |")
    lines += ["", f"Passed: {results['passed']}. Run at {results['when']} UTC in {results['seconds']} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tachy
    from tachy.speculative.drafters import available_drafters

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, help="weights of the identity/speed engine (default: tachy.load's)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--drafters", default="all", help="comma-separated drafter names, or all")
    ap.add_argument("--parity-tol", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {OUT} on CUDA)")
    args = ap.parse_args(argv)
    refuse_without_cuda(args.device)
    if args.out is None:
        if not args.device.startswith("cuda"):
            ap.error("--out is required off CUDA (a CPU run is a test of the script, not GPU results)")
        args.out = OUT
    device = torch.device(args.device)
    prompts = PROMPTS[:args.prompts]
    drafters = available_drafters() if args.drafters == "all" else args.drafters.split(",")
    started = time.perf_counter()
    results = {"model": args.model, "device": device_name(device), "new_tokens": args.new_tokens,
               "parity_tol": args.parity_tol, "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "command": "python benchmarks/gpu_smoke.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    results["parity"] = parity(args.model, device, prompts)
    engine = tachy.load(args.model, dtype=args.dtype, device=args.device, progress=False)
    results["weights"] = engine.weights
    results["speed"], plain_tokens = identity_and_speed(engine, prompts, args.new_tokens, drafters, args.model)
    results["batch"] = batch_rows(engine, prompts, args.new_tokens, plain_tokens)
    results["passed"] = results["parity"]["worst_rel_max_diff"] < args.parity_tol and all(
        r.get("identical_to_plain", True) for r in [*results["speed"].values(), *results["batch"].values()])
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(report(results))
    print(report(results))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
