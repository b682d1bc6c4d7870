"""`tachy bench`: the command-line face of runner.py (contract in docs/architecture.md and DESIGN.md)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..cli import EXTRA_COMMANDS, add_model_args, load_engine
from ..errors import TachyError


def cmd_bench(args: argparse.Namespace) -> int:
    from ..speculative.drafters import available_drafters
    from .prompts import load_prompts, spread
    from .runner import run_bench, write_report

    prompts = []
    for path in [p for arg in args.prompts for p in arg.split(",") if p]:
        prompts += load_prompts(path)
    prompts = spread(prompts, args.limit)
    methods = split_methods(args.methods)
    if "all" in methods:
        methods = ["vanilla", *available_drafters(runnable_only=True)]
    if not methods:
        raise TachyError("--methods is empty")
    known = ["vanilla", *available_drafters()]
    unknown = [m for m in methods if m.partition(":")[0] not in known]   # "name:key=value" carries options
    if unknown:
        raise TachyError(f"unknown method {unknown[0]!r}; available: {', '.join(known)}")
    if args.max_new_tokens < 1:
        raise TachyError("--max-new-tokens must be at least 1")
    engine = load_engine(args)
    results = run_bench(engine, prompts, methods, args.max_new_tokens, args.max_draft_tokens)
    command = "tachy " + " ".join(shlex.quote(a) for a in args.argv)
    write_report(results, Path(args.out), command)
    print((Path(args.out) / "results.md").read_text())
    return 0


def split_methods(text: str) -> list[str]:
    """Comma-separated methods, where a drafter's own options may contain commas too.

    >>> split_methods("vanilla,draft-model:model=smollm2-135m,dtype=int8,default")
    ['vanilla', 'draft-model:model=smollm2-135m,dtype=int8', 'default']
    """
    methods: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if "=" in piece and ":" not in piece and methods and ":" in methods[-1]:
            methods[-1] += "," + piece        # key=value continuing the previous method's options
        elif piece:
            methods.append(piece)
    return methods


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare decoding methods side by side on a prompt file")
    p.add_argument("--prompts", action="append", required=True,
                   help="JSONL file(s) in the MT-Bench/Spec-Bench layout (repeat or comma-separate)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts, spread evenly over categories")
    p.add_argument("--methods", default="vanilla,default", help="comma-separated: vanilla, drafter names, all")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-draft-tokens", type=int, default=16)
    p.add_argument("--out", default="bench_out", help="output folder for results.json/.md and speedup.png")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)


EXTRA_COMMANDS.append(register)
