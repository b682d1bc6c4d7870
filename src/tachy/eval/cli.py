"""`tachy eval needle|ppl|ruler`: the command-line face of needle.py, ppl.py and ruler.py (contract in DESIGN.md)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from ..cli import EXTRA_COMMANDS, add_model_args, load_engine
from ..errors import InvalidArgumentError
from .sweep import DENSE, parse_list, read_text, settings


def _common(args: argparse.Namespace, flag: str):
    sweep = settings(args.press, args.ratio, args.attention)
    contexts = parse_list(args.context, int, "context")
    if any(c < 64 for c in contexts):
        raise InvalidArgumentError("--context values must be at least 64 tokens")
    text = read_text(getattr(args, flag.lstrip("-")), flag)
    engine = load_engine(args)
    if max(contexts) + 16 > engine.max_context:
        raise InvalidArgumentError(f"--context {max(contexts)} exceeds {engine.name}'s window {engine.max_context}")
    return sweep, contexts, text, engine


def cmd_needle(args: argparse.Namespace) -> int:
    from .needle import run_needle

    depths = parse_list(args.depths, float, "depth")
    if any(not 0 <= d <= 1 for d in depths):
        raise InvalidArgumentError("--depths are fractions in [0, 1]")
    sweep, contexts, text, engine = _common(args, "--haystack")
    with torch.inference_mode():
        results = run_needle(engine, text, contexts, depths, sweep, needles=args.needles, seed=args.seed)
    return _finish(results, args)


def cmd_ppl(args: argparse.Namespace) -> int:
    from .ppl import run_ppl

    sweep, contexts, text, engine = _common(args, "--text")
    with torch.inference_mode():
        results = run_ppl(engine, text, contexts, sweep, tokens=args.tokens, windows=args.windows)
    return _finish(results, args)


def cmd_ruler(args: argparse.Namespace) -> int:
    from .ruler import run_ruler
    from .ruler_tasks import check_tasks

    tasks = check_tasks(parse_list(args.tasks, what="task"))
    if args.samples < 1:
        raise InvalidArgumentError("--samples must be at least 1")
    sweep, contexts, text, engine = _common(args, "--haystack")
    with torch.inference_mode():
        results = run_ruler(engine, text, contexts, tasks, sweep, samples=args.samples, seed=args.seed)
    return _finish(results, args)


def _finish(results: dict, args: argparse.Namespace) -> int:
    from .report import write_report

    command = "tachy " + " ".join(shlex.quote(a) for a in args.argv)
    write_report(results, Path(args.out), command)
    print((Path(args.out) / "results.md").read_text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="long-context evaluation of KV-cache presses and sparse attention "
                                               "(needle, ppl, ruler)")
    tasks = p.add_subparsers(dest="task", required=True)
    for name, func, help_ in (("needle", cmd_needle, "needle-in-a-haystack accuracy grid and heatmap"),
                              ("ppl", cmd_ppl, "perplexity of a text under each press"),
                              ("ruler", cmd_ruler, "RULER-style tasks: multi-key needles, variable tracking, "
                                                   "common words")):
        t = tasks.add_parser(name, help=help_)
        t.add_argument("--press", default="none" if name == "ruler" else "snapkv",
                       help="comma-separated press names, 'all', 'none' (no press; alone: the dense baseline only)")
        t.add_argument("--ratio", default="0.5", help="comma-separated compression ratios in [0, 1)")
        t.add_argument("--attention", default=DENSE,
                       help="comma-separated attentions: dense (default) and sparse methods (quest, tidal, "
                            "double_sparsity, minference, with options as quest:budget=512; docs/long_context.md); "
                            "every press runs under each, "
                            "'--press none' for an attention alone")
        t.add_argument("--context", default="2048,4096", help="comma-separated context lengths (tokens)")
        t.add_argument("--out", default=f"eval_{name}", help="output folder")
        add_model_args(t)
        t.set_defaults(func=func)
        if name in ("needle", "ruler"):
            t.add_argument("--haystack", default=None,
                           help="plain-text file the haystack is cut from (default: shared/data/tinyshakespeare.txt)")
            t.add_argument("--seed", type=int, default=0, help="seed of the needles and samples")
        if name == "needle":
            t.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions of the haystack")
            t.add_argument("--needles", type=int, default=1, help="needles (random numbers) per cell")
        elif name == "ruler":
            t.add_argument("--tasks", default="all",
                           help="comma-separated tasks (default all): niah_multikey, niah_multivalue, niah_multiquery, "
                                "vt, cwe")
            t.add_argument("--samples", "--limit", dest="samples", type=int, default=4,
                           help="samples per task and context")
        else:
            t.add_argument("--text", default=None,
                           help="plain-text file scored (default: shared/data/tinyshakespeare.txt)")
            t.add_argument("--tokens", type=int, default=256, help="tokens scored after each context")
            t.add_argument("--windows", type=int, default=2, help="windows spread over the text")


EXTRA_COMMANDS.append(register)
