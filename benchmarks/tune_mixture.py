"""Choose the retriever's mixture weighting on held-out prompts that crosstask never reports.

    python benchmarks/tune_mixture.py

Zoo tasks, prompts 10-29 of each task's held-out split (crosstask reports prompts 0-9 at
--limit 10): IID oracle, selection, and mixture (k=3) under uniform weights and softmax
weights at several temperatures. Writes results/tune_mixture.json.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from _common import RESULTS, machine

from lorahub.evaluate import EvalConfig, evaluate
from lorahub.hub import Hub
from lorahub.models import DEFAULT_MODEL
from lorahub.tasks import Task, fetch_bigbench, load_task
from lorahub.zoo import register_zoo
from registry import Registry
from router import RetrieverConfig, SentenceEmbedder

WEIGHTINGS = {
    "uniform": RetrieverConfig(weighting="uniform"),
    **{
        f"softmax_t{t}": RetrieverConfig(weighting="softmax", temperature=t)
        for t in (0.02, 0.05, 0.1)
    },
}
HOLDOUT = 50  # the zoo's split


def tuning_task(task: Task) -> Task:
    """The task reduced to held-out examples 10-29; split(10) of it stays inside them."""
    return replace(task, examples=tuple(task.split(HOLDOUT)[1][10:30]))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "registry", embedder=SentenceEmbedder())
        names = [e["task"] for e in register_zoo(reg)]
        fetch_bigbench(names)
        tasks = [tuning_task(load_task(n)) for n in names]
        hub = Hub.open(registry=reg, base_model=DEFAULT_MODEL)
        cfg = EvalConfig(protocol="iid", limit=10, holdout=10)
        summary = {}
        base = evaluate(hub, tasks, replace(cfg, methods=("oracle", "selection")))["summary"]
        summary.update(base)
        for label, rcfg in WEIGHTINGS.items():
            hub.router.config = rcfg
            res = evaluate(hub, tasks, replace(cfg, methods=("mixture",)))["summary"]["mixture"]
            summary[f"mixture_{label}"] = res
            print(label, res, flush=True)
        oracle = summary["oracle"]["accuracy"]
        for val in summary.values():
            val["of_oracle"] = val["accuracy"] / oracle
        out = RESULTS / "tune_mixture.json"
        out.write_text(json.dumps({"machine": machine(), "summary": summary}, indent=2))
        print(json.dumps(summary, indent=2))
        hub.close()
        reg.close()


if __name__ == "__main__":
    main()
