"""results.json, results.md and the PNG (needle heatmap / ppl curve) of a tachy eval run."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results, command))
    if results["task"] == "needle":
        heatmap(results, out / "needle.png")
    else:
        curve(results, out / "ppl.png")


def _rows(results: dict) -> list[tuple[str, float, str, dict]]:
    """(press, ratio, attention, {context: run}) with the baseline first."""
    metric = "accuracy" if results["task"] == "needle" else "ppl"
    rows = [("full", 0.0, "dense", {r["context"]: r for r in results["baseline"]["per_context"]})]
    seen: dict[tuple[str, float, str], dict] = {}
    for r in results["runs"]:
        seen.setdefault((r["press"], r["ratio"], r.get("attention", "dense")), {})[r["context"]] = r
    rows += [(p, q, a, runs) for (p, q, a), runs in seen.items()]
    assert all(metric in r for *_, runs in rows for r in runs.values())
    return rows


def _name(press: str, ratio: float, attention: str) -> str:
    """A row's name in plots: the press at its ratio and/or the sparse attention."""
    name = press if press == "full" else f"{press} @{ratio:g}"
    if attention == "dense":
        return name
    return attention if press == "full" else f"{name} + {attention}"


def markdown(results: dict, command: str) -> str:
    task, contexts = results["task"], results["contexts"]
    metric = "accuracy" if task == "needle" else "ppl"
    rows = _rows(results)
    lines = [f"Model `{results['model']}`, {task}. Command: `{command}`", "",
             "| press | ratio | attention | " + " | ".join(f"{metric} @{c} | KV MiB @{c}" for c in contexts) + " |",
             "|---|---|---|" + "---|---|" * len(contexts)]
    for press, ratio, attention, runs in rows:
        cells = []
        for c in contexts:
            r, base = runs[c], rows[0][3][c]
            if task == "needle":
                value = f"{100 * r['accuracy']:.0f}%"
            else:
                value = f"{r['ppl']:.3f} ({100 * (r['ppl'] / base['ppl'] - 1):+.1f}%)"
            cells.append(f"{value} | {r['kv_bytes'] / 2**20:.1f} ({base['kv_bytes'] / r['kv_bytes']:.1f}x)")
        lines.append(f"| {press} | {ratio:g} | {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, contexts, depths = _rows(results), results["contexts"], [f"{d:g}" for d in results["depths"]]
    fig, axes = plt.subplots(1, len(contexts), figsize=(1 + 0.6 * len(depths) * len(contexts) + 2,
                                                         1.5 + 0.3 * len(rows)), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        grid = [[runs[c]["depths"][d] for d in depths] for *_, runs in rows]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{100 * float(d):.0f}%" for d in depths])
        ax.set_yticks(range(len(rows)), [_name(p, q, a) for p, q, a, _ in rows])
        ax.set_xlabel("needle depth")
        ax.set_title(f"{results['model']}, {c} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, contexts = _rows(results), results["contexts"]
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        base = rows[0][3][c]["ppl"]
        presses = sorted({p for p, _, a, _ in rows[1:] if a == "dense"})
        for press in presses:
            pts = sorted((q, runs[c]["ppl"]) for p, q, a, runs in rows if p == press and a == "dense")
            ax.plot([0] + [q for q, _ in pts], [base] + [v for _, v in pts], marker="o", label=press)
        for p, q, a, runs in rows[1:]:   # sparse attention reads the whole cache: a point at its press's ratio
            if a != "dense":
                ax.plot([q], [runs[c]["ppl"]], marker="*", ls="", markersize=10, label=_name(p, q, a))
        ax.axhline(base, color="black", lw=0.8, ls="--", label="full cache")
        ax.set_xlabel("compression ratio (fraction of KV removed)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{results['model']}, {c}-token context")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
