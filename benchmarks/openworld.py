"""Open world: does `auto` know when no adapter fits?

    python benchmarks/openworld.py split         # results/openworld/split.json
    python benchmarks/openworld.py background    # router/data/background.jsonl (tuning half)
    python benchmarks/openworld.py diagnose      # results/openworld/diagnostic.json
    python benchmarks/openworld.py tune          # results/openworld/tune.json (thresholds)
    python benchmarks/openworld.py examples      # results/openworld/examples.json (how many
                                                 # examples an adapter needs at the defaults)
    python benchmarks/openworld.py gains         # base vs composed, tuning half, validation
    python benchmarks/openworld.py tune-gains    # router/data/background-gains.json,
                                                 # results/openworld/tune_gains.json
    python benchmarks/openworld.py run           # the end-to-end answers (cached per task)
    python benchmarks/openworld.py summary       # results/openworld/e2e.json

Every dev task without a zoo adapter, less crosstask's UNSEEN (tasks near the zoo, kept as
their own group), is "no adapter fits" traffic. A seeded shuffle splits those tasks BY TASK
into a tuning half (the router's background examples and every threshold come from it) and
a reporting half (only reported, with the everyday chat prompts of data/everyday.jsonl).

`diagnose` ranks candidate decision scores by AUROC of "this prompt belongs to a zoo
adapter's task" against other tasks' prompts, embeddings only. On the tuning half the
background is fitted on one fold of tasks and scored on the other (2 folds, by task), zoo
prompts from validation; on the reporting half the background is all tuning-half tasks,
prompts from test and the everyday set.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, machine, print_table, target
from crosstask import CONFUSABLE, UNSEEN
from safetensors.torch import save_file

from lorahub.evaluate import EvalConfig, Item, score_items
from lorahub.hub import Hub
from lorahub.models import DEFAULT_MODEL, load_base_model, loraplex_home
from lorahub.tasks import dev_tasks, fetch_bigbench, load_task
from lorahub.zoo import read_manifest, register_zoo
from registry import Registry
from registry.embedding import examples_key
from router import Decision, Routing, SentenceEmbedder
from router.background import (
    BACKGROUND_GAINS,
    BACKGROUND_PATH,
    BACKGROUND_VECTORS,
    shipped_vectors,
    truncate,
)
from router.classifier import fit_linear, softmax_rows
from router.heads import HeadTable, ShortlistConfig, background_heads, score, shared_precision
from router.task import TaskRouter, TaskRouterConfig, adapter_fit

README_EXAMPLE = "What is the capital of France?"  # the README's first `auto` prompt
SPLIT = RESULTS / "openworld" / "split.json"
EVERYDAY = Path(__file__).parent / "data" / "everyday.jsonl"
# chat-shaped prompts for the background (tuning only): written for this purpose, disjoint
# from EVERYDAY (no prompt shared or paraphrased; tests/test_background.py checks it)
CHAT_TUNING = Path(__file__).parent / "data" / "chat_tuning.jsonl"
SEED = 0
PER_TASK_BACKGROUND = 16  # train inputs per tuning-half task shipped as background
PER_TASK_PROMPTS = 20  # prompts per zoo and UNSEEN task scored in the diagnostic
NEGATIVE_PROMPTS = 5  # per task of the 243 others (2 shared CPU cores)
REGISTRY = loraplex_home() / "openworld-registry"  # the zoo, registered once


def make_split(seed: int = SEED) -> dict:
    """Dev tasks with no zoo adapter, less UNSEEN, halved by task after a seeded shuffle."""
    zoo = {e["task"] for e in read_manifest()}
    pool = sorted(dev_tasks() - zoo - set(UNSEEN))
    random.Random(seed).shuffle(pool)
    half = len(pool) // 2
    return {
        "seed": seed,
        "rule": "sorted(dev tasks - zoo tasks - crosstask.UNSEEN), random.Random(seed)"
        ".shuffle, first half tuning, rest reporting",
        "tuning": sorted(pool[:half]),
        "reporting": sorted(pool[half:]),
        "unseen": list(UNSEEN),
        "zoo": sorted(zoo),
    }


def read_split() -> dict:
    return json.loads(SPLIT.read_text())


def read_everyday() -> list[dict]:
    return [json.loads(ln) for ln in EVERYDAY.read_text().splitlines() if ln.strip()]


def read_chat_tuning() -> list[dict]:
    return [json.loads(ln) for ln in CHAT_TUNING.read_text().splitlines() if ln.strip()]


def write_background(split: dict) -> None:
    """The first PER_TASK_BACKGROUND train inputs of every tuning-half task (BIG-bench,
    Apache-2.0) and the chat tuning prompts (task "chat/KIND"), one JSON object a line,
    then their vectors by the default embedder (keyed by embedder and texts)."""
    fetch_bigbench(split["tuning"])
    rows = [
        {"task": t, "input": truncate(ex.input)}
        for t in split["tuning"]
        for ex in load_task(t).splits().train[:PER_TASK_BACKGROUND]
    ] + [{"task": f"chat/{c['kind']}", "input": c["prompt"]} for c in read_chat_tuning()]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    BACKGROUND_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {BACKGROUND_PATH}: {len(lines)} inputs")
    embedder = SentenceEmbedder()
    texts = [r["input"] for r in rows]
    vectors = torch.from_numpy(np.asarray(embedder.encode(texts), np.float32))
    save_file(
        {"vectors": vectors}, BACKGROUND_VECTORS, metadata={"key": examples_key(embedder, texts)}
    )
    print(f"wrote {BACKGROUND_VECTORS}: {tuple(vectors.shape)}")


# -- the diagnostic ---------------------------------------------------------------------------


@dataclass
class Zoo:
    """The zoo as the router sees it: example vectors (A, M, d) with mask, its examples'
    leave-one-out fits (A, M) for calibration and log lengths (A,)."""

    names: list[str]
    vectors: torch.Tensor
    mask: torch.Tensor
    labels: np.ndarray  # (N,) adapter index of each row of `flat`
    flat: np.ndarray  # (N, d) every example vector
    loo_fit: list[np.ndarray]
    log_len: np.ndarray


def embed(reg: Registry, texts: list[str]) -> np.ndarray:
    """Unit vectors, cached in the registry by embedder and texts."""
    key = examples_key(reg.embedder, texts)
    made = reg.cached_tensors(
        key,
        lambda: {"vectors": torch.from_numpy(np.asarray(reg.embedder.encode(texts), np.float32))},
    )
    return next(iter(made.values())).numpy()  # the task router names it "vectors" too


def load_zoo(reg: Registry, neighbours: int = 5) -> Zoo:
    recs = [r for r in reg.list() if r.meta.examples]
    blocks = [reg.example_vectors(r.meta) for r in recs]
    width = max(len(b) for b in blocks)
    vectors = torch.zeros(len(blocks), width, blocks[0].shape[1])
    mask = torch.zeros(len(blocks), width, dtype=torch.bool)
    loo = []
    for i, b in enumerate(blocks):
        vectors[i, : len(b)] = torch.from_numpy(b)
        mask[i, : len(b)] = True
        sims = b @ b.T
        np.fill_diagonal(sims, -np.inf)
        loo.append(np.sort(np.sort(sims, axis=1)[:, -neighbours:].mean(1)))
    log_len = np.array([np.median([np.log1p(len(t)) for t in r.meta.examples]) for r in recs])
    labels = np.concatenate([np.full(len(b), i) for i, b in enumerate(blocks)])
    return Zoo([r.name for r in recs], vectors, mask, labels, np.concatenate(blocks), loo, log_len)


@dataclass
class Context:
    """What a candidate score may read: the zoo, background vectors, and two fitted
    classifiers (adapters only; adapters + a `none` class on the background)."""

    zoo: Zoo
    background: np.ndarray
    plain: tuple[np.ndarray, np.ndarray]
    with_none_balanced: tuple[np.ndarray, np.ndarray]
    heads: tuple[HeadTable, tuple[np.ndarray, np.ndarray]]


def make_context(zoo: Zoo, background: tuple[np.ndarray, np.ndarray]) -> Context:
    """`background`: (N, d) vectors and their (N,) tasks; classifiers as the router's."""
    C = TaskRouterConfig().C
    vectors, groups = background
    precision = shared_precision(vectors, groups, ShortlistConfig().shrink)
    table = HeadTable(precision)
    table.sync({n: n for n in zoo.names}, lambda n: zoo.flat[zoo.labels == zoo.names.index(n)])
    return Context(
        zoo,
        vectors,
        fit_linear(zoo.flat, zoo.labels, C),
        _fit_with_none(zoo, np.arange(len(zoo.flat)), vectors, C),
        (table, background_heads(precision, vectors, groups)),
    )


