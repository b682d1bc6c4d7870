"""Context reuse measured: the prefix cache's second turn (engine and server), a shared system prompt under
concurrent load, PIE on an edited code prompt, APE on RAG prompts.

    python benchmarks/context_reuse.py [--conversations 5] [--repeats 3] [--parts turn2 server shared pie ape]

Every comparison runs side by side in one process/server, interleaved, and reports medians and ratios:

* ``turn2``: conversations whose first turn holds a ~1.2k-token passage (monte_cristo_pg1184.txt) and a
  question; turn 1 is generated (the cache keeps it), then turn 2's time to first token with the cache
  against ``prefix_cache=False``, alternating; greedy outputs compared token for token.
* ``server``: the same through `tachy serve`'s streaming chat API (a subprocess on loopback): time to the first
  content chunk of turn 2, with ``"tachy": {"prefix_cache": false}`` against the default.
* ``shared``: 48 requests at concurrency 8 sharing a ~1k-token system prompt, each with its own question, in
  alternating rounds with and without the cache; p50/p99 time to first token, aggregate tokens/s and the
  server's own hit rate (/metrics).
* ``pie`` / ``ape``: see tachy.context (the PIE and APE sections of docs/benchmarks.md).

Writes docs/results/context_reuse/results.json and results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import DATA, pct, start_server, wait_ready  # noqa: E402

import tachy  # noqa: E402
from tachy import GenerationConfig  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "context_reuse"
BOOK = DATA / "monte_cristo_pg1184.txt"
QUESTIONS = ["Who are the people in this passage?", "Where does the scene take place?",
             "What happens at the end of the passage?", "Describe the mood of the passage.",
             "What does the main character want?", "List three details from the passage."]


def passage(i: int, chars: int = 5200) -> str:
    text = BOOK.read_text()
    start = 120_000 + (i * 37_003) % 2_000_000
    return text[start:start + chars]


def first_turn(i: int) -> list[dict]:
    return [{"role": "user", "content": passage(i) + "\n\nSummarize the passage above in three sentences."}]


def ttft_and_tokens(engine, ids: list[int], config: GenerationConfig) -> tuple[float, list[int], int]:
    """(seconds to the first streamed token, every token, prompt tokens the cache served)."""
    start = time.perf_counter()
    first, tokens, cached = None, [], 0
    for piece in engine.stream(ids, config):
        if first is None and piece.token_ids:
            first = time.perf_counter() - start
        tokens += piece.token_ids
        cached = piece.stats.cached_tokens
    return first, tokens, cached


def part_turn2(engine, conversations: int, repeats: int, max_new: int) -> dict:
    config = GenerationConfig(max_new_tokens=max_new)
    rows = []
    for i in range(conversations):
        history = first_turn(i)
        answer = engine.chat(history, config)
        turn2 = history + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = engine.chat_prompt(turn2)
        cold_s, warm_s, identical, cached = [], [], True, 0
        reference = None
        for _ in range(repeats):
            for use in (False, True):
                s, tokens, c = ttft_and_tokens(engine, ids, dataclasses.replace(config, prefix_cache=use))
                (warm_s if use else cold_s).append(s)
                reference = reference or tokens
                identical &= tokens == reference
                cached = c if use else cached
        rows.append({"prompt_tokens": len(ids), "cached_tokens": cached, "ttft_cold_s": statistics.median(cold_s),
                     "ttft_cached_s": statistics.median(warm_s), "identical": identical})
        print(f"turn2 {i}: {rows[-1]}", file=sys.stderr)
    speedups = [r["ttft_cold_s"] / r["ttft_cached_s"] for r in rows]
    return {"conversations": rows, "median_speedup": statistics.median(speedups), "min_speedup": min(speedups),
            "identical": all(r["identical"] for r in rows)}


async def stream_chat(client: httpx.AsyncClient, base: str, model: str, messages: list[dict], max_tokens: int,
                      use_cache: bool = True) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "tachy": {"prefix_cache": use_cache}}
    start = time.perf_counter()
    out = {"ttft_s": None, "text": "", "usage": None, "ok": False}
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                out["ok"] |= line == "data: [DONE]"
                continue
            chunk = json.loads(line[6:])
            out["usage"] = chunk.get("usage") or out["usage"]
            content = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
            if content:
                out["ttft_s"] = out["ttft_s"] or time.perf_counter() - start
                out["text"] += content
    out["latency_s"] = time.perf_counter() - start
    return out


async def part_server(base: str, model: str, conversations: int, repeats: int, max_new: int) -> dict:
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(conversations):
            history = first_turn(i)
            answer = (await stream_chat(client, base, model, history, max_new))["text"]
            turn2 = history + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            cold, warm, texts, cached = [], [], set(), 0
            for _ in range(repeats):
                for use in (False, True):
                    r = await stream_chat(client, base, model, turn2, max_new, use)
                    (warm if use else cold).append(r["ttft_s"])
                    texts.add(r["text"])
                    if use:
                        cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
                    prompt_tokens = r["usage"]["prompt_tokens"]
            rows.append({"prompt_tokens": prompt_tokens, "cached_tokens": cached,
                         "ttft_cold_s": statistics.median(cold), "ttft_cached_s": statistics.median(warm),
                         "identical": len(texts) == 1})
            print(f"server turn2 {i}: {rows[-1]}", file=sys.stderr)
    speedups = [r["ttft_cold_s"] / r["ttft_cached_s"] for r in rows]
    return {"conversations": rows, "median_speedup": statistics.median(speedups), "min_speedup": min(speedups),
            "identical": all(r["identical"] for r in rows)}


async def metric(client: httpx.AsyncClient, base: str, name: str) -> float:
    text = (await client.get(f"{base}/metrics")).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def part_shared(base: str, model: str, requests: int, concurrency: int, rounds: int, max_new: int) -> dict:
    system = passage(99, chars=4400) + "\n\nAnswer questions about the passage above briefly."
    results = {True: [], False: []}
    wall = {True: 0.0, False: 0.0}
    hits = {"lookups": 0.0, "hits": 0.0, "reused": 0.0, "looked_up": 0.0}
    per_round = max(1, requests // (2 * rounds))
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(2 * rounds):
            use = r % 2 == 1
            sem = asyncio.Semaphore(concurrency)
            before = {k: await metric(client, base, f"tachy_prefix_cache_{n}") for k, n in
                      [("lookups", "lookups_total"), ("hits", "hits_total"), ("reused", "reused_tokens_total"),
                       ("looked_up", "looked_up_tokens_total")]}

            async def one(j: int) -> dict:
                async with sem:
                    messages = [{"role": "system", "content": system},
                                {"role": "user", "content": f"{QUESTIONS[j % len(QUESTIONS)]} (question {j})"}]
                    return await stream_chat(client, base, model, messages, max_new, use)

            start = time.perf_counter()
            done = await asyncio.gather(*(one(r * per_round + j) for j in range(per_round)))
            wall[use] += time.perf_counter() - start
            results[use] += done
            if use:
                for k, n in [("lookups", "lookups_total"), ("hits", "hits_total"), ("reused", "reused_tokens_total"),
                             ("looked_up", "looked_up_tokens_total")]:
                    hits[k] += await metric(client, base, f"tachy_prefix_cache_{n}") - before[k]
    out = {}
    for use, done in results.items():
        ttft = sorted(d["ttft_s"] for d in done if d["ttft_s"] is not None)
        tokens = sum(d["usage"]["completion_tokens"] for d in done if d["usage"])
        out["cache" if use else "no cache"] = {
            "requests": len(done), "failed": sum(not d["ok"] for d in done), "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99), "tokens_per_s": tokens / wall[use]}
    out["hit_rate"] = hits["hits"] / hits["lookups"] if hits["lookups"] else 0.0
    out["reused_token_share"] = hits["reused"] / hits["looked_up"] if hits["looked_up"] else 0.0
    print(f"shared: {out}", file=sys.stderr)
    return out


def report(results: dict) -> str:
    lines = ["# Context reuse", "", f"`{results['command']}`, {results['model']}", ""]
    for part in ("turn2", "server"):
        if part not in results:
            continue
        r = results[part]
        lines += [f"## Second turn, {'engine' if part == 'turn2' else 'server streaming API'}", "",
                  "| prompt tokens | from the cache | TTFT without (s) | TTFT with (s) | speedup | identical |",
                  "|---:|---:|---:|---:|---:|:---:|"]
        for c in r["conversations"]:
            lines.append(f"| {c['prompt_tokens']} | {c['cached_tokens']} | {c['ttft_cold_s']:.3f} | "
                         f"{c['ttft_cached_s']:.3f} | {c['ttft_cold_s'] / c['ttft_cached_s']:.1f}x | "
                         f"{'yes' if c['identical'] else 'NO'} |")
        lines += ["", f"median speedup {r['median_speedup']:.1f}x (lowest {r['min_speedup']:.1f}x)", ""]
    if "shared" in results:
        r = results["shared"]
        lines += ["## Shared system prompt, concurrency 8", "",
                  "| | requests | failed | TTFT p50 (s) | TTFT p99 (s) | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
        for name in ("no cache", "cache"):
            x = r[name]
            lines.append(f"| {name} | {x['requests']} | {x['failed']} | {x['ttft_p50_s']:.3f} | "
                         f"{x['ttft_p99_s']:.3f} | {x['tokens_per_s']:.1f} |")
        lines += ["", f"hit rate {r['hit_rate']:.2f}, prompt tokens served by the cache {r['reused_token_share']:.2f}",
                  ""]
    for part in ("pie", "ape"):
        if part in results:
            lines += [f"## {part.upper()}", "", "```", json.dumps(results[part], indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conversations", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--parts", nargs="+", default=["turn2", "server", "shared"])
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    results = {"model": args.model, "command": "python benchmarks/context_reuse.py " + " ".join(sys.argv[1:])}
    engine = tachy.load(args.model)
    if "turn2" in args.parts:
        results["turn2"] = part_turn2(engine, args.conversations, args.repeats, args.max_new_tokens)
    if {"server", "shared"} & set(args.parts):
        proc = start_server(args.model, args.port, 2, [])
        base = f"http://127.0.0.1:{args.port}"
        try:
            model = asyncio.run(wait_ready(base, proc))
            if "server" in args.parts:
                results["server"] = asyncio.run(part_server(base, model, args.conversations, args.repeats,
                                                            args.max_new_tokens))
            if "shared" in args.parts:
                results["shared"] = asyncio.run(part_shared(base, model, 48, 8, 2, 32))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
