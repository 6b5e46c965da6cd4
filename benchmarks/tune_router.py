"""Choose the default router and when it abstains, on validation prompts only.

    python benchmarks/tune_router.py [--limit 20] [--quick]

1. Routing (embeddings only): every zoo task's validation split; top-1 of the LoraRetriever
   baseline (one mean embedding per adapter) against the task router's classifier at
   several C, on all tasks and on the input-distinguishable ones.
2. When nothing fits: the validation prompts of dev tasks outside the zoo (UNSEEN and
   NO_HARM) answered by the base model, by the task router's mixture (k=3, never
   abstaining) and by the uniform mixture of all adapters. From those answers every policy
   "fit >= broad: the top k; abstain <= fit < broad: all adapters equally; fit < abstain:
   the base model" is scored, both thresholds on a grid. A policy is allowed only if >= 99%
   of zoo validation prompts keep their top k (fit >= broad) and no task loses > 10 points
   to the base model. That was the default before the open-world split showed the
   neighbour fit ranks everyday prompts above zoo prompts: the default fit, its thresholds
   and the unsure bound now come from benchmarks/openworld.py (results/openworld/tune.json);
   this policy stays available as TaskRouterConfig(fit="neighbours", ...). C is still
   chosen here.
Writes results/tune_router.json; crosstask then reports the chosen router on test.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import print_table, write_result
from crosstask import CONFUSABLE, NO_HARM, UNSEEN

from lorahub.evaluate import EvalConfig, evaluate
from lorahub.hub import Hub
from lorahub.models import DEFAULT_MODEL
from lorahub.tasks import fetch_bigbench, load_task
from lorahub.zoo import register_zoo
from registry import Registry
from router import Retriever, RouterOptions, SentenceEmbedder, TaskRouter, TaskRouterConfig

CS = (1.0, 10.0, 100.0)
IN_ZOO_KEPT = 0.99  # share of zoo validation prompts that must keep their adapters
MAX_LOSS = 0.10  # no task may lose more than this to the base model


def routing_top1(reg: Registry, zoo_tasks: list[str], owners: dict[str, str]) -> dict:
    """Top-1 routing accuracy on the zoo's validation prompts, per router."""
    prompts, owner = [], []
    for t in zoo_tasks:
        for ex in load_task(t).splits().validation:
            prompts.append(ex.input)
            owner.append(owners[t])
    distinguishable = np.array([o not in CONFUSABLE for o in owner])
    routers = {"retriever": Retriever(reg)} | {
        f"task_C{c:g}": TaskRouter(reg, TaskRouterConfig(C=c, fit_threshold=-1.0)) for c in CS
    }
    out = {}
    for name, router in routers.items():
        hits = np.array(
            [r.adapters[:1] == (o,) for r, o in zip(router.route(prompts, 1), owner, strict=True)]
        )
        out[name] = {
            "top1": float(hits.mean()),
            "top1_distinguishable": float(hits[distinguishable].mean()),
            "n": len(hits),
        }
    return out


def choose_thresholds(answers: list[dict], zoo_fit: np.ndarray) -> dict:
    """The best allowed policy from per-prompt answers: fit >= broad: the router's top k;
    fit in [abstain, broad): all adapters equally; fit < abstain: the base model."""
    tasks = sorted({a["task"] for a in answers})
    grid = np.round(np.arange(0.0, 0.9, 0.01), 2)
    fit = np.array([a["fit"] for a in answers])
    by_task = {t: np.array([a["task"] == t for a in answers]) for t in tasks}
    right = {m: np.array([a[m] for a in answers], dtype=float) for m in ("base", "auto", "uniform")}
    base = {t: right["base"][mask].mean() for t, mask in by_task.items()}
    rows = []
    for abstain in grid:
        for broad in grid[grid >= abstain]:
            chosen = np.where(
                fit >= broad,
                right["auto"],
                np.where(fit >= abstain, right["uniform"], right["base"]),
            )
            per_task = {t: float(chosen[mask].mean()) for t, mask in by_task.items()}
            kept = float((zoo_fit >= broad).mean())
            worst = min(per_task[t] - base[t] for t in tasks)
            rows.append(
                {
                    "fit_threshold": float(abstain),
                    "broad_threshold": float(broad),
                    "accuracy": float(np.mean(list(per_task.values()))),
                    "zoo_kept": kept,
                    "worst_vs_base": float(worst),
                    "allowed": bool(kept >= IN_ZOO_KEPT and worst >= -MAX_LOSS),
                }
            )
    allowed = [r for r in rows if r["allowed"]]
    # ties go to the lowest thresholds: abstain and broaden no more than needed
    best = max(allowed, key=lambda r: (r["accuracy"], -r["fit_threshold"], -r["broad_threshold"]))
    never = rows[0]  # both thresholds 0: always the top k
    return {"best": best, "never_abstain": never, "allowed": len(allowed), "of": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=20, help="validation prompts per unseen task")
    ap.add_argument("--quick", action="store_true", help="3 unseen tasks, 4 prompts each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "registry", embedder=SentenceEmbedder())
        manifest = register_zoo(reg)
        zoo_tasks = [e["task"] for e in manifest]
        owners = {e["task"]: e["name"] for e in manifest}
        outside = UNSEEN + NO_HARM
        limit = args.limit
        if args.quick:
            outside, limit = outside[:3], 4
        fetch_bigbench(zoo_tasks + outside)

        routing = routing_top1(reg, zoo_tasks, owners)
        print_table([{"router": k, **v} for k, v in routing.items()], ["router", "top1", "n"])
        best_c = max(CS, key=lambda c: routing[f"task_C{c:g}"]["top1"])

        never_abstains = TaskRouterConfig(
            C=best_c, fit="neighbours", fit_threshold=-1.0, broad_threshold=-1.0
        )
        zoo_prompts = [ex.input for t in zoo_tasks for ex in load_task(t).splits().validation]
        zoo_fit = TaskRouter(reg, never_abstains).scores(zoo_prompts).neighbour.max(axis=1)

        hub = Hub.open(
            registry=reg,
            base_model=DEFAULT_MODEL,
            router="task",
            router_options=RouterOptions(task=never_abstains),
        )
        cfg = EvalConfig(
            protocol="ood", on="validation", limit=limit, methods=("base", "auto", "uniform")
        )
        results = evaluate(hub, [load_task(t) for t in outside], cfg)
        by_item: dict[tuple[str, str], dict] = {}
        for r in results["routings"]:
            item = by_item.setdefault((r["task"], r["prompt"]), {"task": r["task"]})
            item[r["method"]] = r["right"]
            if r["method"] == "auto":
                item["fit"] = r["confidence"]
        choice = choose_thresholds(list(by_item.values()), zoo_fit)
        print(f"C {best_c}; best policy {choice['best']}")
        print(f"never abstaining: {choice['never_abstain']}")
        config = {
            "limit": limit,
            "zoo_tasks": zoo_tasks,
            "outside_tasks": outside,
            "C": CS,
            "in_zoo_kept": IN_ZOO_KEPT,
            "max_loss": MAX_LOSS,
            "quick": args.quick,
        }
        out = {
            "routing": routing,
            "C": best_c,
            "outside": results["summary"],
            "outside_tasks": results["tasks"],
            "threshold": choice,
            "zoo_validation_fit_percentiles_0_1_5_50": np.percentile(
                zoo_fit, [0, 1, 5, 50]
            ).tolist(),
        }
        write_result("tune_router", config, out, [], quick=args.quick)
        hub.close()
        reg.close()


if __name__ == "__main__":
    main()
