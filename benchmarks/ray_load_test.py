"""Bounded load test of `tachy serve --ray` beside the single-process `tachy serve`, on loopback, then stop.

The single-process server runs once per ``--direct-threads`` (torch threads of its one engine); the Ray
deployment runs ``--replicas`` replicas of ``--replica-threads`` threads each, on a Ray cluster this script
starts on loopback (and takes down). Each gets ``--requests`` requests at ``--concurrency`` (the mix of
benchmarks/load_test.py: chat and completion, streamed or not, greedy, vicuna prompts), one server at a time
while the others idle. A request fails unless it returns 200 with a complete body (streams: usage and
``[DONE]``). Reported: failed requests, aggregate completion tokens/s, p50/p99 latency and time to first
token. Then the overhead Ray adds per request: ``--overhead-requests`` sequential ``max_tokens=1`` chat
requests, alternating between the Ray deployment and the single process whose engine is a replica's twin
(``--replica-threads`` threads), p50/p99 latency of each and the difference of the medians.

    python benchmarks/ray_load_test.py [--requests 200] [--concurrency 16] [--max-tokens 32] [--replicas 2]

writes docs/results/ray_load/results.json and results.md. Needs the ray extra (requirements/ray.txt).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

import httpx

from load_test import (ROOT, one_request, pct, prompts, run_load, start_server, stop_servers, wait_ready,
                       write_results)   # benchmarks/ on path

OUT = ROOT / "docs" / "results" / "ray_load"


async def overhead(bases: dict[str, str], model: str, n: int) -> dict:
    """Latency of ``n`` sequential max_tokens=1 chat requests per server, alternating servers."""
    lat: dict[str, list[float]] = {name: [] for name in bases}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        for i in range(n + 2):
            for name, base in bases.items():
                r = await one_request(client, base, model, i, "Hi", 1, chat=True, stream=False)
                if not r["ok"]:
                    raise RuntimeError(f"{name}: a max_tokens=1 request failed: {r}")
                if i >= 2:   # two warm-up rounds (connections, first-request paths)
                    lat[name].append(r["latency_s"])
    out = {name: {"p50_ms": round(1000 * pct(sorted(v), 50), 1), "p99_ms": round(1000 * pct(sorted(v), 99), 1)}
           for name, v in lat.items()}
    names = list(bases)
    out["ray_minus_direct_p50_ms"] = round(out[names[1]]["p50_ms"] - out[names[0]]["p50_ms"], 1)
    return out


def start_ray(model: str, replicas: int, threads: int) -> str:
    """A loopback Ray cluster with room for the replicas, and the deployment on it; returns its URL."""
    import ray

    from tachy.server.background import free_port
    from tachy.server.ray_serve import EngineSpec, RayServeConfig, replica_room, start

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=replicas * threads, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    options = {"max_queue": 256, "max_batch": 8}   # as the single-process server (load_test.start_server)
    config = RayServeConfig(replicas=replicas, replica_cpus=threads, port=free_port(),
                            max_ongoing_requests=replica_room(options))
    return start(EngineSpec(model=model), options, config)


def report(results: dict) -> str:
    lines = [f"Load test through Ray Serve beside the single-process server ({results['model']}), loopback, "
             f"greedy, {results['max_tokens']} new tokens max, {results['requests']} requests at concurrency "
             f"{results['concurrency']}, chat/completion x stream/non-stream evenly mixed, vicuna prompts, "
             f"max batch 8 per engine. Ray: {results['replicas']} replicas x {results['replica_threads']} "
             f"thread(s), one engine each. {results['machine']}.", "",
             f"Command: `{results['command']}`", "",
             "| server | failed | wall s | aggregate tokens/s | p50 / p99 latency s | p50 / p99 time to first "
             "token s |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["load"].items():
        lines.append(f"| {name} | {r['failed']} of {r['requests']} | {r['wall_s']} | {r['tokens_per_s']} | "
                     f"{r['latency_p50_s']} / {r['latency_p99_s']} | {r['ttft_p50_s']} / {r['ttft_p99_s']} |")
    o = results["overhead"]
    lines += ["", f"Per-request overhead: {results['overhead_requests']} sequential `max_tokens=1` chat requests "
              "per server, alternating (the same engine behind each):", "", "| server | p50 ms | p99 ms |",
              "|---|---:|---:|"]
    lines += [f"| {name} | {v['p50_ms']} | {v['p99_ms']} |" for name, v in o.items() if isinstance(v, dict)]
    lines += ["", f"Ray adds {o['ray_minus_direct_p50_ms']} ms per request at the median. Starting Ray and "
              f"deploying the replicas took {results['ray_start_s']} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-threads", type=int, default=1)
    ap.add_argument("--direct-threads", type=int, nargs="+", default=[1],
                    help="one single-process run per value (its engine's threads)")
    ap.add_argument("--overhead-requests", type=int, default=40)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.replica_threads not in args.direct_threads:
        ap.error("--direct-threads must include --replica-threads (the overhead compares the same engine)")
    import ray
    from ray import serve

    from tachy.server.background import free_port

    texts = prompts(0, args.requests)
    results = {"model": args.model, "max_tokens": args.max_tokens, "requests": args.requests,
               "concurrency": args.concurrency, "replicas": args.replicas, "replica_threads": args.replica_threads,
               "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), shared; 1-minute load average "
                          f"{os.getloadavg()[0]:.2f} before the run",
               "command": " ".join(["python benchmarks/ray_load_test.py", *sys.argv[1:]]), "load": {}}
    procs, twin = [], None
    try:
        for threads in args.direct_threads:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            procs.append(start_server(args.model, port, threads, ["--max-batch", "8"]))
            model = asyncio.run(wait_ready(base, procs[-1]))
            name = f"single process, {threads} thread{'s' if threads > 1 else ''}"
            results["load"][name] = asyncio.run(run_load(base, model, texts, args.concurrency, args.max_tokens))
            print(f"{name}: {results['load'][name]}", file=sys.stderr, flush=True)
            if threads == args.replica_threads:
                twin = (name, base)
            else:   # only the replica's twin stays up (for the overhead run)
                procs.pop().terminate()
        started = time.perf_counter()
        ray_base = start_ray(args.model, args.replicas, args.replica_threads)
        results["ray_start_s"] = round(time.perf_counter() - started, 1)
        try:
            name = f"Ray Serve, {args.replicas} replicas x {args.replica_threads} thread(s)"
            results["load"][name] = asyncio.run(run_load(ray_base, model, texts, args.concurrency, args.max_tokens))
            print(f"{name}: {results['load'][name]}", file=sys.stderr, flush=True)
            results["overhead_requests"] = args.overhead_requests
            results["overhead"] = asyncio.run(overhead({twin[0]: twin[1], "Ray Serve": ray_base}, model,
                                                       args.overhead_requests))
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        stop_servers(procs)
    write_results(args.out, results, report(results))
    print(report(results))
    if any(r["failed"] for r in results["load"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
