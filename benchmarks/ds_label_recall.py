"""How well Double Sparsity's labels choose keys: the share of each query's true attention held by the keys a
label score picks, for bf16 labels (the key's channels as stored) against int8 labels (decoder.c's rounding,
``tachy.sparse.double_sparsity.label_scores``), at several channel counts.

    PYTHONPATH=src python benchmarks/ds_label_recall.py [--model smollm2-135m] [--tokens 4096] [--queries 32]
        [--budget 512] [--channels 16,32]

The PyTorch forward reads the first ``--tokens`` tokens of tinyshakespeare; for the last ``--queries`` queries
of every sparse layer (all but the first two) and kv head, the sinks (16), the last 64 keys and the top
``--budget`` candidates by label score are kept, and the kept keys' share of the query's softmax attention
(averaged over the group's heads) is averaged over queries, heads and layers. Prints one line per setting.
"""
from __future__ import annotations

import argparse

import torch

import tachy
from tachy.eval.sweep import read_text
from tachy.sparse.calibration import load_or_calibrate
from tachy.sparse.double_sparsity import label_scores, top_channels

SINKS, WINDOW = 16, 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--channels", default="16,32")
    args = ap.parse_args()
    engine = tachy.load(args.model)
    model, cfg = engine.model, engine.config
    importance = load_or_calibrate(model, engine.tokenizer)
    text = read_text(None, "--haystack")
    ids = engine.tokenizer.encode(text[: args.tokens * 12], add_special_tokens=False)[: args.tokens]
    L, Hkv, G = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    queries: dict[int, torch.Tensor] = {}
    cache = model.new_cache(capacity=len(ids))
    cache.observer = lambda layer, q: queries.__setitem__(layer, q[0, :, -args.queries:].float().clone())
    with torch.inference_mode():
        for start in range(0, len(ids), 512):
            chunk = ids[start:start + 512]
            model(torch.tensor([chunk]), torch.arange(start, start + len(chunk)), cache)
    S, NQ = len(ids), args.queries
    keys = cache.k[:, 0, :, :S]                                     # bf16 [L, Hkv, S, D]
    end = S - NQ - WINDOW                                           # candidates: [SINKS, end) for every query
    for channels in (int(c) for c in args.channels.split(",")):
        for labels in ("bf16", "int8"):
            shares = []
            for layer in range(2, L):
                index = top_channels(importance[layer], channels)
                q = queries[layer].view(Hkv, G, NQ, -1)
                if labels == "int8":
                    score = label_scores(q, keys[layer], index)     # [Hkv, NQ, S]
                else:
                    qs = q.sum(1).gather(-1, index[:, None].expand(-1, NQ, -1))
                    score = qs @ keys[layer].float().gather(-1, index[:, None].expand(-1, S, -1)).transpose(1, 2)
                for g in range(Hkv):
                    k = keys[layer, g].float()
                    for j in range(NQ):
                        pos = S - NQ + j
                        keep = torch.zeros(pos + 1, dtype=torch.bool)
                        keep[:SINKS] = keep[end:] = True
                        keep[score[g, j, SINKS:end].topk(args.budget).indices + SINKS] = True
                        attention = torch.softmax(q[g, :, j] @ k[: pos + 1].T, -1)   # [G, pos + 1]
                        shares.append(attention[:, keep].sum(-1).mean().item())
            print(f"channels {channels:3d}, {labels} labels: attention kept {sum(shares) / len(shares):.4f}")


if __name__ == "__main__":
    main()
