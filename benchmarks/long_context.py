"""Long-context decoding speed: dense attention vs each sparse attention method (tachy.sparse), and the default
drafter vs plain decoding, on one long prompt (interleaved rounds, medians).

    PYTHONPATH=src python benchmarks/long_context.py [--model smollm2-135m] [--context 8192] [--tokens 64]
        [--rounds 3] [--threads 1] [--settings dense,quest,tidal,dense+default,quest+default]
        [--out docs/results/long_context]

A setting is ``ATTENTION[+DRAFTER]`` (drafter ``none`` unless given; an attention may carry options:
``quest:budget=512+default``; ``DRAFTER@128`` weighs drafts by the costs measured after 128 tokens alone, as
drafters did before they scaled them with the context). Each round runs every setting in turn through ``Engine.stream`` (order rotating
per round, so machine noise spreads over all alike): the prompt (tinyshakespeare cut to ``--context`` tokens,
then a question, as a chat turn; shortened so that it and the new tokens fit the model's window) is prefilled, then ``--tokens`` greedy tokens are decoded (EOS ignored).
Reported per setting: median time to first token (prefill) and decode tokens/s, and the K/V bytes one decoded
token reads (computed from the method's shape at the mean decode context, ``SparseAttention.kv_bytes_per_token``).
Writes results.json and results.md to ``--out``.

A dense 8k prefill takes minutes on one busy core, and every decode-time method prefills the same way
(densely, the same bits), so only the ``--ttft`` settings prefill for real each round; the others start from a
copy of the first real prefill's cache (``SharedPrefill``; ``--keep-prefill FILE`` keeps it for later runs),
and their "prefill s" is the median real prefill plus their own time to first token beyond it (drafter set-up,
sparse attention attach).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tachy
from tachy import GenerationConfig
from tachy.eval.sweep import read_text
from tachy.sparse import kv_read_per_token

QUESTION = "\n\nWho speaks first in the text above, and what do they say? Answer in two sentences."


def parse_setting(text: str) -> tuple[str, str]:
    """'quest:budget=512+default' -> ('quest:budget=512', 'default'); the drafter defaults to none."""
    attention, _, drafter = text.partition("+")
    return attention, drafter or "none"


SHORT_COSTS = "@128"   # a drafter name suffix: its costs as measured after 128 tokens, not scaled by context


def drafter_for(engine, name: str):
    """The drafter a setting names: a registry name, or NAME@128, a fresh NAME that weighs drafts by the
    forward costs measured after 128 tokens alone (key_cost 0: how drafters chose before Drafter.costs_at)."""
    if not name.endswith(SHORT_COSTS):
        return name
    from tachy.speculative.drafters import make_drafter

    drafter = make_drafter(name.removesuffix(SHORT_COSTS))
    drafter.check_target(engine)
    pending = [drafter]
    while pending:   # every drafter inside the wrappers
        d = pending.pop()
        d.key_cost = 0.0
        pending += [x for x in [getattr(d, "inner", None), *getattr(d, "drafters", [])] if x is not None]
    return drafter


def long_prompt(engine, context: int) -> list[int]:
    """A prompt of about ``context`` tokens: the text's first tokens, then the question; a chat turn where the
    model has a chat template, else plain text (a base model: gemma3-270m)."""
    tok = engine.tokenizer
    wrap = ((lambda text: engine.chat_prompt([{"role": "user", "content": text}])) if tok.has_chat_template
            else (lambda text: tok.encode(text)))
    text_ids = tok.encode(read_text(None, "--text")[: context * 8], add_special_tokens=False)
    body = tok.decode(text_ids[: context - len(wrap(QUESTION))])
    return wrap(body + QUESTION)


class SharedPrefill:
    """Stands in for ``Engine._prefill`` (patched on the engine): the first call prefills for real and keeps
    the cache's K/V and the logits; later calls with ``real=False`` copy them into the new cache."""

    def __init__(self, engine, keep: Path | None = None):
        """keep: a file to keep the first prefill in (and its seconds), reused by later runs of the benchmark
        with the same prompt: one dense 8k prefill is minutes on a busy core."""
        self.engine, self.real, self.saved, self.keep = engine, True, None, keep
        self.prefill = engine._prefill
        self.seconds: list[float] = []     # each real prefill's
        engine._prefill = self

    def __call__(self, prompt_ids, cache, press=None):
        if self.saved is None and self.keep is not None and self.keep.is_file():
            kept = torch.load(self.keep)
            if kept["ids"] == list(prompt_ids):
                self.saved = (kept["k"], kept["v"], kept["n"], kept["logits"])
                self.seconds.append(kept["seconds"])
            else:
                print(f"{self.keep} holds another prompt's prefill: prefilling anew and replacing it")
                self.keep.unlink()
        if self.real or self.saved is None:
            start = time.perf_counter()
            logits = self.prefill(prompt_ids, cache, press)
            self.seconds.append(time.perf_counter() - start)
            n = cache.length
            self.saved = (cache.k[:, :, :, :n].clone(), cache.v[:, :, :, :n].clone(), n, logits.clone())
            if self.keep is not None and not self.keep.is_file():
                torch.save({"ids": list(prompt_ids), "k": self.saved[0], "v": self.saved[1], "n": n,
                            "logits": self.saved[3], "seconds": self.seconds[-1]}, self.keep)
            return logits
        k, v, n, logits = self.saved
        cache.k[:, :, :, :n], cache.v[:, :, :, :n] = k, v
        cache.length = cache.position = n
        return logits.clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="dense,quest,tidal,dense+default,quest+default")
    ap.add_argument("--ttft", default="dense,dense+default",
                    help="settings that prefill for real every round (time to first token compared)")
    ap.add_argument("--keep-prefill", default=None,
                    help="file keeping the first dense prefill (and its seconds) for later runs of this benchmark")
    ap.add_argument("--out", default="docs/results/long_context")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = args.settings.split(",")
    for s in settings:
        GenerationConfig(attention=parse_setting(s)[0], drafter=parse_setting(s)[1].removesuffix(SHORT_COSTS))
    engine = tachy.load(args.model, progress=False)
    ids = long_prompt(engine, min(args.context, engine.max_context - args.tokens - 1))   # the window holds both
    drafters = {s: drafter_for(engine, parse_setting(s)[1]) for s in settings}
    real = [s for s in args.ttft.split(",") if s]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    outputs: dict[str, list[int]] = {}
    engine.generate(ids[:64], max_new_tokens=4, drafter=None)   # warm-up (kernels, step costs)
    shared = SharedPrefill(engine, Path(args.keep_prefill) if args.keep_prefill else None)
    for r in range(args.rounds):
        for s in settings[r % len(settings):] + settings[:r % len(settings)]:
            attention, drafter = parse_setting(s)
            shared.real = s in real
            config = GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True, attention=attention,
                                      drafter=drafters[s], prefix_cache=False)   # SharedPrefill shares, or not
            tokens, stats, start, first = [], None, time.perf_counter(), None
            for piece in engine.stream(ids, config):
                first = first or time.perf_counter() - start
                tokens += piece.token_ids
                stats = piece.stats
            outputs[s] = tokens
            runs[s].append({"prefill_s": stats.prefill_s, "first_piece_s": first, "real_prefill": shared.real,
                            "decode_tokens_per_s": stats.tokens_per_s,
                            "tokens_per_forward": stats.mean_accepted, "drafted": stats.drafted,
                            "accepted": stats.accepted, "forwards": stats.forwards,
                            "draft_s": stats.draft_s, "decode_s": stats.decode_s})
            print(f"round {r} {s}: prefill {stats.prefill_s:.2f}s, decode {stats.tokens_per_s:.2f} tokens/s",
                  flush=True)
    context = len(ids) + args.tokens // 2
    results = {"model": args.model, "prompt_tokens": len(ids), "tokens": args.tokens, "rounds": args.rounds,
               "threads": args.threads, "real_prefill_s": statistics.median(shared.seconds), "settings": {}}
    for s in settings:
        attention, drafter = parse_setting(s)
        prefill = statistics.median(x["prefill_s"] for x in runs[s])
        results["settings"][s] = {
            "attention": attention, "drafter": drafter, "real_prefill": s in real,
            "prefill_s": prefill if s in real else results["real_prefill_s"] + prefill,
            "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in runs[s]),
            "first_piece_s": statistics.median(x["first_piece_s"] for x in runs[s]),
            "tokens_per_forward": statistics.median(x["tokens_per_forward"] for x in runs[s]),
            "decode_vs_base_per_round": [x["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                         for x, b in zip(runs[s], runs[settings[0]])],
            "kv_bytes_read_per_token": kv_read_per_token(engine.config, attention, context),
            "same_tokens_as": [o for o in settings if o != s and outputs[o] == outputs[s]],
            "runs": runs[s]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    base = results["settings"][settings[0]]
    lines = [f"{args.model}, {len(ids)}-token prompt, {args.tokens} greedy tokens, {args.rounds} interleaved rounds, "
             f"{args.threads} thread(s); medians; ratios against `{settings[0]}`. Prefilled for real every round: "
             f"{', '.join(real) or 'none'}; the others: median real prefill + their own set-up.", "",
             "| setting | prefill s | decode tokens/s | decode vs base (ratio of medians; median of per-round ratios) "
             "| tokens/forward | K/V MB read per token |",
             "|---|---|---|---|---|---|"]
    for s, v in results["settings"].items():
        lines.append(f"| {s} | {v['prefill_s']:.2f} | {v['decode_tokens_per_s']:.2f} | "
                     f"{v['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x; "
                     f"{statistics.median(v['decode_vs_base_per_round']):.2f}x | {v['tokens_per_forward']:.2f} | "
                     f"{v['kv_bytes_read_per_token'] / 1e6:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
