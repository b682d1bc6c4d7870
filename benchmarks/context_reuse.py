"""Context reuse measured: the prefix cache's second turn (engine and server), a shared system prompt under
concurrent load, PIE on an edited code prompt, APE on RAG prompts.

    python benchmarks/context_reuse.py [--conversations 8] [--repeats 3] [--parts turn2 server shared pie ape]

Every comparison runs side by side in one process/server, interleaved, and reports medians and ratios:

* ``turn2``: conversations whose first turn holds a ~1.2k-token passage (monte_cristo_pg1184.txt) and a
  question; turn 1 is generated (the cache keeps it), then turn 2's time to first token without the cache
  (``prefix_cache=False``) and with it, back to back; greedy outputs compared token for token.
* ``server``: the same through `tachy serve`'s streaming chat API (a subprocess on loopback): time to the first
  content chunk of turn 2, with ``"tachy": {"prefix_cache": false}`` against the default.
* ``shared``: 48 requests at concurrency 8 sharing a ~1k-token system prompt, each with its own question, in
  alternating rounds with and without the cache; p50/p99 time to first token, aggregate tokens/s and the
  server's own hit rate (/metrics).
* ``pie``: ~2k-token chat prompts of this repository's code, then the same with three lines rewritten in the
  middle: full re-encoding against PIE (tachy.context.pie) from the original's cache, and how often PIE's
  cache predicts the next token of full re-encoding's 64-token greedy continuation (teacher-forced), plus
  how many greedy tokens the two produce identically.
* ``ape``: locally built RAG questions (8 passages of Frankenstein, one holding a "secret code" fact):
  sequential encoding against APE (tachy.context.ape) with and without the passages cached; time to first
  token and answer accuracy (the code in the greedy answer).

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
import torch

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


def part_turn2(engine, conversations: int, max_new: int) -> dict:
    """Per conversation: turn 1 (the cache keeps it), then turn 2 without the cache, then with it (its first
    hit: a repeated turn 2 would find its own blocks too), so each pair ran back to back."""
    config = GenerationConfig(max_new_tokens=max_new)
    rows = []
    for i in range(conversations):
        history = first_turn(i)
        answer = engine.chat(history, config)
        turn2 = history + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = engine.chat_prompt(turn2)
        cold_s, cold_tokens, _ = ttft_and_tokens(engine, ids, dataclasses.replace(config, prefix_cache=False))
        warm_s, warm_tokens, cached = ttft_and_tokens(engine, ids, config)
        rows.append({"prompt_tokens": len(ids), "cached_tokens": cached, "ttft_cold_s": cold_s,
                     "ttft_cached_s": warm_s, "identical": warm_tokens == cold_tokens})
        print(f"turn2 {i}: {rows[-1]}", file=sys.stderr)
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
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


async def part_server(base: str, model: str, conversations: int, max_new: int) -> dict:
    """part_turn2 through the streaming chat API (``"tachy": {"prefix_cache": false}`` for the cold run)."""
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(conversations):
            history = first_turn(100 + i)
            answer = (await stream_chat(client, base, model, history, max_new))["text"]
            turn2 = history + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            cold = await stream_chat(client, base, model, turn2, max_new, use_cache=False)
            warm = await stream_chat(client, base, model, turn2, max_new)
            rows.append({"prompt_tokens": warm["usage"]["prompt_tokens"],
                         "cached_tokens": warm["usage"]["prompt_tokens_details"]["cached_tokens"],
                         "ttft_cold_s": cold["ttft_s"], "ttft_cached_s": warm["ttft_s"],
                         "identical": warm["text"] == cold["text"]})
            print(f"server turn2 {i}: {rows[-1]}", file=sys.stderr)
    return summarize(rows)


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


CODE_FILES = ["src/tachy/batch.py", "src/tachy/engine.py", "src/tachy/cache.py", "src/tachy/sampling.py"]


def code_prompts(engine, tokens: int = 2000) -> list[tuple[list[int], list[int]]]:
    """(original, edited) chat prompts around ~``tokens`` tokens of this repository's code: the edit rewrites
    three lines in the middle of the file (a renamed variable, a changed constant, an inserted comment)."""
    root = Path(__file__).resolve().parents[1]
    out = []
    for name in CODE_FILES:
        text = (root / name).read_text()
        lines = text.split("\n")
        keep = len(lines)
        while len(engine.tokenizer.encode("\n".join(lines[:keep]), add_special_tokens=False)) > tokens:
            keep = int(keep * 0.9)
        lines = lines[:keep]
        mid = len(lines) // 2
        edited = lines[:mid] + ["    # edited: the next two lines changed", lines[mid].replace("=", "= 1 +", 1),
                                "    limit = 2 * limit"] + lines[mid + 2:]

        def prompt(code: list[str]) -> list[int]:
            ask = "Here is a Python file:\n```python\n" + "\n".join(code) + "\n```\nExplain what this code does."
            return engine.chat_prompt([{"role": "user", "content": ask}])
        out.append((prompt(lines), prompt(edited)))
    return out


def greedy_after(engine, cache, logits, n: int) -> list[int]:
    """n greedy tokens decoded one at a time from a prefilled cache (plain decoding, no drafts)."""
    out = [int(logits.argmax(-1))]
    with torch.inference_mode():
        while len(out) < n:
            step = engine.model(torch.tensor([[out[-1]]]), torch.tensor([cache.position]), cache)[0]
            out.append(int(step[-1].argmax(-1)))
    return out


def teacher_forced_agreement(engine, cache, logits, reference: list[int]) -> float:
    """Fraction of the reference continuation's tokens that a cache predicts when fed the reference itself."""
    with torch.inference_mode():
        rest = engine.model(torch.tensor([reference[:-1]]),
                            cache.position + torch.arange(len(reference) - 1), cache)[0]
    predicted = [int(logits.argmax(-1))] + rest.argmax(-1).tolist()
    return sum(p == r for p, r in zip(predicted, reference)) / len(reference)


