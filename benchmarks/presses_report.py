"""Assemble docs/results/presses/*/results.json (from benchmarks/presses_eval.sh) into one summary table and
two plots (needle accuracy and perplexity change versus the fraction of the KV cache held).

    python benchmarks/presses_report.py [--results docs/results/presses]
writes <results>/summary.md, <results>/needle_vs_kv.png and <results>/ppl_vs_kv.png.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(root: Path, drop: list[str]) -> dict:
    """{(model, task): {context: {"full": run, (press, ratio): run}}}, merging the runs of several folders
    (a later folder, e.g. <run>-extra, overrides); ``drop`` lists "model:task:context:press" runs, or whole
    folders by name, to leave out."""
    data: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(root.glob("*/results.json")):
        if path.parent.name in drop:
            continue
        r = json.loads(path.read_text())
        bases = {base["context"]: base for base in r["baseline"]["per_context"]}
        for context, base in bases.items():
            data[(r["model"], r["task"])][context].setdefault("full", base)
        for run in r["runs"]:   # each run keeps its own folder's full cache, its reference for ppl Δ
            if f"{r['model']}:{r['task']}:{run['context']}:{run['press']}" not in drop:
                data[(r["model"], r["task"])][run["context"]][(run["press"], run["ratio"])] = \
                    dict(run, reference=bases[run["context"]])
    return data


def table(data: dict, model: str) -> list[str]:
    needle, ppl = data.get((model, "needle"), {}), data.get((model, "ppl"), {})
    contexts = sorted(set(needle) | set(ppl))
    keys = sorted({k for c in contexts for d in (needle.get(c, {}), ppl.get(c, {})) for k in d if k != "full"},
                  key=lambda k: (k[0], k[1]))
    head = "| press | ratio | " + " | ".join(f"needle @{c} | ppl Δ @{c} | KV held @{c}" for c in contexts) + " |"
    lines = [f"### {model}", "", head, "|---|---|" + "---|---|---|" * len(contexts)]

    def cells(key) -> str:
        out = []
        for c in contexts:
            n, p = needle.get(c, {}).get(key), ppl.get(c, {}).get(key)
            nf, pf = needle.get(c, {}).get("full"), ppl.get(c, {}).get("full")
            out.append(f"{100 * n['accuracy']:.0f}%" if n else "-")
            out.append(f"{100 * (p['ppl'] / p['reference']['ppl'] - 1):+.1f}%" if p and key != "full" else
                       (f"{pf['ppl']:.2f}" if pf and key == "full" else "-"))
            ref, full = (n or p), (nf or pf)
            out.append(f"{ref['kv_bytes'] / full['kv_bytes']:.3f} ({full['kv_bytes'] / ref['kv_bytes']:.1f}x)"
                       if ref and full else "-")
        return " | ".join(out)

    lines.append(f"| full | 0 | {cells('full')} |")
    for key in keys:
        lines.append(f"| {key[0]} | {key[1]:g} | {cells(key)} |")
    return lines + [""]


def plot(data: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, c) for (m, t), per in sorted(data.items()) if t == task for c in sorted(per)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.2), squeeze=False)
    names = sorted({k[0] for (m, t), per in data.items() if t == task for runs in per.values() for k in runs
                    if k != "full"})
    style = {n: (plt.cm.tab20(i % 20), "os^vD<>ph*"[i % 10]) for i, n in enumerate(names)}
    handles = {}
    for ax, (model, context) in zip(axes[0], panels):
        runs = data[(model, task)][context]
        full = runs["full"]
        value = (lambda r: 100 * r["accuracy"]) if task == "needle" else \
            (lambda r: 100 * (r["ppl"] / r.get("reference", full)["ppl"] - 1))
        by_press = defaultdict(list)
        for key, r in runs.items():
            if key != "full":
                by_press[key[0]].append((r["kv_bytes"] / full["kv_bytes"], value(r)))
        for press, pts in sorted(by_press.items()):
            pts.sort()
            color, marker = style[press]
            handles[press], = ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, color=color,
                                      label=press, ls="--" if any(q in press for q in ("kivi", "gear")) else "-")
        handles["full cache"] = ax.axhline(value(full), color="black", lw=0.8, ls=":", label="full cache")
        ax.set_xlabel("fraction of the full KV bytes held")
        ax.set_ylabel("needle accuracy (%)" if task == "needle" else "perplexity change (%)")
        if task == "ppl":
            ax.set_yscale("symlog", linthresh=5)
        ax.set_title(f"{model}, {context} tokens")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=8, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="docs/results/presses")
    ap.add_argument("--drop", action="append", default=[], help="model:task:context:press, or a results folder, to leave out")
    args = ap.parse_args()
    root = Path(args.results)
    data = load(root, args.drop)
    models = sorted({m for m, _ in data})
    lines = ["Needle accuracy (5 depths), perplexity change vs the full cache (2 windows x 256 tokens of "
             "tinyshakespeare), and the KV bytes held as a fraction of the full cache's (reduction factor).", ""]
    for model in models:
        lines += table(data, model)
    if args.drop:
        lines += ["Left out: " + ", ".join(args.drop), ""]
    (root / "summary.md").write_text("\n".join(lines))
    plot(data, "needle", root / "needle_vs_kv.png")
    plot(data, "ppl", root / "ppl_vs_kv.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
