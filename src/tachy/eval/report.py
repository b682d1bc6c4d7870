"""results.json, results.md and the PNG of a tachy eval run: needle heatmap, ppl curve, RULER accuracy by context."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .sweep import DENSE

METRIC = {"needle": "accuracy", "ruler": "accuracy", "ppl": "ppl"}
GROUPS = {"needle": "depths", "ruler": "tasks"}   # what accuracy is split by


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results, command))
    plot = {"needle": heatmap, "ppl": curve, "ruler": by_context}[results["task"]]
    plot(results, out / f"{results['task']}.png")


@dataclass
class Row:
    """One setting's entries by context; the baseline is the first row."""

    press: str
    ratio: float
    attention: str
    runs: dict[int, dict]

    @property
    def label(self) -> str:
        label = self.press if self.press in ("full", "none") else f"{self.press} @{self.ratio:g}"
        return label if self.attention == DENSE else f"{label} / {self.attention}"


def _rows(results: dict) -> list[Row]:
    metric = METRIC[results["task"]]
    rows = [Row("full", 0.0, DENSE, {r["context"]: r for r in results["baseline"]["per_context"]})]
    seen: dict[tuple, Row] = {}
    for r in results["runs"]:
        key = (r["press"], r["ratio"], r.get("attention", DENSE))
        seen.setdefault(key, Row(*key, {})).runs[r["context"]] = r
    rows += seen.values()
    assert all(metric in r for row in rows for r in row.runs.values())
    return rows


def markdown(results: dict, command: str) -> str:
    head = f"Model `{results['model']}`, {results['task']}. Command: `{command}`\n\n"
    if results["task"] == "ppl":
        return head + _ppl_table(results)
    return head + _accuracy_table(results)


def _ppl_table(results: dict) -> str:
    rows, contexts = _rows(results), results["contexts"]
    lines = ["| press | ratio | attention | " + " | ".join(f"ppl @{c} | KV MiB @{c} | read MB/token @{c}"
                                                         for c in contexts) + " |",
             "|---|---|---|" + "---|---|---|" * len(contexts)]
    for row in rows:
        cells = []
        for c in contexts:
            r, base = row.runs[c], rows[0].runs[c]
            cells.append(f"{r['ppl']:.3f} ({100 * (r['ppl'] / base['ppl'] - 1):+.1f}%) | "
                         f"{_mib(r, base)} | {_read(r)}")
        lines.append(f"| {row.press} | {row.ratio:g} | {row.attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _accuracy_table(results: dict) -> str:
    """One line per (setting, context): accuracy overall and per group (depth, task), KV held and speed."""
    rows, groups = _rows(results), GROUPS[results["task"]]
    names = list(rows[0].runs[results["contexts"][0]][groups])
    titles = [f"{100 * float(g):.0f}%" for g in names] if groups == "depths" else names
    lines = ["| press | ratio | attention | context | accuracy | " + " | ".join(titles)
             + " | KV MiB | K/V MB read per token | prefill s | decode tokens/s |", "|---" * (9 + len(names)) + "|"]
    for row in rows:
        for c in results["contexts"]:
            r = row.runs[c]
            tps = "-" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}"
            lines.append(f"| {row.press} | {row.ratio:g} | {row.attention} | {c} | {100 * r['accuracy']:.0f}% | "
                         + " | ".join(f"{100 * r[groups][g]:.0f}%" for g in names)
                         + f" | {_mib(r, rows[0].runs[c])} | {_read(r)} | {r['prefill_s']:.2f} | {tps} |")
    return "\n".join(lines) + "\n"


def _read(run: dict) -> str:
    return f"{run['kv_read_per_token'] / 1e6:.1f}" if run.get("kv_read_per_token") is not None else "-"


def _mib(run: dict, base: dict) -> str:
    return f"{run['kv_bytes'] / 2**20:.1f} ({base['kv_bytes'] / run['kv_bytes']:.1f}x)"


# -- plots ------------------------------------------------------------------------------------------------
def _figure(panels: int, width: float, height: float):
    """matplotlib (headless) and a figure of ``panels`` side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heatmap(results: dict, path: Path) -> None:
    rows, contexts, depths = _rows(results), results["contexts"], [f"{d:g}" for d in results["depths"]]
    plt, fig, axes = _figure(len(contexts), 0.6 * len(depths) + 3 / len(contexts), 1.5 + 0.3 * len(rows))
    for ax, c in zip(axes, contexts):
        grid = [[row.runs[c]["depths"][d] for d in depths] for row in rows]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{100 * float(d):.0f}%" for d in depths])
        ax.set_yticks(range(len(rows)), [row.label for row in rows])
        ax.set_xlabel("needle depth")
        ax.set_title(f"{results['model']}, {c} tokens")
    _save(plt, fig, path)


def curve(results: dict, path: Path) -> None:
    rows, contexts = _rows(results), results["contexts"]
    plt, fig, axes = _figure(len(contexts), 5.5, 4)
    for ax, c in zip(axes, contexts):
        base = rows[0].runs[c]["ppl"]
        for press, attention in sorted({(row.press, row.attention) for row in rows[1:]}):
            pts = sorted((row.ratio, row.runs[c]["ppl"]) for row in rows
                         if (row.press, row.attention) == (press, attention))
            label = press if attention == DENSE else f"{press} / {attention}"
            ax.plot([0] + [q for q, _ in pts], [base] + [v for _, v in pts], marker="o", label=label)
        ax.axhline(base, color="black", lw=0.8, ls="--", label="full cache")
        ax.set_xlabel("compression ratio (fraction of KV removed)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{results['model']}, {c}-token context")
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def by_context(results: dict, path: Path) -> None:
    """One panel per task and one for the average: accuracy against context length, a line per setting."""
    rows, contexts, tasks = _rows(results), results["contexts"], results["tasks"]
    plt, fig, axes = _figure(len(tasks) + 1, 3.6, 3.4)
    for ax, task in zip(axes, tasks + ["average"]):
        for i, row in enumerate(rows):
            acc = [row.runs[c]["accuracy"] if task == "average" else row.runs[c]["tasks"][task] for c in contexts]
            ax.plot(contexts, [100 * a for a in acc], marker="o", label=row.label,
                    **({"color": "black", "ls": "--"} if i == 0 else {}))
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_ylim(-5, 105)
        ax.set_xlabel("context (tokens)")
        ax.set_title(task)
    axes[0].set_ylabel(f"{results['model']}: accuracy %")
    axes[-1].legend(fontsize=7)
    _save(plt, fig, path)