def part_pie(engine, repeats: int, continuation: int = 64) -> dict:
    from tachy.context import pie_prefill
    rows = []
    for old, new in code_prompts(engine):
        capacity = engine.cache_capacity(max(len(old), len(new)), continuation + 8)
        old_cache = engine.model.new_cache(capacity=capacity, fixed=True)
        with torch.inference_mode():
            engine._prefill(old, old_cache)
        full_s, pie_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                full_cache = engine.model.new_cache(capacity=capacity, fixed=True)
                full_logits = engine._prefill(new, full_cache)
            full_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.inference_mode():
                result = pie_prefill(engine, old, old_cache, new, capacity=capacity)
            pie_s.append(time.perf_counter() - start)
        reference = greedy_after(engine, full_cache, full_logits, continuation)
        pie_tokens = greedy_after(engine, result.cache, result.logits, continuation)
        diverge = next((i for i, (a, b) in enumerate(zip(reference, pie_tokens)) if a != b), continuation)
        fresh = pie_prefill(engine, old, old_cache, new, capacity=capacity)
        rows.append({"prompt_tokens": len(new), "reencoded": result.reencoded, "shifted": result.shifted,
                     "full_s": statistics.median(full_s), "pie_s": statistics.median(pie_s),
                     "teacher_forced_agreement": teacher_forced_agreement(engine, fresh.cache, fresh.logits,
                                                                          reference),
                     "identical_prefix_tokens": diverge})
        print(f"pie: {rows[-1]}", file=sys.stderr)
    speedups = [r["full_s"] / r["pie_s"] for r in rows]
    return {"prompts": rows, "median_speedup": statistics.median(speedups), "min_speedup": min(speedups),
            "mean_agreement": statistics.mean(r["teacher_forced_agreement"] for r in rows),
            "continuation": continuation}


CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Warsaw", "Athens",
          "Zurich"]


def rag_questions(engine, n: int, passages: int = 8, seed: int = 0) -> list[dict]:
    """Locally built RAG prompts: ``passages`` passages of Frankenstein (~220 tokens each), one of them (at a
    random place) holding the fact "The secret code of the <city> office is <number>."; the question asks
    for that code (SmolLM2-135M could not tell apart one fact per passage: 0 of 2 either way)."""
    import random
    rng = random.Random(seed)
    book = (DATA / "frankenstein_pg84.txt").read_text()
    enc = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)   # noqa: E731
    prefix = enc("<|im_start|>system\nYou answer questions using the passages given.<|im_end|>\n"
                 "<|im_start|>user\n")
    out = []
    for _ in range(n):
        city, code, holder = rng.choice(CITIES), str(rng.randrange(1000, 9999)), rng.randrange(passages)
        texts = []
        for j in range(passages):
            start = rng.randrange(20_000, len(book) - 2_000)
            text = book[start:start + 900]
            if j == holder:
                cut = rng.randrange(100, 800)
                text = f"{text[:cut]} The secret code of the {city} office is {code}. {text[cut:]}"
            texts.append(f"Passage {j + 1}: {text}\n\n")
        question = enc(f"Question: what is the secret code of the {city} office? Answer with the code."
                       "<|im_end|>\n<|im_start|>assistant\n")
        out.append({"prefix": prefix, "passages": [enc(t) for t in texts], "question": question,
                    "answer": code})
    return out


