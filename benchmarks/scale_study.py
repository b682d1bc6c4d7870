"""Past 135M: tachy and llama.cpp on random-weight models of Llama-3.2-1B's and Qwen2.5-3B's shapes.

The embedded models are tiny, where per-op overhead rules; users run 1B-8B models, where weight bytes do. This
writes GGUF files of those shapes locally (random weights, no vocabulary: token ids are fed directly), in
Q8_0 and Q4_0, with the gguf package's writer, and measures on each, side by side with llama.cpp on the same
file: plain decoding tokens/s next to the machine's bandwidth floor (file bytes / measured bandwidth),
verification cost t(n)/t(1) for n = 1..32 (a forward over n new tokens after 256 of context), and prefill
tokens/s (256-token prompts). Random weights say nothing about acceptance (how many drafts a real model
accepts), so only costs are measured here: see docs/benchmarks.md for which ratios carry over.

    .venv-bench/bin/python benchmarks/scale_study.py --out docs/results/scale_study
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from vs_llamacpp import memory_bandwidth   # benchmarks/ is on the path when run as a script

SHAPES = {
    # name: (arch, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, rope_theta, qkv_bias)
    "llama-3.2-1b": ("llama", 2048, 16, 32, 8, 64, 8192, 128256, 500000.0, False),
    "qwen2.5-3b": ("qwen2", 2048, 36, 16, 2, 128, 11008, 151936, 1000000.0, True),
}
WIDTHS = [1, 2, 4, 8, 16, 32]


def write_gguf(path: Path, shape: str, qtype_name: str, seed: int = 0) -> None:
    """A GGUF of ``shape`` with random weights (normal, std 0.02; norms 1) quantized to ``qtype_name``."""
    import gguf

    arch, hidden, layers, heads, kv_heads, head_dim, inter, vocab, theta, bias = SHAPES[shape]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(int(qtype))
    w.add_tokenizer_model("none")            # no vocabulary: token ids in, token ids out

    def matrix(name: str, rows: int, cols: int) -> None:
        values = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    def vector(name: str, n: int, value: float | None = None) -> None:
        data = np.full(n, 1.0, np.float32) if value is None else rng.standard_normal(n).astype(np.float32) * value
        w.add_tensor(name, data)

    matrix("token_embd.weight", vocab, hidden)
    vector("output_norm.weight", hidden)
    for i in range(layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", hidden)
        vector(p + "ffn_norm.weight", hidden)
        matrix(p + "attn_q.weight", heads * head_dim, hidden)
        matrix(p + "attn_k.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_v.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_output.weight", hidden, heads * head_dim)
        matrix(p + "ffn_gate.weight", inter, hidden)
        matrix(p + "ffn_up.weight", inter, hidden)
        matrix(p + "ffn_down.weight", hidden, inter)
        if bias:
            for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                vector(p + f"attn_{x}.bias", n * head_dim, 0.02)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def tachy_engine(path: Path, shape: str):
    """A tachy Engine on the file's own blocks, built without a tokenizer (the file has none)."""
    from tachy.config import ModelConfig
    from tachy.engine import Engine
    from tachy.models import model_from_state_dict
    from tachy.models.cpu_forward import CPUForward
    from tachy.models.load import read_gguf_blocks

    arch, hidden, layers, heads, kv_heads, head_dim, inter, vocab, theta, bias = SHAPES[shape]
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter, max_seq_len=4096,
                      rope_theta=theta, norm_eps=1e-5, tie_embeddings=True, qkv_bias=bias)
    sd = read_gguf_blocks(path, cfg)
    model = model_from_state_dict(cfg, sd, quantized=True)
    model.cpu_forward = CPUForward.build(model)
    return Engine(model.eval(), tokenizer=None, name=path.stem, weights="gguf")


