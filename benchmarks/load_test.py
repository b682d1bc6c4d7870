"""Bounded load test of `tachy serve` on loopback: N requests at concurrency C, mixed streaming, then stop.

Starts its own server (a subprocess running `tachy serve` on a free loopback port), measures one request at
a time first (the baseline), then the load: chat and completion requests, every other one streamed (with
usage in the last chunk), greedy, ``--max-tokens`` new tokens each, prompts from vicuna_bench.jsonl. A
request counts as failed unless it returns 200 with a complete body (for streams: usage and ``[DONE]``).
With several ``--max-batch`` values the same load runs against a fresh server per value, back to back
(1 = one request at a time, no batching).

    python benchmarks/load_test.py [--requests 96] [--concurrency 16] [--max-tokens 32] [--threads 2] \
        [--max-batch 1 8]

writes docs/results/server_load/results.json and results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "vicuna_bench.jsonl"
OUT = ROOT / "docs" / "results" / "server_load"


def start_server(model: str, port: int, threads: int, max_queue: int, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    code = "import sys; from tachy.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "serve", "--model", model, "--port", str(port),
                             "--max-queue", str(max_queue), "--max-batch", str(max_batch), "--log-level", "warning"],
                            env=env)


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                r = await client.get(f"{base}/health")
                if r.status_code == 200:
                    return r.json()["model"]
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the server did not come up")


async def one_request(client: httpx.AsyncClient, base: str, model: str, i: int, prompt: str,
                      max_tokens: int) -> dict:
    chat, stream = i % 4 < 2, i % 2 == 1   # chat/completion x stream/non-stream, evenly mixed
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    url = f"{base}/v1/{'chat/completions' if chat else 'completions'}"
    start = time.perf_counter()
    out = {"chat": chat, "stream": stream, "ok": False, "tokens": 0, "ttft_s": None}
    try:
        if not stream:
            r = await client.post(url, json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                out["tokens"] = r.json()["usage"]["completion_tokens"]
                out["ok"] = True
        else:
            async with client.stream("POST", url, json=body) as r:
                out["status"] = r.status_code
                done, usage = False, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - start
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                out["ok"] = r.status_code == 200 and done and usage is not None
                out["tokens"] = usage["completion_tokens"] if usage else 0
    except Exception as e:  # noqa: BLE001 - a failure to count, not to crash on
        out["error"] = repr(e)
    out["latency_s"] = time.perf_counter() - start
    return out


async def run_load(base: str, model: str, prompts: list[str], n: int, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def task(i: int) -> dict:
            async with sem:
                return await one_request(client, base, model, i, prompts[i % len(prompts)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n)))
        wall = time.perf_counter() - start
    lat = sorted(r["latency_s"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    tokens = sum(r["tokens"] for r in results if r["ok"])
    return {"requests": n, "concurrency": concurrency, "failed": sum(not r["ok"] for r in results),
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(_pct(lat, 50), 3), "latency_p99_s": round(_pct(lat, 99), 3),
            "ttft_p50_s": round(_pct(ttft, 50), 3) if ttft else None,
            "errors": [r.get("error") or r.get("status") for r in results if not r["ok"]][:10]}


def _pct(sorted_values: list[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--baseline-requests", type=int, default=8, help="one-at-a-time requests first")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 8],
                    help="one server and load run per value (1: no batching)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from tachy.server.background import free_port

    prompts = [json.loads(line)["turns"][0] for line in PROMPTS.read_text().splitlines() if line.strip()]
    single, loads, model = None, {}, args.model
    for max_batch in args.max_batch:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(args.model, port, args.threads, max(args.concurrency, 64), max_batch)
        try:
            model = asyncio.run(wait_ready(base, proc))
            if single is None:
                single = asyncio.run(run_load(base, model, prompts, args.baseline_requests, 1, args.max_tokens))
                print(f"one at a time: {single}", file=sys.stderr, flush=True)
            load = asyncio.run(run_load(base, model, prompts, args.requests, args.concurrency, args.max_tokens))
            metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{base}/metrics").text.splitlines()
                       if line and not line.startswith("#") and "{" not in line}
            steps = metrics.get("tachy_batch_steps_total", 0)
            load["mean_batch_rows"] = round(metrics["tachy_batch_rows_total"] / steps, 2) if steps else None
            load["mean_accepted_tokens"] = metrics.get("tachy_mean_accepted_tokens")
            loads[max_batch] = load
            print(f"load, max_batch={max_batch}: {load}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    command = "python benchmarks/load_test.py " + " ".join(sys.argv[1:])
    results = {"model": model, "max_tokens": args.max_tokens, "server_threads": args.threads, "command": command,
               "single": single, "load": {str(k): v for k, v in loads.items()},
               "aggregate_vs_single": {str(k): round(v["tokens_per_s"] / single["tokens_per_s"], 3)
                                       for k, v in loads.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [("one at a time", single)] + [(f"concurrency {args.concurrency}, max_batch={k}", v)
                                          for k, v in loads.items()]
    lines = [f"Load test of `tachy serve` ({model}, {args.threads} torch thread(s)), loopback, greedy, "
             f"{args.max_tokens} new tokens max, chat/completion x stream/non-stream evenly mixed; the same "
             f"requests against a fresh server per max_batch, back to back.", "",
             f"Command: `{command}`", "",
             "| run | requests | failed | wall s | completion tokens | aggregate tokens/s | p50 latency s | "
             "p99 latency s | p50 time to first chunk s | mean batch rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['requests']} | {r['failed']} | {r['wall_s']} | {r['completion_tokens']} | "
                     f"{r['tokens_per_s']} | {r['latency_p50_s']} | {r['latency_p99_s']} | {r['ttft_p50_s']} | "
                     f"{r.get('mean_batch_rows') or '-'} |")
    lines += ["", "Aggregate tokens/s under load / one at a time: " + ", ".join(
        f"max_batch={k}: {v}x" for k, v in results["aggregate_vs_single"].items()) + "."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(v["failed"] for v in loads.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
