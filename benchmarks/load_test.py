"""Bounded load test of `tachy serve` on loopback: three schedulers, four concurrencies, then stop.

For each scheduler (a `tachy serve` subprocess on a free loopback port each, all started at once, idle while
another is measured; each concurrency level runs the three in turn, who goes first rotating by level):

* ``one at a time`` (``--max-batch 1``): every request alone on the engine's speculative path;
* ``plain batching`` (``--max-batch 8 --batching plain``): overlapping requests share a forward, one token per
  row per step, joining prompts prefilled whole (the scheduler before batched speculation);
* ``speculative batching`` (``--max-batch 8``, the default): every row drafts, one forward verifies all rows'
  drafts packed together, joining prompts are prefilled in chunks beside the running rows;

it sends ``--requests`` requests at each concurrency in ``--concurrency``: chat and completion, streamed or
not (evenly mixed), greedy, ``--max-tokens`` new tokens, prompts from vicuna_bench.jsonl with every
``--long-every``-th one a 1-2k-token passage of monte_cristo_pg1184.txt to summarize (``--prompt-set
code_edit``: grounded_dev.jsonl's code-editing requests instead of the questions). A request fails unless
it returns 200 with a complete body (streams: usage and ``[DONE]``). Reported: aggregate completion tokens/s,
p50/p99 latency, p50/p99 time to first token (of the streams: their first chunk with text; a non-streamed
answer's first token is not seen, its latency is the whole answer) and p99 inter-token latency (the gaps between a stream's chunks of text after its first).

Then the join test, per batching scheduler: 4 streams of up to 600 tokens run; 1.5 s in, a 2k-token prompt joins
(or, in the control run, nothing does); the running streams' p99 chunk gap while the joining prompt is read
(from its request to its first token) against the same window of the control run.

With ``--rounds N`` each level runs in N rounds, the schedulers taking turns in each; with 20 rounds or more
the report adds each scheduler's tokens/s over one at a time's on all rounds with a 95% bootstrap interval
(rounds resampled: each round is one paired observation, so many short rounds, e.g. ``--rounds 200`` at
concurrency 1, cancel the machine's drift). ``--schedulers ... "one at a time, second server"`` adds a second
server running one at a time's code: the spread between two servers of the same code in the same run;
``"speculative batching, no prefix cache"`` the default scheduler with ``--no-prefix-cache``, and
``"speculative batching, quick first tokens"`` with ``--whole-prompt-tokens 128 --min-prompt-chunk 32``;
``"speculative batching, prefill share 2"`` with ``--prefill-share 2``; ``"speculative batching, base"`` the
default scheduler on the code of ``--base-src`` (another checkout's src/, e.g. a git worktree of an older
commit: a before/after A/B in one run);
``"plain batching, no AMX"`` and ``"speculative batching, no AMX"`` those servers with ``TACHY_AMX=0`` (the
kernels without Intel's AMX tiles, where the CPU has them).

    python benchmarks/load_test.py [--requests 200] [--concurrency 1 4 8 16] [--max-tokens 64] [--rounds 1]

writes docs/results/server_load/results.json, results.md and load.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "results" / "server_load"
SCHEDULERS = {"one at a time": ["--max-batch", "1"],
              "plain batching": ["--max-batch", "8", "--batching", "plain"],
              "speculative batching": ["--max-batch", "8"],
              # a second server running one at a time's code: the spread between two servers of the same code
              "one at a time, second server": ["--max-batch", "1"],
              "speculative batching, no prefix cache": ["--max-batch", "8", "--no-prefix-cache"],
              # short prompts read whole, a floor under the chunks: quicker first tokens, slower streams
              "speculative batching, quick first tokens": ["--max-batch", "8", "--whole-prompt-tokens", "128",
                                                           "--min-prompt-chunk", "32"],
              # joining prompts read sooner beside the running rows (chunks up to 2x their forward), slower streams
              "speculative batching, prefill share 2": ["--max-batch", "8", "--prefill-share", "2"],
              # the kernels without Intel's AMX tiles (TACHY_AMX=0; the same where the CPU has none)
              "plain batching, no AMX": ["--max-batch", "8", "--batching", "plain"],
              "speculative batching, no AMX": ["--max-batch", "8"],
              # the default scheduler on another checkout's code (--base-src): a before/after A/B in one run
              "speculative batching, base": ["--max-batch", "8"]}
SCHEDULER_ENV = {"plain batching, no AMX": {"TACHY_AMX": "0"}, "speculative batching, no AMX": {"TACHY_AMX": "0"}}


def start_server(model: str, port: int, threads: int, flags: list[str],
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    # this checkout's package first (the caller's PYTHONPATH after it)
    paths = [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(paths), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "tachy.cli", "serve", "--model", model, "--port", str(port),
                             "--max-queue", "256", "--log-level", "warning", *flags], env=env)


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


PROMPT_SETS = {"chat": "vicuna questions", "code_edit": "code-editing requests (grounded_dev.jsonl)"}


def prompts(long_every: int, n: int, first: int = 0, prompt_set: str = "chat") -> list[str]:
    """Requests first .. first+n-1: a numbered vicuna question, or every ``long_every``-th a 1-2k-token passage
    to summarize. Each concurrency level gets its own requests (``first``): the server's prefix cache would
    otherwise serve a level's prompts from the level before, which plain batching, reading every prompt whole,
    does not use; numbering the questions keeps repeats of one question from hitting it too (all that is
    shared is the chat template's system prompt, as in real traffic).

    ``prompt_set="code_edit"`` takes grounded_dev.jsonl's code-editing requests instead of vicuna's questions
    (a function to return whole with type hints or a fix: the answer copies much of the prompt, the case where
    drafts from the context are accepted most)."""
    if prompt_set == "code_edit":
        short = [row["turns"][0] for row in map(json.loads, (DATA / "grounded_dev.jsonl").read_text().splitlines())
                 if row.get("category") == "code_edit"]
    else:
        short = [json.loads(line)["turns"][0] for line in (DATA / "vicuna_bench.jsonl").read_text().splitlines()
                 if line.strip()]
    book = (DATA / "monte_cristo_pg1184.txt").read_text()
    out = []
    for i in range(first, first + n):
        if long_every and i % long_every == long_every // 2:
            size = 6000 + (i * 997) % 3000           # ~1.3k-2k tokens
            start = 50_000 + (i * 7919) % 500_000
            out.append(book[start:start + size] + "\n\nSummarize the passage above in one sentence.")
        else:
            out.append(f"{'Question' if prompt_set == 'chat' else 'Request'} {i}: {short[i % len(short)]}")
    return out


def is_chat(i: int) -> bool:
    """Whether request ``i`` of a level goes to /v1/chat/completions (else /v1/completions): half of them."""
    return i % 4 < 2


def prompt_ids(engine, texts: list[str]) -> list[list[int]]:
    """The token ids the server reads for a level's requests (the chat template on chat requests): what
    in-process scripts feed a BatchDecoder to stand for the load test."""
    return [engine.chat_prompt([{"role": "user", "content": t}]) if is_chat(i) else engine.tokenizer.encode(t)
            for i, t in enumerate(texts)]


async def one_request(client: httpx.AsyncClient, base: str, model: str, i: int, prompt: str, max_tokens: int,
                      chat: bool | None = None, stream: bool | None = None, ignore_eos: bool = False) -> dict:
    chat = is_chat(i) if chat is None else chat
    stream = i % 2 == 1 if stream is None else stream
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    url = f"{base}/v1/{'chat/completions' if chat else 'completions'}"
    start = time.perf_counter()
    out = {"chat": chat, "stream": stream, "ok": False, "tokens": 0, "ttft_s": None, "chunks": [], "start": start}
    try:
        if not stream:
            r = await client.post(url, json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                usage = r.json()["usage"]
                out["tokens"], out["prompt_tokens"] = usage["completion_tokens"], usage["prompt_tokens"]
                out["ok"] = True
        else:
            async with client.stream("POST", url, json=body) as r:
                out["status"] = r.status_code
                done, usage = False, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    choice = (chunk.get("choices") or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        out["chunks"].append(now)
                        if out["ttft_s"] is None:
                            out["ttft_s"] = now - start
                out["ok"] = r.status_code == 200 and done and usage is not None
                out["tokens"] = usage["completion_tokens"] if usage else 0
                out["prompt_tokens"] = usage["prompt_tokens"] if usage else 0
    except Exception as e:  # noqa: BLE001 - a failure to count, not to crash on
        out["error"] = repr(e)
    out["latency_s"] = time.perf_counter() - start
    return out


async def send_all(base: str, model: str, texts: list[str], concurrency: int, max_tokens: int,
                   first: int = 0) -> tuple[list, float]:
    """Every request of ``texts``, ``concurrency`` at a time: their results and the wall time. ``first``: the
    index of ``texts[0]`` in its level (a request's index picks chat or completion, streamed or not)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def task(i: int) -> dict:
            async with sem:
                return await one_request(client, base, model, first + i, texts[i], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(len(texts))))
        return results, time.perf_counter() - start


async def run_load(base: str, model: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Every request of ``texts``, ``concurrency`` at a time, summarized."""
    results, wall = await send_all(base, model, texts, concurrency, max_tokens)
    return summarize(results, wall, concurrency, [])


def summarize(results: list[dict], wall: float, concurrency: int, rounds: list[tuple[float, int]]) -> dict:
    """One scheduler's numbers at one level (``rounds``: each round's wall seconds and completion tokens, where
    the level ran in rounds)."""
    lat = sorted(r["latency_s"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    gaps = sorted(b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:]))
    tokens = sum(r["tokens"] for r in results if r["ok"])
    return {"requests": len(results), "concurrency": concurrency, "failed": sum(not r["ok"] for r in results),
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "rounds_tokens_per_s": [round(t / w, 2) for w, t in rounds],
            "rounds_wall_s": [round(w, 4) for w, _ in rounds], "rounds_tokens": [t for _, t in rounds],
            "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in results if r["ok"]),
            "latency_p50_s": round(pct(lat, 50), 3), "latency_p99_s": round(pct(lat, 99), 3),
            "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
            "itl_p50_ms": round(1000 * pct(gaps, 50), 1) if gaps else None,
            "itl_p99_ms": round(1000 * pct(gaps, 99), 1) if gaps else None,
            "errors": [r.get("error") or r.get("status") for r in results if not r["ok"]][:10]}


async def join_test(base: str, model: str, long_prompt: str, join: bool) -> dict:
    """4 running streams; with ``join``, a 2k-token prompt arrives 1.5 s in. The streams' chunk gaps in the
    window from that request to its first token (in the control run, the 3 s after the same moment). The
    streams go on to their 600 tokens (``ignore_eos``): on a fast day they answered within the window and
    left the control a handful of gaps."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        runners = [asyncio.create_task(one_request(client, base, model, i, q, 600, chat=True, stream=True,
                                                   ignore_eos=True))
                   for i, q in enumerate(["Count from 1 to 100 in words.", "Tell a long story about a dragon.",
                                          "Explain how a CPU works, in detail.", "List fifty animals."])]
        await asyncio.sleep(1.5)
        t0 = time.perf_counter()
        if join:
            joiner = await one_request(client, base, model, 99, long_prompt, 8, chat=True, stream=True)
            t1 = t0 + (joiner["ttft_s"] or 0.0)
        else:
            await asyncio.sleep(3.0)
            joiner, t1 = None, time.perf_counter()
        results = await asyncio.gather(*runners)
    # every gap that overlaps the window, so a stream stalled through all of it counts with its whole stall
    gaps = sorted(b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:]) if b >= t0 and a <= t1)
    return {"window_s": round(t1 - t0, 2), "gaps": len(gaps),
            "itl_p50_ms": round(1000 * pct(gaps, 50), 1) if gaps else None,
            "itl_p99_ms": round(1000 * pct(gaps, 99), 1) if gaps else None,
            "joiner_ttft_s": round(joiner["ttft_s"], 2) if joiner and joiner["ttft_s"] else None,
            "failed": sum(not r["ok"] for r in results) + (0 if joiner is None or joiner["ok"] else 1)}