def measure_tachy(engine, prompt: list[int], new_tokens: int) -> dict:
    from tachy import GenerationConfig, GenerationStats
    from tachy import kernels

    model = engine.model
    config = GenerationConfig(max_new_tokens=new_tokens, drafter=None, ignore_eos=True)
    list(engine.generate_tokens(prompt, GenerationConfig(max_new_tokens=4, drafter=None, ignore_eos=True)))
    stats = GenerationStats()
    list(engine.generate_tokens(prompt, config, stats))
    cache = model.new_cache(capacity=len(prompt) + 64, fixed=True)
    costs = {}
    with torch.inference_mode(), kernels.threads_to_kernels():
        model(torch.tensor([prompt]), torch.arange(len(prompt)), cache, last_only=True)
        for n in WIDTHS:
            tokens = torch.tensor([prompt[:n]])
            positions = torch.arange(len(prompt), len(prompt) + n)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                model(tokens, positions, cache)
                times.append(time.perf_counter() - start)
                cache.rollback(n)
            costs[n] = min(times)
    return {"decode_tokens_per_s": stats.tokens_per_s, "prefill_tokens_per_s": len(prompt) / stats.prefill_s,
            "verify_s": costs}


def measure_llama(path: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 64, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    llm.eval(prompt[:8])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    out, first = [], None
    llm.reset()
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == 1:
            first = time.perf_counter()
        if len(out) == new_tokens:
            break
    decode = (new_tokens - 1) / (time.perf_counter() - first)
    llm.reset()
    llm.eval(prompt)
    costs = {}
    for n in WIDTHS:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            llm.eval(prompt[:n])
            times.append(time.perf_counter() - start)
            llm._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
            llm.n_tokens = len(prompt)
        costs[n] = min(times)
    del llm
    return {"decode_tokens_per_s": decode, "prefill_tokens_per_s": len(prompt) / prefill, "verify_s": costs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="/tmp/tachy-scale", help="where the generated GGUF files are kept")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--formats", default="Q8_0,Q4_0")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results/scale_study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    bw = memory_bandwidth(args.threads, mib=256)
    rows = []
    for shape in args.shapes.split(","):
        vocab = SHAPES[shape][7]
        prompt = [int(t) for t in np.random.default_rng(1).integers(0, vocab, args.prompt_tokens)]
        for fmt in args.formats.split(","):
            path = folder / f"{shape}-{fmt}.gguf"
            if not path.is_file():
                print(f"writing {path} ...", flush=True)
                write_gguf(path, shape, fmt)
            size = path.stat().st_size
            engine = tachy_engine(path, shape)
            ours = measure_tachy(engine, prompt, args.new_tokens)
            del engine
            theirs = measure_llama(path, prompt, args.new_tokens, args.threads)
            floor = size / (bw * 1e9)
            row = {"shape": shape, "format": fmt, "file_bytes": size, "bandwidth_gbs": bw, "floor_s": floor,
                   "tachy": ours, "llama.cpp": theirs}
            rows.append(row)
            print(f"{shape} {fmt}: tachy {ours['decode_tokens_per_s']:.2f} tok/s "
                  f"({1 / ours['decode_tokens_per_s'] / floor:.2f}x floor), llama.cpp "
                  f"{theirs['decode_tokens_per_s']:.2f} tok/s; prefill {ours['prefill_tokens_per_s']:.0f} vs "
                  f"{theirs['prefill_tokens_per_s']:.0f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(report(rows, args))
    print(report(rows, args))


def report(rows: list[dict], args) -> str:
    lines = [f"{args.threads} threads, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens; memory "
             f"bandwidth measured in the same run: {rows[0]['bandwidth_gbs']:.1f} GB/s.", "",
             "| model | format | file GB | floor ms/token | engine | decode tokens/s | ms/token | vs floor "
             "| prefill tokens/s | " + " | ".join(f"t({n})/t(1)" for n in WIDTHS) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(WIDTHS)]
    for r in rows:
        for engine in ("tachy", "llama.cpp"):
            m = r[engine]
            ms = 1000 / m["decode_tokens_per_s"]
            t1 = m["verify_s"][1] if 1 in m["verify_s"] else m["verify_s"]["1"]
            ratios = [(m["verify_s"].get(n) or m["verify_s"].get(str(n))) / t1 for n in WIDTHS]
            lines.append(f"| {r['shape']} | {r['format']} | {r['file_bytes'] / 1e9:.2f} | {r['floor_s'] * 1e3:.1f} | "
                         f"{engine} | {m['decode_tokens_per_s']:.2f} | {ms:.1f} | {ms / 1e3 / r['floor_s']:.2f}x | "
                         f"{m['prefill_tokens_per_s']:.0f} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
