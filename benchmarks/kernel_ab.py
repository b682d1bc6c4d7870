"""This checkout's C forward against another revision's, side by side in one process (interleaved rounds).

For changes that keep the forward's bits (kernel internals, how the forward is called), where two separate
runs on this noisy machine differ by more than the change. The other revision's kernel sources (``git show
REV:src/tachy/kernels/...``) are compiled with this checkout's flags into a temporary library, and the model's
C forward calls one library or the other (``CPUForward.lib``), case by case, alternating who goes first. The
base side also keeps passing a verify chain's mask to the kernels, as the forward did before it learned to drop
a causal mask (``cpu_forward.is_causal``). Only for revisions whose kernels.h and forward structs are this
checkout's (the base library is handed this checkout's structs). Reported per case: the minimum and median
over rounds on each side, their ratios, and whether the two sides' logits are bit-identical.

Cases: ``prefill N`` (a fresh cache each time), ``chunk T@L`` (a forward over T new tokens after L cached ones,
causal: a prompt chunk), ``verify T@L`` (a chain of T tokens with the mask the engine passes).

    python benchmarks/kernel_ab.py --base HEAD [--model smollm2-135m] [--prefill 2000 8000]
        [--chunk 64@2000 64@6000] [--verify 5@300 5@2000 9@6000] [--rounds 7] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tachy
from tachy import kernels
from tachy.models import cpu_forward

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "data" / "monte_cristo_pg1184.txt"


def base_library(rev: str, folder: Path):
    """The kernels of ``rev``, compiled like this checkout's and opened with its argument types."""
    for src in [*kernels.SOURCES, kernels.HEADER]:
        rel = src.relative_to(ROOT)
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True,
                              check=True).stdout
        (folder / src.name).write_text(text)
    if (folder / kernels.HEADER.name).read_text() != kernels.HEADER.read_text():
        sys.exit(f"kernels.h differs at {rev}: its library cannot take this checkout's structs")
    lib = folder / "libbase.so"
    try:
        kernels.compile_library([folder / src.name for src in kernels.SOURCES], lib)
    except RuntimeError as e:
        sys.exit(f"{rev}'s kernels: {e}")
    return kernels.open_library(lib)


def case_runner(engine, ids: list[int], kind: str, spec: str):
    """A function that runs one case once and returns (seconds, logits)."""
    model = engine.model
    if kind == "prefill":
        n = int(spec)

        def run():
            cache = model.new_cache(capacity=engine.cache_capacity(n, 1), fixed=True)
            start = time.perf_counter()
            out = engine._prefill(ids[:n], cache)
            return time.perf_counter() - start, out
        return run
    T, L = map(int, spec.split("@"))
    cache = model.new_cache(capacity=engine.cache_capacity(L + T, 1), fixed=True)
    engine._prefill(ids[:L], cache)
    mask = torch.ones(T, L + T, dtype=torch.bool).tril(L) if kind == "verify" else None

    def run():
        start = time.perf_counter()
        out = model(torch.tensor([ids[L:L + T]]), torch.arange(L, L + T), cache, mask)
        seconds = time.perf_counter() - start
        cache.rollback(T)
        return seconds, out
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prefill", nargs="*", default=["2000", "8000"])
    ap.add_argument("--chunk", nargs="*", default=["64@2000", "64@6000"])
    ap.add_argument("--verify", nargs="*", default=["5@300", "5@2000", "9@6000"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = tachy.load(args.model, progress=False)
    if engine.model.cpu_forward is None:
        sys.exit("the C forward does not run this model here")
    ids = engine.tokenizer.encode(BOOK.read_text()[100_000:200_000])
    cases = [(k, s) for k, specs in (("prefill", args.prefill), ("chunk", args.chunk), ("verify", args.verify))
             for s in specs]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), kernels.threads_to_kernels():
        libs = {"base": base_library(args.base, Path(tmp)), "this": kernels.library()}
        runners = [case_runner(engine, ids, k, s) for k, s in cases]
        times = {(side, i): [] for side in libs for i in range(len(cases))}
        same = [True] * len(cases)
        for r in range(args.rounds):
            for i, run in enumerate(runners):
                outs = {}
                for side in (("base", "this") if (r + i) % 2 == 0 else ("this", "base")):
                    lib = libs[side]
                    kernels.sync_threads(lib)
                    lib.tq_set_amx(int(kernels.amx_used()))
                    engine.model.cpu_forward.lib = lib
                    cpu_forward.is_causal = causal if side == "this" else (lambda mask: False)
                    time.sleep(0.02)   # the other library's pool threads stop spinning
                    seconds, outs[side] = run()
                    times[side, i].append(seconds)
                same[i] = same[i] and torch.equal(outs["base"], outs["this"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        engine.model.cpu_forward.lib = libs["this"]
        cpu_forward.is_causal = causal
    lines = [f"`python benchmarks/kernel_ab.py {' '.join(sys.argv[1:])}`", "",
             f"{args.model}, 2 threads, AMX {'on' if kernels.amx_used() else 'off'}, {args.rounds} interleaved "
             f"rounds; base: the kernels of {args.base} (and a verify chain's mask passed to them)", "",
             "| case | base min / median ms | this min / median ms | speed-up (min) | speed-up (median) | "
             "bit-identical |", "|---|---|---|---|---|---|"]
    rows = []
    for i, (kind, spec) in enumerate(cases):
        b, t = times["base", i], times["this", i]
        row = {"case": f"{kind} {spec}", "base_ms": [x * 1e3 for x in b], "this_ms": [x * 1e3 for x in t],
               "identical": same[i]}
        rows.append(row)
        lines.append(f"| {kind} {spec} | {min(b) * 1e3:.1f} / {statistics.median(b) * 1e3:.1f} | "
                     f"{min(t) * 1e3:.1f} / {statistics.median(t) * 1e3:.1f} | {min(b) / min(t):.2f}x | "
                     f"{statistics.median(b) / statistics.median(t):.2f}x | {'yes' if same[i] else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text + "\n")
        (args.out / "results.json").write_text(json.dumps({"base": args.base, "model": args.model,
                                                           "rounds": args.rounds, "cases": rows}, indent=1))
    if not all(same):
        sys.exit("the two sides' logits differ: not a bit-keeping change")


causal = cpu_forward.is_causal

if __name__ == "__main__":
    main()