def _fit(ctx: Context, Q: np.ndarray) -> np.ndarray:
    """(P, A): the neighbour fit as the router's."""
    m = TaskRouterConfig().neighbours
    return adapter_fit(torch.from_numpy(Q), ctx.zoo.vectors, ctx.zoo.mask, m).numpy()


def _probs(W: tuple[np.ndarray, np.ndarray], Q: np.ndarray) -> np.ndarray:
    return softmax_rows(Q @ W[0].T + W[1])


def score_fit(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    return _fit(ctx, Q).max(1)


def score_calibrated(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    """max over adapters of the conformal p-value of the prompt's fit among that adapter's
    own examples' leave-one-out fits."""
    fit = _fit(ctx, Q)
    p = [np.searchsorted(cal, fit[:, a]) / len(cal) for a, cal in enumerate(ctx.zoo.loo_fit)]
    return np.stack(p, 1).max(1)


def score_classifier(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    return _probs(ctx.plain, Q).max(1)


def score_none_balanced(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    return 1.0 - _probs(ctx.with_none_balanced, Q)[:, -1]


def score_heads(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    """The task router's path past its candidates (router/heads.py): 1 - P(none)."""
    return 1.0 - score(*ctx.heads, Q)[2]


def score_background_margin(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    """best adapter fit minus the fit to the nearest background examples."""
    bg = (Q @ ctx.background.T).clip(-1, 1)
    bg_fit = np.sort(bg, axis=1)[:, -5:].mean(1)
    return _fit(ctx, Q).max(1) - bg_fit


def score_agreement(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    """fit, +1 when the classifier's and the fit's top adapters agree."""
    fit = _fit(ctx, Q)
    agree = fit.argmax(1) == _probs(ctx.plain, Q).argmax(1)
    return fit.max(1) + agree


def score_length(ctx: Context, Q: np.ndarray, texts: list[str]) -> np.ndarray:
    """minus the log-length gap to the top adapter's median example length, plus fit."""
    fit = _fit(ctx, Q)
    gap = np.abs(np.log1p([len(t) for t in texts]) - ctx.zoo.log_len[fit.argmax(1)])
    return fit.max(1) - 0.1 * gap


CANDIDATES: dict[str, Callable[[Context, np.ndarray, list[str]], np.ndarray]] = {
    "fit (today)": score_fit,
    "calibrated fit (conformal p)": score_calibrated,
    "classifier max prob": score_classifier,
    "none class, balanced (1 - p_none)": score_none_balanced,
    "per-adapter heads, shortlist path (1 - p_none)": score_heads,
    "background kNN margin": score_background_margin,
    "fit + router agreement": score_agreement,
    "fit - 0.1 length gap": score_length,
}


def prompts_of(tasks: list[str], split: str, n: int) -> dict[str, list[str]]:
    return {t: [ex.input for ex in getattr(load_task(t).splits(), split)[:n]] for t in tasks}


def background_of(reg: Registry, tasks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The shipped background's vectors and tasks: those of `tasks` (a subset of the
    tuning half) and the chat tuning prompts."""
    rows = [json.loads(ln) for ln in BACKGROUND_PATH.read_text().splitlines() if ln.strip()]
    texts = [r["input"] for r in rows]
    shipped = shipped_vectors(examples_key(reg.embedder, texts))
    vectors = embed(reg, texts) if shipped is None else shipped.numpy()
    keep = [i for i, r in enumerate(rows) if r["task"] in set(tasks) or r["task"][:5] == "chat/"]
    return vectors[keep], np.array([rows[i]["task"] for i in keep])


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return float(roc_auc_score(y, np.concatenate([pos, neg])))


def evaluate_scores(
    ctx: Context, pos: tuple[np.ndarray, list[str]], negs: dict[str, tuple[np.ndarray, list[str]]]
) -> dict[str, dict]:
    """Each candidate's AUROC of zoo prompts against each negative set, and its cost per
    prompt after embedding (ms)."""
    out = {}
    for name, fn in CANDIDATES.items():
        start = time.perf_counter()
        p = fn(ctx, *pos)
        ms = (time.perf_counter() - start) * 1000 / len(pos[1])
        out[name] = {"ms_per_prompt": ms} | {
            f"auroc_{k}": auroc(p, fn(ctx, *neg)) for k, neg in negs.items()
        }
    return out


def tuning_folds(split: dict) -> list[list[str]]:
    """The tuning half in two folds by task (seeded): one fold's background scores the other."""
    tuning = list(split["tuning"])
    random.Random(SEED).shuffle(tuning)
    return [sorted(tuning[: len(tuning) // 2]), sorted(tuning[len(tuning) // 2 :])]


def diagnose(reg: Registry, split: dict) -> dict:
    zoo = load_zoo(reg)
    fetch_bigbench(split["tuning"] + split["reporting"] + split["zoo"] + split["unseen"])

    def flat(groups: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
        texts = [p for ps in groups.values() for p in ps]
        return embed(reg, texts), texts

    n, m = PER_TASK_PROMPTS, NEGATIVE_PROMPTS
    folds = tuning_folds(split)
    zoo_val = flat(prompts_of(split["zoo"], "validation", n))
    unseen_val = flat(prompts_of(split["unseen"], "validation", n))
    per_fold = []
    for f in (0, 1):
        ctx = make_context(zoo, background_of(reg, folds[1 - f]))
        negs = {"tuning": flat(prompts_of(folds[f], "validation", m)), "unseen": unseen_val}
        per_fold.append(evaluate_scores(ctx, zoo_val, negs))
    tuning_table = {
        name: {k: float(np.mean([pf[name][k] for pf in per_fold])) for k in per_fold[0][name]}
        for name in CANDIDATES
    }
    ctx = make_context(zoo, background_of(reg, split["tuning"]))
    everyday = [e["prompt"] for e in read_everyday()]
    reporting_table = evaluate_scores(
        ctx,
        flat(prompts_of(split["zoo"], "test", n)),
        {
            "reporting": flat(prompts_of(split["reporting"], "test", m)),
            "everyday": (embed(reg, everyday), everyday),
            "unseen": flat(prompts_of(split["unseen"], "test", n)),
        },
    )
    probe = everyday * 4
    start = time.perf_counter()
    reg.embedder.encode(probe)
    embed_ms = 1000 * (time.perf_counter() - start) / len(probe)
    return {"tuning": tuning_table, "reporting": reporting_table, "embed_ms_per_prompt": embed_ms}


# -- how many examples an adapter needs -------------------------------------------------------

EXAMPLE_COUNTS = (4, 8, 16, 32, 64, 128, 256)
# seeded subsets of each zoo adapter's examples per count (one when no adapter has more)
EXAMPLE_DRAWS = 3


def examples_needed(reg: Registry, split: dict) -> list[dict]:
    """The defaults were tuned on the zoo: 256 examples an adapter (two carry 34). Per count
    n, each zoo adapter keeps n of its examples (all it has if fewer; seeded draws) and the
    router's classifier is fitted as in TaskRouter, against the shipped background; then,
    at the default thresholds: the zoo's validation prompts that keep adapters, that are
    sure (not mixed as unsure) and whose top adapter is their own; and, cross-fitted by
    task on the tuning half (a fold's background, the other fold's validation prompts),
    the prompts of tasks with no adapter above the fit threshold. Embeddings only."""
    cfg, zoo = TaskRouterConfig(), load_zoo(reg)
    owners = {e["task"]: e["name"] for e in read_manifest()}
    fetch_bigbench(split["tuning"] + split["zoo"])
    groups = prompts_of(split["zoo"], "validation", PER_TASK_PROMPTS)
    prompts = embed(reg, [p for ps in groups.values() for p in ps])
    own = np.array([zoo.names.index(owners[t]) for t, ps in groups.items() for _ in ps])
    folds = tuning_folds(split)
    others = [
        embed(reg, [p for ps in prompts_of(f, "validation", NEGATIVE_PROMPTS).values() for p in ps])
        for f in folds
    ]
    backgrounds = [background_of(reg, f)[0] for f in folds]
    every = background_of(reg, split["tuning"])[0]
    rows = []
    for n in EXAMPLE_COUNTS:
        draws = []
        for seed in range(EXAMPLE_DRAWS if n < np.bincount(zoo.labels).max() else 1):
            keep = _examples_kept(zoo, n, seed)
            prob = _probs(_fit_with_none(zoo, keep, every, cfg.C), prompts)
            fit = 1.0 - prob[:, -1]
            composed = [
                1.0 - _probs(_fit_with_none(zoo, keep, backgrounds[1 - f], cfg.C), others[f])[:, -1]
                >= cfg.fit_threshold
                for f in (0, 1)
            ]
            draws.append(
                {
                    "zoo_kept": float(np.mean(fit >= cfg.fit_threshold)),
                    "zoo_sure": float(np.mean(fit >= cfg.broad_threshold)),
                    "zoo_top1_own": float(np.mean(prob[:, :-1].argmax(1) == own)),
                    "other_tasks_composed": float(np.mean(np.concatenate(composed))),
                }
            )
        mean = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
        rows.append({"examples": n, "draws": len(draws)} | mean)
        print(rows[-1], flush=True)
    return rows


def _examples_kept(zoo: Zoo, n: int, seed: int) -> np.ndarray:
    """Rows of zoo.flat: a seeded n of each adapter's examples."""
    rng = np.random.default_rng(seed)
    per_adapter = [np.flatnonzero(zoo.labels == i) for i in range(len(zoo.names))]
    return np.concatenate([rng.permutation(rows)[:n] for rows in per_adapter])


def _fit_with_none(
    zoo: Zoo, keep: np.ndarray, background: np.ndarray, C: float
) -> tuple[np.ndarray, np.ndarray]:
    """The task router's classifier: the kept examples' adapters and `none`, balanced."""
    X = np.concatenate([zoo.flat[keep], background])
    y = np.concatenate([zoo.labels[keep], np.full(len(background), len(zoo.names))])
    return fit_linear(X, y, C, balanced=True)


# -- thresholds ---------------------------------------------------------------------------------

IN_ZOO_KEPT = 0.99  # zoo validation prompts that must keep their adapters (tune_router.py's rule)
SURE_KEPT = 0.95  # zoo validation prompts that keep their top k, not the unsure mixture
BROAD_RECALL = 0.95  # own adapter among the broad_k likeliest, on the zoo's unsure prompts
REPORT_PROMPTS = 3  # validation prompts per task whose decisions tune.json reports


def tune(reg: Registry, split: dict) -> dict:
    """TaskRouterConfig's defaults from the zoo's validation prompts (embeddings only):
    fit_threshold keeps IN_ZOO_KEPT of them, broad_threshold SURE_KEPT on their top k, and
    broad_k is the fewest likeliest adapters holding the own one for BROAD_RECALL of the
    prompts in between. The tuning half's and UNSEEN's validation prompts are reported."""
    router = TaskRouter(reg, TaskRouterConfig(fit_threshold=-1.0, broad_threshold=-1.0))
    owners = {e["task"]: e["name"] for e in read_manifest()}
    zoo = prompts_of(split["zoo"], "validation", 50)
    prompts = [p for ps in zoo.values() for p in ps]
    own = [owners[t] for t, ps in zoo.items() for _ in ps]
    scores = router.scores(prompts)
    fit = 1.0 - scores.p_none
    floor2 = lambda x: round(float(np.floor(x * 100) / 100), 2)  # noqa: E731
    abstain = floor2(np.quantile(fit, 1 - IN_ZOO_KEPT))
    broad = max(abstain, floor2(np.quantile(fit, 1 - SURE_KEPT)))
    band = (fit >= abstain) & (fit < broad)
    ranks = np.array(
        [
            int((scores.prob[i] > scores.prob[i, scores.names.index(o)]).sum())
            for i, o in enumerate(own)
        ]
    )
    need = np.sort(ranks[band] + 1) if band.any() else np.array([1])
    broad_k = int(need[int(np.ceil(BROAD_RECALL * len(need))) - 1])
    chosen = {"fit_threshold": abstain, "broad_threshold": broad, "broad_k": broad_k}
    cfg = TaskRouterConfig(**chosen)
    report = {}
    for name, key in (("tuning_half", "tuning"), ("unseen", "unseen"), ("zoo", "zoo")):
        groups = prompts_of(split[key], "validation", REPORT_PROMPTS)
        texts = [p for ps in groups.values() for p in ps]
        decided = [str(r.decision) for r in TaskRouter(reg, cfg).route(texts, 3)]
        report[name] = {d: decided.count(d) / len(decided) for d in Decision}
    sets = {
        "chat tuning set (in the background)": [c["prompt"] for c in read_chat_tuning()],
        "everyday (reporting only)": [e["prompt"] for e in read_everyday()],
    }
    for name, texts in sets.items():
        decided = [str(r.decision) for r in TaskRouter(reg, cfg).route(texts, 3)]
        report[name] = {d: decided.count(d) / len(decided) for d in Decision}
    print(chosen)
    print_table([{"prompts": k, **v} for k, v in report.items()], ["prompts", *Decision])
    return {
        "chosen": chosen,
        "rules": {"in_zoo_kept": IN_ZOO_KEPT, "sure_kept": SURE_KEPT, "broad_recall": BROAD_RECALL},
        "zoo_validation_fit_percentiles_1_5_50": np.percentile(fit, [1, 5, 50]).tolist(),
        "decisions_on_validation": report,
    }


# neighbours among the shipped background (2,090 rows); a tuning fold's smaller background
# takes as many in proportion (`_neighbours_among`), so a pair tuned there covers as much
# of the background as it does shipped
GAIN_NEIGHBOURS = (10, 20, 40, 80, 160, 320)
NEVER_HELPED = 1.01  # a threshold above any gain: never compose below fit_threshold
GAIN_THRESHOLDS = (*(round(0.05 * i, 2) for i in range(1, 13)), NEVER_HELPED)
CHAT_HELPED_MAX = 0.02  # chat tuning prompts that may compose on the gain of their neighbours
TASK_HARM_MAX = 0.05  # the bound on a task's loss to base, held on the tuning half


def measured_gains(split: dict) -> dict[str, dict]:
    """task -> its validation prompts' rights under base and composed (`gains`), and the gain."""
    out = {}
    for task in split["tuning"]:
        if task_file("gains", task).exists():
            rows = json.loads(task_file("gains", task).read_text())["prompts"]
            base, composed = _acc(rows, "base"), _acc(rows, "auto")
            out[task] = {"base": base, "composed": composed, "gain": composed - base}
            out[task] |= {"prompts": len(rows), "rows": rows}
    return out


def knn_gain(Q: np.ndarray, vectors: np.ndarray, gains: np.ndarray, m: int) -> np.ndarray:
    """The mean gain of each query's m nearest rows (as TaskRouter._gain)."""
    m = min(m, len(vectors))
    return gains[np.argpartition(-(Q @ vectors.T), m - 1, axis=1)[:, :m]].mean(1)


def _neighbours_among(m: int, rows: int, shipped: int) -> int:
    """m neighbours among `shipped` background rows, as many in proportion among `rows`."""
    return max(1, round(m * rows / shipped))


def tune_gains(reg: Registry, split: dict) -> dict:
    """gain_neighbours and gain_threshold, cross-fitted by task on the tuning half: a fold's
    validation prompts get their fit from a background of the other fold (and the chat set)
    and their gain estimate from the other fold's measured gains; the pair that answers
    most of them right wins, among those that compose at most CHAT_HELPED_MAX of the chat
    tuning prompts (each scored without its own kind's rows) and cost no tuning task more
    than TASK_HARM_MAX against never composing below fit_threshold (NEVER_HELPED is one of
    the pairs, so one always qualifies). Ties: the higher threshold. gain_neighbours counts
    neighbours among the shipped background; a fold's background, about half of it, is
    searched for as many in proportion."""
    measured = measured_gains(split)
    zoo = load_zoo(reg)
    cfg = TaskRouterConfig()
    rows = [json.loads(ln) for ln in BACKGROUND_PATH.read_text().splitlines() if ln.strip()]
    tasks = np.array([r["task"] for r in rows])
    vectors, _ = background_of(reg, sorted({t for t in tasks if t[:5] != "chat/"}))
    row_gain = np.array([measured.get(t, {}).get("gain", 0.0) for t in tasks], np.float32)

    def estimate(Q: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """(len(GAIN_NEIGHBOURS), len(Q)): gain estimates from the background rows kept."""
        n, shipped = int(keep.sum()), len(tasks)
        return np.stack(
            [
                knn_gain(Q, vectors[keep], row_gain[keep], _neighbours_among(m, n, shipped))
                for m in GAIN_NEIGHBOURS
            ]
        )

    held = []  # per tuning prompt: (task, abstains, right under base, composed, estimates)
    for f, fold in enumerate(tuning_folds(split)):
        others = [t for t in tuning_folds(split)[1 - f] if t in measured]
        keep = np.isin(tasks, others) | np.char.startswith(tasks.astype(str), "chat/")
        ctx = make_context(zoo, (vectors[keep], tasks[keep]))
        for task in (t for t in fold if t in measured):
            limit = measured[task]["prompts"]  # a file measured under another GAIN_PROMPTS
            texts = [ex.input for ex in load_task(task).splits().validation[:limit]]
            Q = embed(reg, texts)
            fit = 1.0 - _probs(ctx.with_none_balanced, Q)[:, -1]
            est = estimate(Q, keep)
            got = {r["prompt"]: r for r in measured[task]["rows"]}
            for i, text in enumerate(texts):
                r = got[text[:200]]
                held.append((task, fit[i] < cfg.fit_threshold, r["base"], r["auto"], est[:, i]))
    task_of, abstains, base, composed = (np.array(c) for c in list(zip(*held, strict=True))[:4])
    estimates = np.stack([e for *_, e in held], axis=1)  # (len(GAIN_NEIGHBOURS), prompts)
    names, which = np.unique(task_of, return_inverse=True)
    never = np.where(abstains, base, composed).astype(float)
    chat = read_chat_tuning()
    Qc = embed(reg, [c["prompt"] for c in chat])
    chat_est = np.concatenate(
        [estimate(Qc[i : i + 1], tasks != f"chat/{c['kind']}") for i, c in enumerate(chat)], 1
    )
    grid = []
    for j, m in enumerate(GAIN_NEIGHBOURS):
        for tau in GAIN_THRESHOLDS:
            helped = abstains & (estimates[j] >= tau)
            right = np.where(helped, composed, never)
            per_task = np.bincount(which, right - never) / np.bincount(which)
            grid.append(
                {
                    "gain_neighbours": m,
                    "gain_threshold": tau,
                    "tuning_right": float(right.mean()),
                    "tuning_helped": float(helped.mean()),
                    "chat_helped": float(np.mean(chat_est[j] >= tau)),
                    "tuning_worst_task": [str(names[per_task.argmin()]), float(per_task.min())],
                }
            )
    allowed = [
        g
        for g in grid
        if g["chat_helped"] <= CHAT_HELPED_MAX and g["tuning_worst_task"][1] >= -TASK_HARM_MAX
    ]
    best = max(allowed, key=lambda g: (round(g["tuning_right"], 6), g["gain_threshold"]))
    never = float(never.mean())
    chosen = {k: best[k] for k in ("gain_neighbours", "gain_threshold")}
    print(chosen, f"tuning right {best['tuning_right']:.4f} vs {never:.4f} never composing")
    ship = {t: {k: v for k, v in g.items() if k != "rows"} for t, g in sorted(measured.items())}
    BACKGROUND_GAINS.write_text(
        json.dumps(
            {
                "rule": "per tuning-half task, its first prompts_per_task validation prompts: "
                "right under auto with abstention off (composed) minus right under the base "
                "model",
                "prompts_per_task": sorted({g["prompts"] for g in measured.values()}),
                "tasks": ship,
            },
            indent=1,
        )
        + "\n"
    )
    return {
        "chosen": chosen,
        "rule": tune_gains.__doc__,
        "tuning_prompts": len(held),
        "tuning_prompts_abstaining": int(abstains.sum()),
        "tuning_right_never_composing_below_threshold": never,
        "grid": grid,
    }


# -- end to end --------------------------------------------------------------------------------

# The run and the gains each take longer than a session: each task's result lands in the
# repository as it ends, so that another machine continues where one stopped.
RUN_CACHE = RESULTS / "openworld" / "run"
GAINS = RESULTS / "openworld" / "gains"
# group -> (split key, test prompts per task, methods, composed only). The reporting half
# answers only what auto composes for (elsewhere auto is the base model, see run_task), so
# it affords 30 prompts per task, as UNSEEN (compared with the committed crosstask run's
# uniform on the same 30) and 10 per zoo task (with the committed run's auto)
GROUPS = {
    "reporting": ("reporting", 30, ("base", "auto"), True),
    "zoo": ("zoo", 10, ("auto",), False),
    "unseen": ("unseen", 30, ("auto",), False),
}
ZOO_ROUTING_PROMPTS = 30  # per zoo task, routing only: the top-1 figure


def run_task(
    hub: Hub,
    task: str,
    limit: int,
    methods: tuple[str, ...],
    on: str = "test",
    composed_only: bool = False,
) -> dict:
    """Per prompt: the auto decision, its score and whether each method was right.
    composed_only: only the prompts auto composes for are answered (by every method); a
    prompt auto sends to the base model is answered by the base model under both, the same
    forward: its `vs_base` is 0 by construction, recorded as `same`."""
    cfg = EvalConfig(protocol="iid", limit=limit, on=on)
    examples = getattr(load_task(task).splits(), on)[:limit]
    routed = hub.route([ex.input for ex in examples], cfg.k, "mixture")
    rows = [
        {
            "prompt": ex.input[:200],
            "decision": str(r.decision),
            "fit": r.confidence,
            "adapters": list(r.adapters),
            "weights": list(r.weights),
        }
        for ex, r in zip(examples, routed, strict=True)
    ]
    todo = [i for i, r in enumerate(routed) if r.adapters or not composed_only]
    items = [Item(task, examples[i], None) for i in todo]
    given = {"base": [Routing()] * len(todo), "auto": [routed[i] for i in todo]}
    with torch.inference_mode():
        for method in methods:
            right = score_items(hub, items, cfg, routings=given[method])
            for i, ok in zip(todo, right, strict=True):
                rows[i][method] = ok
    for i in set(range(len(rows))) - set(todo):
        rows[i]["same"] = True
    return {"task": task, "limit": limit, "prompts": rows}


def run_everyday(hub: Hub, max_new_tokens: int = 32) -> list[dict]:
    items = read_everyday()
    prompts = [e["prompt"] for e in items]
    auto = hub.route(prompts, 3, "mixture")
    answers = {
        "auto": hub.generate(prompts, routings=auto, max_new_tokens=max_new_tokens),
        "base": hub.generate(prompts, compose="none", max_new_tokens=max_new_tokens),
    }
    out = []
    for i, (e, r) in enumerate(zip(items, auto, strict=True)):
        row = e | {"decision": str(r.decision), "fit": r.confidence, "adapters": list(r.adapters)}
        row |= {"weights": list(r.weights)}
        for method, got in answers.items():
            text = got[i].text
            ok = None if e["accept"] is None else bool(re.search(e["accept"], text, re.I))
            row |= {f"{method}_answer": text, method: ok}
        out.append(row)
    return out


def cached(path: Path, make: Callable[[], object]) -> object:
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
    return value


def task_file(group: str, task: str) -> Path:
    folder = GAINS if group == "gains" else RUN_CACHE / group
    return folder / f"{task.replace('/', '__')}.json"


def ordered(split: dict, key: str) -> list[str]:
    """A group's tasks in a seeded order, so a run cut short has done a random subset."""
    tasks = list(split[key])
    random.Random(SEED).shuffle(tasks)
    return tasks


def routed_as(hub: Hub, prompts: list[str], rows: list[dict]) -> bool:
    """Whether the hub routes `prompts` as cached `rows` say (adapters and weights): a
    cached answer stands only for the routing it was made under."""
    now = hub.route(prompts, 3, "mixture")
    return len(rows) == len(prompts) and all(
        r.get("weights") is not None
        and r["adapters"] == list(n.adapters)
        and np.allclose(r["weights"], n.weights, atol=1e-6)
        for r, n in zip(rows, now, strict=True)
    )


def cached_unless_rerouted(path: Path, hub: Hub, prompts: list[str], make: Callable) -> None:
    if path.exists():
        rows = json.loads(path.read_text())
        if not routed_as(hub, prompts, rows if isinstance(rows, list) else rows["prompts"]):
            path.unlink()
    cached(path, make)


def run(split: dict) -> None:
    """Everyday, UNSEEN, zoo, then the reporting half, each task cached as it ends (and run
    again if the router now routes its prompts otherwise)."""
    reg = open_registry()
    hub = Hub.open(registry=reg, base_model=DEFAULT_MODEL)
    fetch_bigbench(split["reporting"] + split["zoo"] + split["unseen"])
    everyday = [e["prompt"] for e in read_everyday()]
    cached_unless_rerouted(RUN_CACHE / "everyday.json", hub, everyday, lambda: run_everyday(hub))
    for group in ("unseen", "zoo", "reporting"):
        key, limit, methods, composed_only = GROUPS[group]
        for task in ordered(split, key):
            prompts = [ex.input for ex in load_task(task).splits().test[:limit]]
            cached_unless_rerouted(
                task_file(group, task),
                hub,
                prompts,
                lambda task=task, limit=limit, methods=methods, only=composed_only: run_task(
                    hub, task, limit, methods, composed_only=only
                ),
            )
            print(f"{group}: {task}", flush=True)
    cached(RUN_CACHE / "zoo_routing.json", lambda: zoo_routing(hub, split))
    hub.close()
    reg.close()


def zoo_routing(hub: Hub, split: dict) -> dict[str, list[list[str]]]:
    """task -> the adapters auto picks for each of its first ZOO_ROUTING_PROMPTS test prompts."""
    out = {}
    for task in split["zoo"]:
        prompts = [ex.input for ex in load_task(task).splits().test[:ZOO_ROUTING_PROMPTS]]
        out[task] = [list(r.adapters) for r in hub.route(prompts, 3, "mixture")]
    return out


# validation prompts per tuning-half task, base and composed: 8 at first, whose gains moved by
# one prompt (0.125) between two runs of the same router on 16 of 80 tasks
GAIN_PROMPTS = 24


def measure_gains(split: dict) -> None:
    """Per tuning-half task, on its validation prompts: right under the base model and under
    `auto` with abstention off (the task router's top 3 by weight, what `auto` would compose
    had it not abstained). Cached per task: a restart continues."""
    reg = open_registry()
    never_abstain = TaskRouterConfig(fit_threshold=-1.0, broad_threshold=-1.0)
    hub = Hub(reg, load_base_model(DEFAULT_MODEL), TaskRouter(reg, never_abstain))
    fetch_bigbench(split["tuning"])
    for task in ordered(split, "tuning"):
        path = task_file("gains", task)
        if path.exists() and json.loads(path.read_text())["limit"] != GAIN_PROMPTS:
            path.unlink()  # measured on fewer prompts: measured again
        cached(
            path,
            lambda task=task: run_task(hub, task, GAIN_PROMPTS, ("base", "auto"), "validation"),
        )
        print(f"gains: {task}", flush=True)
    hub.close()
    reg.close()


def collect(split: dict) -> dict:
    """What the run has cached so far."""
    groups = {
        group: [
            json.loads(task_file(group, t).read_text())
            for t in split[key]
            if task_file(group, t).exists()
        ]
        for group, (key, *_) in GROUPS.items()
    }
    every, routing = RUN_CACHE / "everyday.json", RUN_CACHE / "zoo_routing.json"
    return {
        "zoo_routing": json.loads(routing.read_text()) if routing.exists() else {},
        "limits": {g: v[1] for g, v in GROUPS.items()},
        "tasks_run": {g: f"{len(groups[g])} of {len(split[GROUPS[g][0]])}" for g in GROUPS},
        "groups": groups,
        "everyday": json.loads(every.read_text()) if every.exists() else [],
    }


def fewer_tasks(result: dict, committed: dict) -> list[str]:
    """The groups for which `result` holds fewer tasks than the committed e2e.json."""
    done = committed.get("groups", {})
    return [g for g in GROUPS if len(result["groups"].get(g, [])) < len(done.get(g, []))]


def _committed(run: str, method: str) -> dict[tuple[str, str], bool]:
    """(task, prompt[:200]) -> right, from a committed crosstask run (same test prompts)."""
    data = json.loads((RESULTS / "crosstask" / run / "results.json").read_text())
    return {(r["task"], r["prompt"]): r["right"] for r in data["routings"] if r["method"] == method}


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def _acc(rows: list[dict], key: str) -> float:
    return _mean([bool(r[key]) for r in rows])


def _macro(tasks: list[dict], key: str) -> float:
    return _mean([_acc(t["prompts"], key) for t in tasks])


def _gap(task: dict) -> float:
    """auto - base over the task's prompts (0 where auto sent a prompt to the base model)."""
    return _mean([0 if r.get("same") else int(r["auto"]) - int(r["base"]) for r in task["prompts"]])


def summarize(result: dict) -> dict:
    """Per group: accuracies, decisions, better/worse than base; the issue's targets (a
    target whose group has not run yet is NaN and unmet)."""
    groups = result["groups"]
    owners = {e["task"]: e["name"] for e in read_manifest()}
    before = {"zoo": _committed("iid", "auto"), "unseen": _committed("ood_unseen", "uniform")}
    for t in groups["zoo"]:
        for r in t["prompts"]:
            r["auto_before"] = before["zoo"][(t["task"], r["prompt"])]
            r["routed_own"] = r["adapters"][:1] == [owners[t["task"]]]
    for t in groups["unseen"]:
        for r in t["prompts"]:
            r["uniform"] = before["unseen"][(t["task"], r["prompt"])]
    rep = groups["reporting"]
    for t in rep:
        for r in t["prompts"]:
            r["vs_base"] = 0 if r.get("same") else int(r["auto"]) - int(r["base"])
    worst = min(rep, key=_gap, default=None)
    decisions = {
        g: {d: _mean([r["decision"] == d for t in tasks for r in t["prompts"]]) for d in Decision}
        for g, tasks in groups.items()
    }
    every = result["everyday"]
    checked = [e for e in every if e["accept"] is not None]
    readme = next((e for e in every if e["prompt"] == README_EXAMPLE), None)
    diag_file = RESULTS / "openworld" / "diagnostic.json"
    diag = json.loads(diag_file.read_text()) if diag_file.exists() else {"reporting": {}}
    nan = float("nan")
    chosen = diag["reporting"].get(
        "none class, balanced (1 - p_none)", {"auroc_reporting": nan, "auroc_everyday": nan}
    )
    top1 = _mean(
        [
            picked[:1] == [owners[task]]
            for task, routed in result["zoo_routing"].items()
            if owners[task] not in CONFUSABLE
            for picked in routed
        ]
    )
    m = {
        "reporting_auto_minus_base": _mean([_gap(t) for t in rep]),
        "reporting_worst_task": [worst["task"], _gap(worst)] if worst else None,
        "reporting_prompts_better_worse_than_base": [
            sum(r["vs_base"] > 0 for t in rep for r in t["prompts"]),
            sum(r["vs_base"] < 0 for t in rep for r in t["prompts"]),
        ],
        "zoo_auto": _macro(groups["zoo"], "auto"),
        "zoo_auto_before": _macro(groups["zoo"], "auto_before"),
        "zoo_routing_top1_distinguishable": top1,
        "unseen_auto": _macro(groups["unseen"], "auto"),
        "unseen_uniform": _macro(groups["unseen"], "uniform"),
        "everyday_to_base": _mean([e["decision"] == "base" for e in every]),
        "everyday_auto_right": _acc(checked, "auto"),
        "everyday_base_right": _acc(checked, "base"),
        "readme_example": {k: readme[k] for k in ("auto_answer", "auto", "decision")}
        if readme
        else None,
        "decisions": decisions,
        "auroc_reporting": chosen["auroc_reporting"],
        "auroc_everyday": chosen["auroc_everyday"],
    }
    targets = [
        target("auroc_zoo_vs_reporting_half", m["auroc_reporting"], 0.95, ">="),
        target("everyday_routed_to_base", m["everyday_to_base"], 0.90, ">="),
        target("reporting_auto_minus_base", m["reporting_auto_minus_base"], 0.0, ">="),
        target("reporting_worst_task_vs_base", _gap(worst) if worst else nan, -0.05, ">="),
        target("zoo_iid_auto_over_before", m["zoo_auto"] / m["zoo_auto_before"], 0.98, ">="),
        target("zoo_iid_routing_top1_distinguishable", top1, 0.95, ">="),
        target("unseen_auto_minus_uniform", m["unseen_auto"] - m["unseen_uniform"], 0.05, ">="),
        target("readme_example_right", float(bool(readme["auto"])) if readme else nan, 1.0, ">="),
    ]
    for t in targets:
        if not t["met"] and t["name"] in WHY_UNMET:
            t["why"] = WHY_UNMET[t["name"]](groups)
        print(
            f"target {t['name']}: {t['value']:.4g} (goal {t['op']} {t['goal']}) "
            f"{'met' if t['met'] else 'NOT MET'}"
        )
    return {"machine": machine(), "measured": m, "targets": targets, **result}


def _decisions(prompts: list[dict]) -> str:
    return ", ".join(f"{d} {n}" for d, n in Counter(r["decision"] for r in prompts).most_common())


def _why_worst_task(groups: dict) -> str:
    worst = min(groups["reporting"], key=_gap)
    composed = [r for t in groups["reporting"] for r in t["prompts"] if r["decision"] != "base"]
    return (
        f"{worst['task']}: its {len(worst['prompts'])} prompts went {_decisions(worst['prompts'])};"
        f" {sum(r['vs_base'] < 0 for r in worst['prompts'])} answered worse than the base"
        f" model, {sum(r['vs_base'] > 0 for r in worst['prompts'])} better. Over the reporting"
        f" half the {len(composed)} composed prompts came out"
        f" {sum(r['vs_base'] > 0 for r in composed)} better and"
        f" {sum(r['vs_base'] < 0 for r in composed)} worse than the base model"
    )


def _why_zoo(groups: dict) -> str:
    rows = [r for t in groups["zoo"] for r in t["prompts"]]
    lost = [r for r in rows if r["auto_before"] and not r["auto"]]
    won = sum(r["auto"] and not r["auto_before"] for r in rows)
    return (
        f"{len(lost)} of the {len(rows)} zoo test prompts ({len(groups['zoo'])} tasks) right"
        f" before the open-world decision are wrong with it ({_decisions(lost)}), {won} the"
        f" other way; one prompt is {1 / len(rows):.2%} of the macro accuracy"
    )


def _why_unseen(groups: dict) -> str:
    def gap(t: dict) -> float:
        return _acc(t["prompts"], "auto") - _acc(t["prompts"], "uniform")

    return "auto - uniform per task: " + "; ".join(
        f"{t['task']} {gap(t):+.2f} ({_decisions(t['prompts'])})"
        for t in sorted(groups["unseen"], key=gap)
    )


# why an unmet target is unmet, from the run's own prompts (the README says what it means)
WHY_UNMET: dict[str, Callable[[dict], str]] = {
    "reporting_worst_task_vs_base": _why_worst_task,
    "zoo_iid_auto_over_before": _why_zoo,
    "unseen_auto_minus_uniform": _why_unseen,
}


def open_registry() -> Registry:
    reg = Registry(REGISTRY, embedder=SentenceEmbedder())
    register_zoo(reg)
    return reg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "step",
        choices=[
            "split",
            "background",
            "diagnose",
            "tune",
            "gains",
            "tune-gains",
            "examples",
            "run",
            "summary",
        ],
    )
    args = ap.parse_args()
    if args.step == "split":
        SPLIT.parent.mkdir(parents=True, exist_ok=True)
        SPLIT.write_text(json.dumps(make_split(), indent=1) + "\n")
        print(f"wrote {SPLIT}")
    elif args.step == "background":
        write_background(read_split())
    elif args.step == "run":
        run(read_split())
    elif args.step == "gains":
        measure_gains(read_split())
    elif args.step == "tune-gains":
        reg = open_registry()
        out = RESULTS / "openworld" / "tune_gains.json"
        result = tune_gains(reg, read_split())
        out.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
        print(f"wrote {out}")
        reg.close()
    elif args.step == "summary":
        result = collect(read_split())
        out = RESULTS / "openworld" / "e2e.json"
        short = fewer_tasks(result, json.loads(out.read_text()) if out.exists() else {})
        if short:
            raise SystemExit(
                f"the run cache {RUN_CACHE} holds fewer tasks than {out} for {short} (a new "
                "machine?): run `openworld.py run` first; not overwriting"
            )
        out.write_text(json.dumps(summarize(result), indent=1) + "\n")
        print(f"wrote {out}")
    elif args.step == "examples":
        reg = open_registry()
        rows = examples_needed(reg, read_split())
        print_table(rows, [*rows[0]])
        out = RESULTS / "openworld" / "examples.json"
        rule = examples_needed.__doc__
        out.write_text(
            json.dumps({"machine": machine(), "rule": rule, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {out}")
        reg.close()
    elif args.step == "tune":
        reg = open_registry()
        result = tune(reg, read_split())
        out = RESULTS / "openworld" / "tune.json"
        out.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
        print(f"wrote {out}")
        reg.close()
    else:
        reg = open_registry()
        result = diagnose(reg, read_split())
        for half, table in (("tuning", result["tuning"]), ("reporting", result["reporting"])):
            print(f"-- {half} half")
            print_table(
                [{"score": k, **v} for k, v in table.items()],
                ["score", *next(iter(table.values()))],
            )
        out = RESULTS / "openworld" / "diagnostic.json"
        out.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
        print(f"wrote {out}")
        reg.close()


if __name__ == "__main__":
    main()