def part_ape(engine, samples: int, max_new: int = 16) -> dict:
    from tachy.context import PassageStore, ape_generate
    rows = []
    for item in rag_questions(engine, samples):
        full = item["prefix"] + sum(item["passages"], []) + item["question"]
        config = GenerationConfig(max_new_tokens=max_new, drafter="none", prefix_cache=False)
        start = time.perf_counter()
        pieces = list(engine.stream(full, config))
        seq_s = pieces[-1].stats.prefill_s
        seq_text = "".join(p.text for p in pieces)
        store = PassageStore()
        start = time.perf_counter()
        ape_generate(engine, item["prefix"], item["passages"], item["question"], 1, store=store)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        ape_generate(engine, item["prefix"], item["passages"], item["question"], 1, store=store)
        warm_s = time.perf_counter() - start
        ape_text = engine.tokenizer.decode(ape_generate(engine, item["prefix"], item["passages"], item["question"],
                                                        max_new, store=store))
        rows.append({"prompt_tokens": len(full), "passages": len(item["passages"]), "sequential_ttft_s": seq_s,
                     "ape_cold_ttft_s": cold_s, "ape_cached_ttft_s": warm_s,
                     "sequential_correct": item["answer"] in seq_text, "ape_correct": item["answer"] in ape_text,
                     "sequential_answer": seq_text, "ape_answer": ape_text, "expected": item["answer"]})
        print(f"ape: {rows[-1]}", file=sys.stderr)
    med = lambda key: statistics.median(r[key] for r in rows)   # noqa: E731
    return {"questions": rows, "sequential_ttft_s": med("sequential_ttft_s"), "ape_cold_ttft_s": med("ape_cold_ttft_s"),
            "ape_cached_ttft_s": med("ape_cached_ttft_s"),
            "sequential_accuracy": sum(r["sequential_correct"] for r in rows) / len(rows),
            "ape_accuracy": sum(r["ape_correct"] for r in rows) / len(rows)}


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
    if "pie" in results:
        r = results["pie"]
        lines += ["## PIE: a 3-line edit in the middle of a ~2k-token code prompt", "",
                  "| prompt tokens | re-encoded | re-rotated | full prefill (s) | PIE (s) | speedup | "
                  f"next-token agreement ({r['continuation']} tokens, teacher-forced) | identical greedy prefix |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in r["prompts"]:
            lines.append(f"| {p['prompt_tokens']} | {p['reencoded']} | {p['shifted']} | {p['full_s']:.3f} | "
                         f"{p['pie_s']:.3f} | {p['full_s'] / p['pie_s']:.1f}x | {p['teacher_forced_agreement']:.2f} | "
                         f"{p['identical_prefix_tokens']} |")
        lines += ["", f"median speedup {r['median_speedup']:.1f}x (lowest {r['min_speedup']:.1f}x), mean agreement "
                  f"{r['mean_agreement']:.2f}", ""]
    if "ape" in results:
        r = results["ape"]
        n = len(r["questions"])
        lines += [f"## APE: {n} RAG questions, {r['questions'][0]['passages']} passages each "
                  f"(~{statistics.median(q['prompt_tokens'] for q in r['questions']):.0f} tokens)", "",
                  "| | time to first token (median s) | vs sequential | accuracy |", "|---|---:|---:|---:|",
                  f"| sequential encoding | {r['sequential_ttft_s']:.3f} | 1.0x | {r['sequential_accuracy']:.2f} |",
                  f"| APE, passages not cached | {r['ape_cold_ttft_s']:.3f} | "
                  f"{r['sequential_ttft_s'] / r['ape_cold_ttft_s']:.1f}x | {r['ape_accuracy']:.2f} |",
                  f"| APE, passages cached | {r['ape_cached_ttft_s']:.3f} | "
                  f"{r['sequential_ttft_s'] / r['ape_cached_ttft_s']:.1f}x | {r['ape_accuracy']:.2f} |", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rag-questions", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--parts", nargs="+", default=["turn2", "server", "shared", "pie", "ape"])
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    results = {"model": args.model, "command": "python benchmarks/context_reuse.py " + " ".join(sys.argv[1:])}
    engine = tachy.load(args.model)
    if "turn2" in args.parts:
        results["turn2"] = part_turn2(engine, args.conversations, args.max_new_tokens)
    if "pie" in args.parts:
        results["pie"] = part_pie(engine, args.repeats)
    if "ape" in args.parts:
        results["ape"] = part_ape(engine, args.rag_questions)
    if {"server", "shared"} & set(args.parts):
        proc = start_server(args.model, args.port, 2, [])
        base = f"http://127.0.0.1:{args.port}"
        try:
            model = asyncio.run(wait_ready(base, proc))
            if "server" in args.parts:
                results["server"] = asyncio.run(part_server(base, model, args.conversations, args.max_new_tokens))
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
