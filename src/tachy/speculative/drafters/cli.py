"""``tachy drafters`` (list the drafters) and ``tachy datastore build`` (a REST datastore from text files).

Registered into :data:`tachy.cli.EXTRA_COMMANDS` on import (``tachy.cli`` imports this module).
"""
from __future__ import annotations

import argparse
import sys
import time

from ...cli import EXTRA_COMMANDS


def cmd_drafters(args: argparse.Namespace) -> int:
    from . import DRAFTERS

    for name in sorted(DRAFTERS):
        cls = DRAFTERS[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<15} {summary}")
    print("\noptions: --drafter NAME:key=value,... (e.g. sam:min_match_len=3, rest:datastore=store.npz)")
    return 0


def cmd_datastore_build(args: argparse.Namespace) -> int:
    from ...registry import DEFAULT_MODEL, resolve_model
    from ...tokenizer import Tokenizer
    from .datastore import build_datastore

    tokenizer = Tokenizer.from_path(resolve_model(args.model or DEFAULT_MODEL))
    start = time.perf_counter()
    ds = build_datastore(args.corpus, tokenizer, args.out, depth=args.depth)
    print(f"{args.out}: {len(ds)} tokens, built in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drafters", help="list the speculative drafters")
    p.set_defaults(func=cmd_drafters)

    p = sub.add_parser("datastore", help="retrieval datastores for the `rest` drafter")
    ds_sub = p.add_subparsers(dest="datastore_command", required=True)
    b = ds_sub.add_parser("build", help="tokenize text files (or directories of *.txt) into a datastore")
    b.add_argument("corpus", nargs="+", help="text files or directories")
    b.add_argument("--out", "-o", default="datastore.npz", help="output .npz file (default: datastore.npz)")
    b.add_argument("--model", "-m", default=None, help="model whose tokenizer to use (default: the default model)")
    b.add_argument("--depth", type=int, default=32, help="longest lookup the suffix array supports")
    b.set_defaults(func=cmd_datastore_build)


EXTRA_COMMANDS.append(register)
