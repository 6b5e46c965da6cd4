"""Cross-task evaluation: protocols, methods, metrics with bootstrap intervals, reports.

Protocols (LoraRetriever, Zhao et al. 2024; LoraHub, Huang et al. 2023):
  iid  -- one shuffled stream of prompts from all tasks; every adapter may be chosen;
  ood  -- the same, but each prompt's own-task adapter is excluded;
Methods: base, oracle (own adapter; iid), selection (k=1), mixture (k), fusion (k),
uniform (all adapters, equal weights), arrow (per-token, data-free).
Metrics: `em` (normalized exact match, generative tasks), `mc_acc` (option log-likelihood,
multiple-choice tasks), `routing_top1` / `routing_topk` (own adapter routed, iid).

results.json schema:
  {"protocol", "config", "seeds",
   "tasks":   {task: {method: {metric: {"value", "ci_low", "ci_high", "n"}}}},
   "summary": {method: {metric: macro average over tasks}},
   "routings": [{"task", "prompt", "method", "adapters": [...]}]}
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from composition import Composer
from lorahub import inference
from lorahub.hub import Hub
from lorahub.tasks import Example, Task, TaskKind
from router import Routing, arrow_gate


class Protocol(StrEnum):
    iid = "iid"
    ood = "ood"


METHODS = ("base", "oracle", "selection", "mixture", "fusion", "uniform", "arrow")


@dataclass(frozen=True)
class EvalConfig:
    protocol: Protocol = Protocol.iid
    methods: tuple[str, ...] = METHODS
    k: int = 3
    limit: int | None = 50  # prompts per task
    max_new_tokens: int = 16
    batch_size: int = 32
    n_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        Protocol(self.protocol)
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")


@dataclass
class Item:
    """One prompt of the evaluation stream."""

    task: str
    example: Example
    own: str | None  # the adapter trained on this task, if any
    right: dict[str, bool] = field(default_factory=dict)
    routed: dict[str, tuple[str, ...]] = field(default_factory=dict)


def bootstrap_ci(values: Sequence[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean."""
    if not values:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    arr = np.asarray(values, dtype=float)
    means = arr[rng.integers(0, len(arr), size=(n, len(arr)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def own_adapters(hub: Hub) -> dict[str, str]:
    """task -> adapter name, from the adapters' metadata."""
    return {r.meta.task: r.name for r in hub.registry.list() if r.meta.task}


def build_stream(
    tasks: Sequence[Task], owners: dict[str, str], limit: int | None, seed: int
) -> list[Item]:
    items = [Item(t.name, ex, owners.get(t.name)) for t in tasks for ex in t.examples[:limit]]
    random.Random(seed).shuffle(items)
    return items


def _routings_for(
    hub: Hub, method: str, items: list[Item], cfg: EvalConfig
) -> list[Routing] | None:
    """Per-item routings of a method (None: arrow, which routes per token in the pass)."""
    prompts = [it.example.input for it in items]
    exclude_each = (
        [[it.own] if it.own else [] for it in items] if cfg.protocol == Protocol.ood else None
    )
    names = hub.registry.names()
    table: dict[str, Callable[[], list[Routing] | None]] = {
        "base": lambda: [Routing()] * len(items),
        "oracle": lambda: [Routing((it.own,), (1.0,)) if it.own else Routing() for it in items],
        "selection": lambda: hub.route(prompts, 1, "selection", exclude_each=exclude_each),
        "mixture": lambda: hub.route(prompts, cfg.k, "mixture", exclude_each=exclude_each),
        "fusion": lambda: hub.route(prompts, cfg.k, "fusion", exclude_each=exclude_each),
        "uniform": lambda: [
            _uniform([n for n in names if n not in (ex or [])])
            for ex in (exclude_each or [[]] * len(items))
        ],
        "arrow": lambda: None,
    }
    return table[method]()


def _uniform(names: list[str]) -> Routing:
    return Routing(tuple(names), tuple([1.0 / len(names)] * len(names))) if names else Routing()


def _score_items(
    hub: Hub, items: list[Item], method: str, routings: list[Routing] | None, cfg: EvalConfig
) -> list[bool]:
    """Right or wrong per item: option log-likelihood for MC, exact match otherwise."""
    mode = "fusion" if method == "fusion" else "mixture"
    mc = [i for i, it in enumerate(items) if it.example.answer is not None]
    gen = [i for i, it in enumerate(items) if it.example.answer is None]
    right = [False] * len(items)
    with _applied(hub, routings) as (composer, gates, token_gate):
        kw = {
            "composer": composer,
            "mode": mode,
            "batch_size": cfg.batch_size,
            "token_gate": token_gate,
        }
        if mc:
            scores = inference.option_logprobs(
                hub.base,
                [items[i].example.input for i in mc],
                [items[i].example.options for i in mc],
                gates=gates[mc] if gates is not None else None,
                **kw,
            )
            for i, s in zip(mc, scores, strict=True):
                right[i] = int(np.argmax(s)) == items[i].example.answer
        if gen:
            texts = inference.generate(
                hub.base,
                [items[i].example.input for i in gen],
                gates=gates[gen] if gates is not None else None,
                max_new_tokens=cfg.max_new_tokens,
                **kw,
            )
            for i, t in zip(gen, texts, strict=True):
                right[i] = inference.exact_match(t, items[i].example.targets)
    return right


@contextmanager
def _applied(hub: Hub, routings: list[Routing] | None) -> Iterator[tuple]:
    """(composer, per-row gates, per-token gate) for a method: the hub's routed composition,
    or (arrow: routings None) every adapter under a data-free per-token gate."""
    if routings is not None:
        with hub.composed(routings) as (composer, gates):
            yield composer, gates, None
        return
    names = hub.registry.names()
    adapters = [hub.adapters.get(n) for n in names]
    composer = Composer.attach(hub.base.model, adapters, names)
    try:
        yield composer, None, arrow_gate(adapters, registry=hub.registry)
    finally:
        composer.detach()


def evaluate(
    hub: Hub, tasks: Sequence[Task], cfg: EvalConfig = EvalConfig(), progress: bool = True
) -> dict:
    """Run every method of `cfg` over the shuffled stream of `tasks`; the results dict."""
    items = build_stream(tasks, own_adapters(hub), cfg.limit, cfg.seed)
    methods = [m for m in cfg.methods if not (m == "oracle" and cfg.protocol == Protocol.ood)]
    for method in tqdm(methods, disable=not progress, desc=f"eval {cfg.protocol}"):
        with torch.inference_mode():
            routings = _routings_for(hub, method, items, cfg)
            right = _score_items(hub, items, method, routings, cfg)
        for it, ok, r in zip(items, right, routings or [None] * len(items), strict=True):
            it.right[method] = ok
            it.routed[method] = r.adapters if r is not None else ("<per-token>",)
    return report_dict(items, methods, tasks, cfg)


def report_dict(
    items: list[Item], methods: list[str], tasks: Sequence[Task], cfg: EvalConfig
) -> dict:
    kinds = {t.name: t.kind for t in tasks}
    per_task: dict[str, dict] = {}
    for t in tasks:
        mine = [it for it in items if it.task == t.name]
        metric = "mc_acc" if kinds[t.name] == TaskKind.multiple_choice else "em"
        per_task[t.name] = {m: {metric: _stat([it.right[m] for it in mine], cfg)} for m in methods}
        if cfg.protocol == Protocol.iid and mine and mine[0].own:
            for m in ("selection", "mixture"):
                if m in methods:
                    per_task[t.name][m]["routing_top1"] = _stat(
                        [it.routed[m][:1] == (it.own,) for it in mine], cfg
                    )
                    per_task[t.name][m]["routing_topk"] = _stat(
                        [it.own in it.routed[m] for it in mine], cfg
                    )
    summary = {m: {} for m in methods}
    for m in methods:
        for metric in ("em", "mc_acc", "routing_top1", "routing_topk"):
            vals = [
                res[m][metric]["value"] for res in per_task.values() if metric in res.get(m, {})
            ]
            if vals:
                summary[m][metric] = float(np.mean(vals))
        accs = [
            res[m][k]["value"] for res in per_task.values() for k in ("em", "mc_acc") if k in res[m]
        ]
        summary[m]["accuracy"] = float(np.mean(accs)) if accs else float("nan")
    routings = [
        {"task": it.task, "prompt": it.example.input[:200], "method": m, "adapters": list(r)}
        for it in items
        for m, r in it.routed.items()
    ]
    return {
        "protocol": str(cfg.protocol),
        "config": {**asdict(cfg), "protocol": str(cfg.protocol)},
        "seeds": {"stream": cfg.seed, "bootstrap": cfg.seed},
        "tasks": per_task,
        "summary": summary,
        "routings": routings,
    }


def _stat(flags: Sequence[bool], cfg: EvalConfig) -> dict:
    values = [float(f) for f in flags]
    lo, hi = bootstrap_ci(values, cfg.n_bootstrap, cfg.seed)
    return {
        "value": float(np.mean(values)) if values else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "n": len(values),
    }


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