def stop_servers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every server, then wait for each (killed after 60 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def write_results(out: Path, results: dict, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(text)


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def report(results: dict) -> str:
    lines = [f"Load test of `tachy serve` ({results['model']}, {results['threads']} threads), loopback, greedy, "
             f"{results['max_tokens']} new tokens max, {results['requests']} requests per run, chat/completion x "
             f"stream/non-stream evenly mixed, {PROMPT_SETS[results.get('prompt_set', 'chat')]}, "
             + (f"every {results['long_every']}th prompt a 1.3-2k-token passage; " if results['long_every']
                else "no long passages; ") +
             "each level its own prompts; one server per scheduler, all up at once, running in turn at each "
             "level (who goes first rotating).", "", f"Command: `{results['command']}`", "",
             "| scheduler | concurrency | failed | aggregate tokens/s | p50 / p99 latency s | p50 / p99 time to "
             "first token s (streams) | p50 / p99 inter-token ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results["load"].items():
        for r in runs:
            lines.append(f"| {name} | {r['concurrency']} | {r['failed']} | {r['tokens_per_s']} | "
                         f"{r['latency_p50_s']} / {r['latency_p99_s']} | {r['ttft_p50_s']} / {r['ttft_p99_s']} | "
                         f"{r['itl_p50_ms']} / {r['itl_p99_ms']} |")
    base = {r["concurrency"]: r["tokens_per_s"] for r in results["load"].get("plain batching", [])}
    spec = {r["concurrency"]: r["tokens_per_s"] for r in results["load"].get("speculative batching", [])}
    lone = {r["concurrency"]: r["tokens_per_s"] for r in results["load"].get("one at a time", [])}
    if base and spec:
        lines += ["", "Speculative batching / plain batching, aggregate tokens/s: " + ", ".join(
            f"concurrency {c}: {spec[c] / base[c]:.2f}x" for c in spec if c in base) + "."]
    if lone and spec:
        lines += ["Speculative batching / one at a time (the lone speculative path): " + ", ".join(
            f"concurrency {c}: {spec[c] / lone[c]:.2f}x" for c in spec if c in lone) + "."]
    for name, runs in results["load"].items():   # a server beside its twin without AMX
        twin = {r["concurrency"]: r["tokens_per_s"] for r in results["load"].get(f"{name}, no AMX", [])}
        if twin:
            lines += [f"{name.capitalize()} with AMX / without: " + ", ".join(
                f"concurrency {r['concurrency']}: {r['tokens_per_s'] / twin[r['concurrency']]:.2f}x"
                for r in runs if r["concurrency"] in twin) + "."]
    if results.get("rounds", 1) > 1 and "one at a time" in results["load"]:
        lines += ["", f"Per round ({results['rounds']} rounds a level, the schedulers in turn in each), the ratio of "
                  "tokens/s to one at a time's in the same round, median [min - max]:"]
        for name, runs in results["load"].items():
            if name != "one at a time":
                lines.append(f"- {name}: " + ", ".join(
                    f"concurrency {r['concurrency']}: " + round_ratios(r, l)
                    for r, l in zip(runs, results["load"]["one at a time"])) + ".")
    if not results["join"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Join test: 4 running streams (up to 600 tokens each); a 2k-token prompt joins 1.5 s in. The "
              "streams' chunk gaps while it is read, against the same window without it:", "",
              "| scheduler | p99 gap without, ms | p99 gap while the prompt joins, ms | ratio | joiner's time to "
              "first token s | failed |", "|---|---:|---:|---:|---:|---:|"]
    for name, j in results["join"].items():
        with_, without = j["with"]["itl_p99_ms"], j["without"]["itl_p99_ms"]
        # no gap at all in the window: the streams stalled for all of it (a gap as long as the window)
        with_ = with_ if with_ is not None else f"stalled {1000 * j['with']['window_s']:.0f}"
        ratio = f"{with_ / without:.2f}x" if isinstance(with_, float) and without else "-"
        lines.append(f"| {name} | {without} | {with_} | {ratio} | "
                     f"{j['with']['joiner_ttft_s']} | {j['with']['failed'] + j['without']['failed']} |")
    return "\n".join(lines) + "\n"


def round_ratios(run: dict, base: dict) -> str:
    ratios = sorted(a / b for a, b in zip(run["rounds_tokens_per_s"], base["rounds_tokens_per_s"]) if b)
    text = f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f} - {ratios[-1]:.2f}]"
    if len(ratios) >= 20:
        ratio, low, high = paired_ratio(run, base)
        text += f", all rounds {ratio:.3f}x (95% bootstrap interval {low:.3f} - {high:.3f})"
    return text


def paired_ratio(run: dict, base: dict, samples: int = 2000) -> tuple[float, float, float]:
    """Aggregate tokens/s of ``run`` over ``base``'s in the same rounds, and a 95% interval from resampling the
    rounds (each round ran both back to back, so a round is one paired observation: many short rounds make a
    tight interval where the machine drifts over minutes)."""
    n = len(run["rounds_wall_s"])

    def ratio(rounds) -> float:
        mine = sum(run["rounds_tokens"][i] for i in rounds) / sum(run["rounds_wall_s"][i] for i in rounds)
        theirs = sum(base["rounds_tokens"][i] for i in rounds) / sum(base["rounds_wall_s"][i] for i in rounds)
        return mine / theirs

    rng = random.Random(0)
    boot = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(samples))
    return ratio(range(n)), boot[int(0.025 * samples)], boot[int(0.975 * samples) - 1]


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, runs in results["load"].items():
        c = [r["concurrency"] for r in runs]
        axes[0].plot(c, [r["tokens_per_s"] for r in runs], marker="o", label=name)
        axes[1].plot(c, [r["ttft_p99_s"] for r in runs], marker="o", label=name)
        axes[2].plot(c, [r["itl_p99_ms"] for r in runs], marker="o", label=name)
    axes[2].set_yscale("log")   # tens of milliseconds next to seconds-long stalls
    for ax, title in zip(axes, ["aggregate tokens/s", "p99 time to first token (s)", "p99 inter-token (ms)"]):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--long-every", type=int, default=10, help="every Nth prompt is 1.3-2k tokens (0: none)")
    ap.add_argument("--prompt-set", choices=list(PROMPT_SETS), default="chat",
                    help="the short prompts: vicuna questions (chat) or code-editing requests (code_edit)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the server")
    ap.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS)[:3], choices=list(SCHEDULERS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="split each level's requests into this many rounds, the schedulers taking turns in each "
                         "(finer interleaving: the ratios per round show the spread of the machine)")
    ap.add_argument("--join", action=argparse.BooleanOptionalAction, default=True, help="run the join test")
    ap.add_argument("--base-src", type=Path, default=None,
                    help='the src/ folder of another checkout (e.g. a git worktree of an older commit) that the '
                         '"speculative batching, base" server runs')
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if ("speculative batching, base" in args.schedulers) != (args.base_src is not None):
        ap.error('--base-src and the "speculative batching, base" scheduler go together')
    if args.base_src is not None:
        SCHEDULER_ENV["speculative batching, base"] = {"PYTHONPATH": str(args.base_src.resolve())}
    from tachy.server.background import free_port

    long_prompt = prompts(2, 2)[1][:9000]   # request 1 of the long-every-2 set: no level's prompt
    results = {"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens,
               "requests": args.requests, "long_every": args.long_every, "rounds": args.rounds,
               "prompt_set": args.prompt_set,
               "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:]), "load": {}, "join": {}}
    servers = {}   # every scheduler's server up at once, so that each level runs them side by side
    try:
        for name in args.schedulers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proc = start_server(args.model, port, args.threads, SCHEDULERS[name], SCHEDULER_ENV.get(name))
            servers[name] = (base, proc, None)   # terminated in finally even if it never comes up
            servers[name] = (base, proc, asyncio.run(wait_ready(base, proc)))
        results["load"] = {name: [] for name in args.schedulers}
        for level, c in enumerate(args.concurrency):
            texts = prompts(args.long_every, args.requests, level * args.requests, args.prompt_set)
            size = -(-len(texts) // args.rounds)
            sent = {name: [] for name in args.schedulers}    # every request's result
            walls = {name: [] for name in args.schedulers}   # each round's (wall s, completion tokens)
            for k, start in enumerate(range(0, len(texts), size)):
                shift = (level + k) % len(args.schedulers)   # who goes first rotates: machine drift spreads evenly
                for name in args.schedulers[shift:] + args.schedulers[:shift]:
                    base, _, model = servers[name]
                    res, wall = asyncio.run(send_all(base, model, texts[start:start + size], c, args.max_tokens,
                                                    first=start))
                    sent[name] += res
                    walls[name].append((wall, sum(r["tokens"] for r in res if r["ok"])))
            for name in args.schedulers:
                r = summarize(sent[name], sum(w for w, _ in walls[name]), c, walls[name])
                print(f"{name}, concurrency {c}: {r}", file=sys.stderr, flush=True)
                results["load"][name].append(r)
        for name in args.schedulers if args.join else []:
            if "batching" in name:   # the join test is about batches
                base, _, model = servers[name]
                results["join"][name] = {"without": asyncio.run(join_test(base, model, long_prompt, False)),
                                         "with": asyncio.run(join_test(base, model, long_prompt, True))}
                print(f"{name}, join: {results['join'][name]}", file=sys.stderr, flush=True)
    finally:
        stop_servers([proc for _, proc, _ in servers.values()])
    write_results(args.out, results, report(results))
    plot(results, args.out / "load.png")
    print(report(results))
    if any(r["failed"] for runs in results["load"].values() for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
