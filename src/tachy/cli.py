"""Command line: tachy generate | chat | models | bench | datastore | serve.

Every user error surfaces as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable

from .errors import ContextLengthError, TachyError

EXIT_USER_ERROR = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="named model (see `tachy models`), GGUF file or HF folder")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8", "int4", "gguf"],
                   help="weight format; gguf: a GGUF file's own quantized blocks "
                        "(default: bf16 where the CPU has fast bf16, else fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--drafter", default="default",
                   help="speculative drafter: default, none, or a name from `tachy drafters`")
    p.add_argument("--max-draft-tokens", type=int, default=16)
    p.add_argument("--press", default=None, help="KV-cache compression after prefill (see docs/presses.md)")
    p.add_argument("--ratio", type=float, default=0.0, help="fraction of the prompt's KV the press removes")
    p.add_argument("--attention", default=None,
                   help="sparse attention: dense (default), quest, tidal, double_sparsity (decode time), minference "
                        "(prefill), with options as quest:budget=512 (see docs/long_context.md)")


def generation_config(args: argparse.Namespace):
    """Validated before the model loads, so a bad value fails at once."""
    from .decoding.cli import decoding_fields
    from .decoding import GenerationConfig
    from .speculative.drafters import make_drafter

    if args.drafter not in (None, "none"):
        make_drafter(args.drafter)
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=args.stop, drafter=args.drafter,
                            max_draft_tokens=args.max_draft_tokens, press=args.press,
                            compression_ratio=args.ratio, attention=args.attention, **decoding_fields(args))


def load_engine(args: argparse.Namespace):
    import tachy
    from .registry import DEFAULT_MODEL, resolve_model

    start = time.perf_counter()
    resolve_model(args.model or DEFAULT_MODEL)   # an unknown name fails here, before "loading ..." is printed
    print(f"loading {args.model or DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    engine = tachy.load(args.model, dtype=args.dtype, device=args.device)
    print(f"loaded in {time.perf_counter() - start:.1f}s ({engine.weights} weights, {engine.device})",
          file=sys.stderr, flush=True)
    return engine


def print_stats(stats, file=None) -> None:
    file = file or sys.stderr
    model_s = max(stats.decode_s - stats.draft_s, 0.0)
    print(f"\n[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated | prefill "
          f"{stats.prefill_s * 1000:.0f} ms | decode {stats.tokens_per_s:.1f} tokens/s | "
          f"{stats.mean_accepted:.2f} tokens per forward | drafter {stats.draft_s * 1000:.0f} ms"
          f"{draft_model(stats)}, model {model_s * 1000:.0f} ms{kv_held(stats)}]", file=file, flush=True)


def draft_model(stats) -> str:
    """' (740 in the draft model)' when the drafter ran a draft model, else ''."""
    return f" ({stats.draft_model_s * 1000:.0f} in the draft model)" if stats.draft_model_s else ""


def kv_held(stats) -> str:
    """' | KV 12.3 MiB (2.0x less)' when a press shrank the cache, else ''."""
    if not stats.kv_bytes or stats.kv_bytes >= stats.kv_full_bytes:
        return ""
    return f" | KV {stats.kv_bytes / 2**20:.1f} MiB ({stats.kv_full_bytes / stats.kv_bytes:.1f}x less)"


def read_prompt(prompt: str) -> str:
    """The prompt argument, or all of standard input for ``-`` (long prompts, pipes), read before the model
    loads so that a bad input fails at once."""
    if prompt != "-":
        return prompt
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TachyError(f"the prompt on standard input is not UTF-8 text (byte {e.start})") from None


def cmd_generate(args: argparse.Namespace) -> int:
    config = generation_config(args)
    prompt = read_prompt(args.prompt)
    engine = load_engine(args)
    use_chat = args.chat if args.chat is not None else engine.tokenizer.has_chat_template
    if use_chat:
        pieces = engine.stream_chat([{"role": "user", "content": prompt}], config)
    else:
        pieces = engine.stream(prompt, config)
    stats = None
    for piece in pieces:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        stats = piece.stats
    sys.stdout.write("\n")
    if stats is not None:
        print_stats(stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    config = generation_config(args)
    engine = load_engine(args)
    if not engine.tokenizer.has_chat_template:
        raise TachyError(f"{engine.name} has no chat template (a base model); use `tachy generate --raw`")
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("chat with the model; /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer, stats = [], None
        try:
            for piece in engine.stream_chat(messages, config):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                answer.append(piece.text)
                stats = piece.stats
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        except TachyError as e:   # this turn cannot be answered (a long history, bad input): the chat goes on
            hint = " (/reset clears the history)" if isinstance(e, ContextLengthError) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            messages.pop()
            continue
        print()
        if stats is not None and args.verbose:
            print_stats(stats)
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .registry import DEFAULT_MODEL, list_models

    for row in list_models():
        name, description, where = row[0], row[1], row[2]
        marker = "*" if name == DEFAULT_MODEL else " "
        print(f"{marker} {name:<14} {description}\n    {where}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert models into the cache now, so that their first load (a server start, a test run) is fast."""
    from .models.load import load_checkpoint
    from .registry import resolve_model

    for name in args.models:
        start = time.perf_counter()
        _, _, folder = load_checkpoint(resolve_model(name), progress=True)
        print(f"{name}: {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tachy", description="Fast, lossless LLM text generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a continuation or a chat answer for one prompt")
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the chat template (default when the model has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="plain completion of the prompt text")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with streaming")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed stats after each answer")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list named models and where their files are")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert models (names or GGUF paths) into the cache ahead of first use")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.set_defaults(func=cmd_convert)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Subcommands living in their own modules register here (bench, datastore, serve, ...).
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    _register_extras()
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except TachyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``tachy`` command: :func:`main`, then exit without tearing the interpreter down. Freeing torch's
    modules at exit takes ~0.4 s here, a fifth of a one-shot ``tachy generate``; every command has finished
    its work and its files when main returns, and output and logs are flushed first."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _register_extras() -> None:
    """Import optional subcommand modules; each appends its register function to EXTRA_COMMANDS."""
    import importlib

    for module in ("tachy.bench.cli", "tachy.speculative.drafters.cli", "tachy.server.cli", "tachy.eval.cli",
                   "tachy.decoding.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("tachy"):
                raise


if __name__ == "__main__":
    # `python -m tachy.cli`: run the imported module's main, whose EXTRA_COMMANDS the subcommand modules fill
    from tachy.cli import entry as _entry
    _entry()
