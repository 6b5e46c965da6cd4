"""Rendering an evaluation's results (the dict `lorahub.evaluate.evaluate` returns):
results.json, report.md and two PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_report(results: dict, out: Path | str) -> Path:
    """results.json, report.md and two PNG plots (methods side by side; per-task heatmap)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(results))
    _plots(results, out)
    return out


def _markdown(results: dict) -> str:
    methods = list(results["summary"])
    lines = [
        f"# Cross-task evaluation ({results['protocol']})",
        "",
        "| method | accuracy | em | mc_acc | routing_top1 | routing_topk |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in methods:
        s = results["summary"][m]
        cells = [
            f"{s[k]:.3f}" if k in s else ""
            for k in ("accuracy", "em", "mc_acc", "routing_top1", "routing_topk")
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per task (accuracy, 95% bootstrap interval)",
        "",
        "| task | " + " | ".join(methods) + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for task, res in results["tasks"].items():
        cells = []
        for m in methods:
            metric = next(k for k in ("em", "mc_acc") if k in res[m])
            r = res[m][metric]
            cells.append(f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["summary"])
    acc = [results["summary"][m]["accuracy"] for m in methods]
    fig, ax = plt.subplots(figsize=(max(4, len(methods)), 3.5))
    ax.bar(methods, acc, color="#4C72B0")
    ax.set_ylabel("macro accuracy")
    ax.set_title(f"methods ({results['protocol']})")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=120)
    plt.close(fig)
    tasks = list(results["tasks"])
    grid = np.array(
        [
            [
                next(v["value"] for k, v in results["tasks"][t][m].items() if k in ("em", "mc_acc"))
                for m in methods
            ]
            for t in tasks
        ]
    )
    fig, ax = plt.subplots(figsize=(max(4, len(methods) * 0.9), max(3, len(tasks) * 0.35)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(out / "tasks.png", dpi=120)
    plt.close(fig)
