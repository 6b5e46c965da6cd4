"""Choose how much the at-scale router's prototypes weigh, on validation prompts only.

    python benchmarks/tune_heads.py [--work /tmp/bench-scale]

Past 64 adapters the task router ranks candidates by per-adapter heads (one mean each)
plus `prototype_weight` x their prototypes' closeness (router/heads.py). The heads cannot
tell sibling tasks apart whose means nearly coincide (4- and 5-digit addition). This
scores the shipped `HeadTable` and `score` on the zoo's validation prompts (up to 50 a
task; never the test), beside the 1,000 distractor adapters that bench_scale's quality
part registered in `--work` and on the zoo alone, for each weight on a grid.

The zoo's adapters carry 256 examples each (34 for two), the distractors 16, and more
examples make better prototypes: a weight could win by that alone. So each weight is also
scored with the zoo's adapters thinned to 16 examples (their first 16, and 16 drawn at
random), and the chosen weight is the one whose smallest gain over the heads alone across
the three is largest. Writes results/tune_heads.json; bench_scale reports it on test.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import print_table, write_result
from bench_scale import zoo_prompts

from lorahub.zoo import read_manifest
from registry import Registry
from registry.embedding import examples_key
from router import SentenceEmbedder
from router.background import background_tasks, background_texts, shipped_vectors
from router.heads import HeadTable, ShortlistConfig, background_heads, score, shared_precision

WEIGHTS = (0.0, 100.0, 200.0, 300.0, 400.0, 500.0, 700.0, 1000.0, 3000.0)
THINNED = 16  # examples a distractor carries


def thinned(vectors: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    if how == "all" or len(vectors) <= THINNED:
        return vectors
    if how == "first16":
        return vectors[:THINNED]
    return vectors[np.sort(rng.choice(len(vectors), THINNED, replace=False))]


def top1(table: HeadTable, none: tuple, queries: np.ndarray, weight: float) -> np.ndarray:
    """Each query's best candidate (table row) under `weight`; P(none) is left aside: the
    weight does not move it."""
    table.config = replace(table.config, prototype_weight=weight)
    cand, prob, _ = score(table, none, queries)
    return cand[np.arange(len(queries)), prob.argmax(1)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-scale")
    ap.add_argument("--prompts", type=int, default=50, help="per zoo task")
    args = ap.parse_args()
    embedder = SentenceEmbedder()
    registry = Registry(args.work / "routing" / "registry", embedder=embedder)
    records = registry.list()
    zoo = {e["name"] for e in read_manifest()}
    if len(records) <= len(zoo):
        raise SystemExit(f"{args.work}: run bench_scale.py --parts quality first")
    vectors = {r.name: registry.example_vectors(r.meta) for r in records}
    prompts = zoo_prompts(args.prompts, "validation")
    queries = embedder.encode([p for _, p in prompts])
    bg = shipped_vectors(examples_key(embedder, list(background_texts()))).numpy()
    groups = np.asarray(background_tasks())
    precision = shared_precision(bg, groups, ShortlistConfig().shrink)
    none = background_heads(precision, bg, groups)
    rows = []
    for how in ("all", "first16", "random16"):
        rng = np.random.default_rng(0)
        examples = {n: thinned(v, how, rng) if n in zoo else v for n, v in vectors.items()}
        for pool in ("crowded", "zoo alone"):
            names = [n for n in examples if pool == "crowded" or n in zoo]
            table = HeadTable(precision, ShortlistConfig())
            table.sync({n: n for n in names}, examples.__getitem__)
            for weight in WEIGHTS:
                picked = np.array(table.names)[top1(table, none, queries, weight)]
                right = float(
                    np.mean([p == want for p, (want, _) in zip(picked, prompts, strict=True)])
                )
                rows.append({"examples": how, "pool": pool, "weight": weight, "top1": right})
                print(rows[-1], flush=True)
    crowded = {(r["examples"], r["weight"]): r["top1"] for r in rows if r["pool"] == "crowded"}
    worst = {
        w: min(crowded[h, w] - crowded[h, 0.0] for h in ("all", "first16", "random16"))
        for w in WEIGHTS
    }
    chosen = max(WEIGHTS, key=lambda w: (worst[w], -w))
    print_table(rows, ["examples", "pool", "weight", "top1"])
    print(
        f"chosen prototype_weight: {chosen} (smallest gain over the heads alone {worst[chosen]:+.4f})"
    )
    results = {
        "rows": rows,
        "smallest_gain_over_heads_alone": {str(w): g for w, g in worst.items()},
        "chosen_prototype_weight": chosen,
        "prompts": len(prompts),
        "split": "validation",
    }
    write_result("tune_heads", {"prompts_per_task": args.prompts}, results, [], False)


if __name__ == "__main__":
    main()
