"""Soak test of `tachy serve` on loopback: random mixed requests, a share of them abandoned midway, round
after round; then stop. It fails (exit 1) on any 5xx, any server-error chunk in a stream, or a server that is
not idle again after a round.

Each request is drawn at random: chat or completion, streamed or not, 1-128 new tokens, short prompts or ones
of up to ~2,000 tokens, greedy or sampled, sometimes n > 1, log-probabilities, echo, tools, a response_format,
a decoding strategy (with options that may not fit it: those are 400s), stop strings. ``--abort`` of them are
abandoned: a stream closed after a few chunks, or a plain request given up after 0.3 s. After each round the
script waits for /health to show nothing running or queued, asks one more request, and reads the server's
resident memory, whose plateau (the prefix cache fills to its bound, then evicts) tells a leak from a cache.

Command: `python benchmarks/soak_test.py --rounds 10 --requests 400 --concurrency 24`
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import start_server, stop_servers, wait_ready  # noqa: E402

STRATEGIES = ["beam", "contrastive_search", "fsd", "mirostat"]
REGEX = "[a-z]{3,8}( [0-9]+)?"


def random_request(rng: random.Random, model: str) -> tuple[str, dict]:
    """(path, body) of one random request; some combinations are invalid on purpose (400s)."""
    body: dict = {"model": model, "max_tokens": rng.choice([1, 8, 32, 128]), "stream": rng.random() < 0.5}
    if rng.random() < 0.6:
        path = "/v1/chat/completions"
        text = rng.choice(["Hi", "Write a poem about the sea.", "List 5 fruits.", "word " * rng.randint(1, 1500)])
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        if rng.random() < 0.15:
            body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"a": {"type": "integer"}}}}}]
            body["tool_choice"] = rng.choice(["auto", "required", "none"])
    else:
        path = "/v1/completions"
        body["prompt"] = rng.choice(["The sky is", "def f(x):", "1, 2, 3,", "a " * rng.randint(1, 2000)])
        if rng.random() < 0.2:
            body["echo"] = True
    if rng.random() < 0.3:
        body.update(temperature=rng.choice([0, 0.7, 1.5]), seed=rng.randint(0, 10**6))
    if rng.random() < 0.2:
        body["n"] = rng.randint(1, 4)
    if rng.random() < 0.15 and "tools" not in body:
        body["response_format"] = rng.choice([{"type": "json_object"}, {"type": "regex", "regex": REGEX}])
    if rng.random() < 0.15:
        body["tachy"] = {"strategy": rng.choice(STRATEGIES)}
        if rng.random() < 0.5:
            body["tachy"]["strategy_options"] = {"num_beams": 2}
    if rng.random() < 0.1:
        body["stop"] = ["\n", "."]
    return path, body


async def one_request(client: httpx.AsyncClient, base: str, path: str, body: dict, abort: bool) -> str:
    """The outcome: an HTTP status, "aborted", "stream server error" or an exception's name."""
    try:
        if body["stream"]:
            async with client.stream("POST", base + path, json=body, timeout=300) as r:
                outcome, chunks = str(r.status_code), 0
                async for line in r.aiter_lines():
                    chunks += 1
                    if '"server_error"' in line:
                        outcome = "stream server error"
                    if abort and chunks > 3:
                        return "aborted"
                return outcome
        try:
            r = await client.post(base + path, json=body, timeout=0.3 if abort else 300)
        except httpx.TimeoutException:
            if abort:
                return "aborted"
            raise
        return str(r.status_code)
    except httpx.HTTPError as e:
        return type(e).__name__


async def run_round(base: str, model: str, rng: random.Random, requests: int, concurrency: int,
                    abort: float) -> dict:
    outcomes: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    draws = [(*random_request(rng, model), rng.random() < abort) for _ in range(requests)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def guarded(path: str, body: dict, give_up: bool) -> None:
            async with gate:
                outcome = await one_request(client, base, path, body, give_up)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        start = time.monotonic()
        await asyncio.gather(*(guarded(*d) for d in draws))
        wall = time.monotonic() - start
        health: dict = {}
        for _ in range(120):   # abandoned requests end at their next forward
            health = (await client.get(base + "/health")).json()
            if health["running"] == 0 and health["queue_depth"] == 0:
                break
            await asyncio.sleep(0.5)
        after = await client.post(base + "/v1/completions", timeout=60,
                                  json={"model": model, "prompt": "The sky is", "max_tokens": 4, "temperature": 0})
    return {"wall_s": round(wall, 1), "outcomes": dict(sorted(outcomes.items())), "idle_after": health.get("running") == 0
            and health.get("queue_depth") == 0, "status_after": health.get("status"),
            "request_after": after.status_code}


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


async def soak(args: argparse.Namespace) -> int:
    base = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.model, args.port, args.threads, ["--max-queue", "256"])
    failures = 0
    try:
        model = await wait_ready(base, proc)
        rng = random.Random(args.seed)
        print(f"soak test of `tachy serve --model {args.model}`: {args.rounds} rounds of {args.requests} requests "
              f"at concurrency {args.concurrency}, {args.abort:.0%} abandoned", flush=True)
        rounds = []
        for k in range(args.rounds):
            result = await run_round(base, model, rng, args.requests, args.concurrency, args.abort)
            result["resident_mb"] = round(resident_mb(proc.pid))
            rounds.append(result)
            bad = sum(n for o, n in result["outcomes"].items() if o.startswith("5") or o == "stream server error")
            ok = result["idle_after"] and result["request_after"] == 200 and not bad
            failures += not ok
            print(f"round {k + 1}: {json.dumps(result)}{'' if ok else '  <- FAILED'}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1) + "\n")
    finally:
        stop_servers([proc])
    print("no 5xx, no server-error chunk, idle after every round" if not failures else f"{failures} rounds failed")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=400, help="requests per round")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--abort", type=float, default=0.2, help="share of requests abandoned midway")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="a JSON file for the rounds' results")
    sys.exit(asyncio.run(soak(p.parse_args())))


if __name__ == "__main__":
    main()
