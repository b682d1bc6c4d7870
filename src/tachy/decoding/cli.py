"""CLI for the decoding toolbox: decoding flags on ``tachy generate`` / ``tachy chat`` and
``tachy watermark detect TEXT``.

    tachy generate "Once upon a time" --raw --strategy beam --num-beams 4
    tachy generate "..." --strategy contrastive_search:penalty_alpha=0.6,top_k=4
    tachy generate "A person as JSON" --json-schema person.json
    tachy generate "A phone number:" --raw --regex "\\d{3}-\\d{4}"
    tachy generate "..." --temperature 1 --watermark ; tachy watermark detect "the text"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import EXTRA_COMMANDS, add_model_args
from ..errors import InvalidArgumentError
from ..spec import parse_spec

# flag -> strategy option (passed only when given, so each strategy keeps its own defaults)
OPTION_FLAGS = {
    "num_beams": int, "length_penalty": float, "early_stopping": str, "patience": float,
    "num_beam_groups": int, "diversity_penalty": float, "penalty_alpha": float,
}


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding strategy (tachy.decoding)")
    g.add_argument("--strategy", default="default",
                   help="default, beam, diverse_beam, contrastive_search, contrastive_decoding, context_aware, "
                        "mirostat, fsd, mbr; options as name:key=value,...")
    for name, kind in OPTION_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"strategy option {name}")
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the output to this JSON schema")
    fmt.add_argument("--json", action="store_true", help="constrain the output to a JSON object")
    fmt.add_argument("--regex", default=None, help="constrain the output to this regular expression")
    g.add_argument("--watermark", nargs="?", const="on", default=None, metavar="key=value,...",
                   help="green-list watermark (options gamma, delta, key)")


def decoding_fields(args: argparse.Namespace) -> dict:
    """GenerationConfig fields from the decoding flags (empty when the parser has none)."""
    if not hasattr(args, "strategy"):
        return {}
    options = {}
    for name in OPTION_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            if name == "early_stopping":
                value = {"true": True, "false": False}.get(value.lower(), value)
            options[name] = value
    response_format = None
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(f"--json-schema {args.json_schema}: {e}") from None
        response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    elif args.json:
        response_format = {"type": "json_object"}
    elif args.regex is not None:
        response_format = {"type": "regex", "regex": args.regex}
    return dict(strategy=args.strategy, strategy_options=options, response_format=response_format,
                watermark=_watermark(args.watermark))


def _watermark(spec: str | None):
    if spec is None:
        return None
    if spec == "on":
        return True
    return parse_spec("watermark:" + spec)[1]


def cmd_watermark_detect(args: argparse.Namespace) -> int:
    import tachy
    from .watermark import detect, watermark_config

    text = sys.stdin.read() if args.text == "-" else args.text
    engine = tachy.load(args.model, dtype=args.dtype, device=args.device, progress=False)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    score = detect(ids, engine.config.vocab_size, watermark_config(_watermark(args.options) or True))
    verdict = "watermarked" if score.z > args.threshold else "not watermarked"
    print(f"z = {score.z:.2f}  (green {score.green}/{score.scored} = {score.green_fraction:.2f}, "
          f"p = {score.p_value:.2e}): {verdict} at z > {args.threshold:g}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    for command in ("generate", "chat"):
        if command in sub.choices:
            add_decoding_args(sub.choices[command])
    p = sub.add_parser("watermark", help="detect the green-list watermark in a text")
    wsub = p.add_subparsers(dest="watermark_command", required=True)
    d = wsub.add_parser("detect", help="z-score of the green-list watermark in TEXT ('-' reads stdin)")
    d.add_argument("text")
    d.add_argument("--options", default=None, metavar="key=value,...", help="gamma, delta, key used to mark")
    d.add_argument("--threshold", type=float, default=4.0, help="z above which the text counts as watermarked")
    add_model_args(d)
    d.set_defaults(func=cmd_watermark_detect)


EXTRA_COMMANDS.append(register)
