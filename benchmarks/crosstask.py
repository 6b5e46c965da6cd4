"""Cross-task generalization of the zoo: the committed report under results/crosstask/.

    python benchmarks/crosstask.py [--limit N] [--only iid,ood,...] [--quick]

Registers lorahub/zoo in a fresh registry and runs, each into results/crosstask/<run>/
(results.json, report.md, methods.png, tasks.png):
  iid         the zoo's tasks; every adapter may be routed to (LoraRetriever's IID setting)
  ood         the same prompts, each one's own-task adapter excluded
  ood_unseen  dev-list tasks outside the zoo (no adapter was trained on them)
  fewshot     the same unseen tasks: LoraHub weights and learned per-token gates from 5
              examples over 20 zoo adapters, against zero-shot base and the uniform mixture
Prompts are each task's held-out split (the zoo's), so no adapter saw them in training.
results/crosstask/summary.json gathers the macro accuracies and the targets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import RESULTS, print_table, target, write_result

from lorahub.evaluate import EvalConfig, evaluate
from lorahub.gating import GateConfig
from lorahub.hub import Hub
from lorahub.models import DEFAULT_MODEL
from lorahub.report import write_report
from lorahub.tasks import fetch_bigbench, load_task, require_dev_task
from lorahub.zoo import register_zoo
from registry import Registry
from router import SentenceEmbedder

# Dev-list tasks outside the zoo, next to its families (arithmetic, unit conversion,
# German verbs, object tracking) and a few farther away.
UNSEEN = [
    "arithmetic/1_digit_subtraction",
    "arithmetic/2_digit_subtraction",
    "arithmetic/3_digit_addition",
    "modified_arithmetic/three_digit_subtraction_control",
    "unit_conversion/unit_addition_same",
    "linguistic_mappings/de_past_tense_irregular_json",
    "tracking_shuffled_objects/three_objects",
    "entailed_polarity",
]


# 30 Adam steps fit per-token gates to 5 examples; a minute per task on 2 cores
GATE = GateConfig(steps=30)


def run_eval(hub: Hub, name: str, tasks: list[str], cfg: EvalConfig, out: Path) -> dict:
    start = time.perf_counter()
    results = evaluate(hub, [load_task(t) for t in tasks], cfg)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(results, out / name)
    print(f"{name}: {results['seconds']:.0f}s")
    print_table(
        [{"method": m, **s} for m, s in results["summary"].items()],
        ["method", "accuracy", "routing_top1", "routing_topk"],
    )
    return results


def write_summary(summaries: dict, config: dict, quick: bool) -> None:
    """summary.json: every run's macro accuracies (runs not redone are kept) and the targets."""
    path = RESULTS / "crosstask" / ("summary.quick.json" if quick else "summary.json")
    if path.exists():
        summaries = {**json.loads(path.read_text())["results"], **summaries}
    acc = {run: {m: s["accuracy"] for m, s in summ.items()} for run, summ in summaries.items()}
    targets = []
    if "iid" in acc:
        iid = acc["iid"]
        targets.append(
            target("iid_mixture_over_oracle", iid["mixture"] / iid["oracle"], 0.95, ">=")
        )
    for run in ("ood", "ood_unseen"):
        if run in acc:
            a = acc[run]
            targets.append(target(f"{run}_mixture_minus_base", a["mixture"] - a["base"], 0.0, ">"))
            targets.append(
                target(f"{run}_mixture_minus_uniform", a["mixture"] - a["uniform"], 0.0, ">")
            )
    if "fewshot" in acc:
        a = acc["fewshot"]
        for m in [m for m in ("lorahub", "gated") if m in a]:
            targets.append(target(f"fewshot_{m}_minus_base", a[m] - a["base"], 0.0, ">"))
    write_result("crosstask/summary", config, summaries, targets, quick=quick)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=10, help="prompts per task")
    ap.add_argument("--only", help="comma-separated runs (default: all four)")
    ap.add_argument("--quick", action="store_true", help="3 tasks, 4 prompts each")
    ap.add_argument("--fewshot-methods", help="comma-separated (default: the protocol's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "registry", embedder=SentenceEmbedder())
        manifest = register_zoo(reg)
        zoo_tasks = [e["task"] for e in manifest]
        unseen = [t for t in UNSEEN if t not in zoo_tasks]
        for t in unseen:
            require_dev_task(t)  # fewshot tunes on them
        limit = args.limit
        if args.quick:
            zoo_tasks, unseen, limit = zoo_tasks[:3], unseen[:3], 4
        fetch_bigbench(zoo_tasks + unseen)
        hub = Hub.open(registry=reg, base_model=DEFAULT_MODEL)
        out = RESULTS / ("crosstask-quick" if args.quick else "crosstask")  # quick: gitignored
        runs = {
            "iid": (zoo_tasks, EvalConfig(protocol="iid", limit=limit)),
            "ood": (zoo_tasks, EvalConfig(protocol="ood", limit=limit)),
            "ood_unseen": (unseen, EvalConfig(protocol="ood", limit=limit)),
            "fewshot": (
                unseen,
                EvalConfig(
                    protocol="fewshot",
                    limit=limit,
                    gate=GATE,
                    methods=args.fewshot_methods.split(",") if args.fewshot_methods else None,
                ),
            ),
        }
        wanted = args.only.split(",") if args.only else list(runs)
        config = {
            "limit": limit,
            "zoo_tasks": zoo_tasks,
            "unseen_tasks": unseen,
            "quick": args.quick,
        }
        for name in wanted:  # the summary is rewritten after every run
            tasks, cfg = runs[name]
            summary = run_eval(hub, name, tasks, cfg, out)["summary"]
            write_summary({name: summary}, config, args.quick)
        hub.close()
        reg.close()


if __name__ == "__main__":
    main()
