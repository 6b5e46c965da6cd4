"""Routing speed and accuracy.

    python benchmarks/bench_route.py [--quick]

Speed: prompts routed per second (embedding included) and faiss search latency with 1k,
10k and 100k registered adapter embeddings (the larger catalogues are filled by bulk SQL
with embedding-like random vectors, see bench_registry).
Accuracy: BIG-bench dev-list tasks; each task's adapter is registered with 24 training
inputs as its examples; held-back test inputs are routed; top-1 / top-3 = the task's own
adapter comes back first / among the first three. Compared: the off-the-shelf retriever,
a retriever trained (contrastively) on other training inputs of the same tasks, and a
logistic-regression classifier on the same training inputs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import print_table, target, write_result
from bench_registry import fill_catalogue, small_adapter

from lorahub.tasks import fetch_bigbench, load_task, require_dev_task
from lorahub.zoo import ZOO_TASKS
from registry import IndexKind, Registry
from router import ClassifierRouter, Retriever, SentenceEmbedder
from router.training import RetrieverTrainConfig, train_retriever

N_EXAMPLES, N_TEST, N_TRAIN_EXTRA = 24, 20, 64


def task_splits(tasks: list[str]) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """task -> (registered examples, extra training inputs, held-back test inputs)."""
    fetch_bigbench(tasks)
    out = {}
    for name in tasks:
        require_dev_task(name)
        train, test = load_task(name).split(N_TEST, seed=0)
        inputs = [ex.input for ex in train]
        out[name] = (
            inputs[:N_EXAMPLES],
            inputs[N_EXAMPLES : N_EXAMPLES + N_TRAIN_EXTRA],
            [ex.input for ex in test],
        )
    return out


def accuracy(routes: list, truth: list[str]) -> tuple[float, float]:
    top1 = np.mean([r.adapters[:1] == (t,) for r, t in zip(routes, truth, strict=True)])
    top3 = np.mean([t in r.adapters[:3] for r, t in zip(routes, truth, strict=True)])
    return float(top1), float(top3)


def bench_accuracy(splits: dict, tmp: Path, epochs: int) -> list[dict]:
    prompts = [p for _, _, test in splits.values() for p in test]
    truth = [name.replace("/", "-") for name, (_, _, test) in splits.items() for _ in test]
    rows = []
    embedders = {"off-the-shelf": SentenceEmbedder()}
    train_inputs = {name.replace("/", "-"): ex + extra for name, (ex, extra, _) in splits.items()}
    start = time.perf_counter()
    embedders["trained"] = train_retriever(
        train_inputs, tmp / "retriever", config=RetrieverTrainConfig(epochs=epochs)
    )
    train_s = time.perf_counter() - start
    for label, emb in embedders.items():
        with Registry(tmp / f"reg-{label}", embedder=emb) as reg:
            for i, (name, (examples, _, _)) in enumerate(splits.items()):
                reg.register(small_adapter(i), name=name.replace("/", "-"), examples=examples)
            routes = Retriever(reg).route(prompts, k=3)
        top1, top3 = accuracy(routes, truth)
        rows.append({"router": f"retriever ({label})", "top1": top1, "top3": top3})
    inputs = [x for xs in train_inputs.values() for x in xs]
    labels = [n for n, xs in train_inputs.items() for _ in xs]
    clf = ClassifierRouter.fit(inputs, labels, SentenceEmbedder())
    top1, top3 = accuracy(clf.route(prompts, k=3), truth)
    rows.append({"router": "classifier (logistic regression)", "top1": top1, "top3": top3})
    rows[1]["train_s"] = train_s
    return rows


def bench_speed(sizes: list[int], prompts: list[str], tmp: Path) -> list[dict]:
    emb = SentenceEmbedder()
    emb.encode(prompts[:8])
    rows = []
    for n in sizes:
        root = tmp / f"speed-{n}"
        fill_catalogue(root, n, np.random.default_rng(n), emb)
        with Registry(root, embedder=emb, index_kind=IndexKind.auto) as reg:
            retriever = Retriever(reg)
            retriever.route(prompts[:4], k=3)  # builds the index
            start = time.perf_counter()
            retriever.route(prompts, k=3)
            per_s = len(prompts) / (time.perf_counter() - start)
            queries = emb.encode(prompts[:200])
            index = reg.index()
            start = time.perf_counter()
            for q in queries:
                index.search(q[None], 3)
            search_ms = (time.perf_counter() - start) / len(queries) * 1000
        rows.append({"adapters": n, "prompts_per_s": per_s, "search_ms": search_ms})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    tasks = ZOO_TASKS[:8] if args.quick else ZOO_TASKS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        splits = task_splits(tasks)
        prompts = [p for _, _, test in splits.values() for p in test]
        prompts = (prompts * (1 + 2000 // len(prompts)))[:2000]
        speed = bench_speed([1000, 10_000] if args.quick else [1000, 10_000, 100_000], prompts, tmp)
        acc = bench_accuracy(splits, tmp, epochs=1)
    print_table(speed, ["adapters", "prompts_per_s", "search_ms"])
    print_table(acc, ["router", "top1", "top3", "train_s"])
    by = {r["router"]: r for r in acc}
    trained, shelf = by["retriever (trained)"], by["retriever (off-the-shelf)"]
    targets = [
        target("prompts_per_s_at_largest", speed[-1]["prompts_per_s"], 1000.0, ">="),
        target("search_ms_at_largest", speed[-1]["search_ms"], 1.0, "<="),
        target("trained_retriever_top1", trained["top1"], 0.95, ">="),
        target("trained_minus_off_the_shelf_top1", trained["top1"] - shelf["top1"], 0.0, ">="),
    ]
    write_result(
        "route",
        {
            "tasks": tasks,
            "n_examples": N_EXAMPLES,
            "n_test": N_TEST,
            "n_train_extra": N_TRAIN_EXTRA,
            "quick": args.quick,
        },
        {"speed": speed, "accuracy": acc},
        targets,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
