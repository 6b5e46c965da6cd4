"""Cross-task evaluation: protocols, methods, metrics with bootstrap intervals, reports.

Protocols (LoraRetriever, Zhao et al. 2024; LoraHub, Huang et al. 2023):
  iid     -- one shuffled stream of prompts from all tasks; every adapter may be chosen;
  ood     -- the same, but each prompt's own-task adapter is excluded;
  fewshot -- per task, `shots` examples learn a composition of `candidates` adapters
             (LoraHub weights, or learned per-token gates), evaluated on the held-out rest;
             own-task adapters are excluded as in ood.
Methods: base, oracle (own adapter; iid), selection (k=1), mixture (k), fusion (k) -- these
three by LoraRetriever, the baseline -- auto (the hub's own router, mixture of k: what
`Hub`, the CLI and the server do by default), uniform (all adapters, equal weights; in
fewshot the candidates), arrow (per-token, data-free), lorahub and gated (fewshot only).
Prompts come from one split of each task (`Task.splits`, the zoo's): `test` to report,
`validation` to tune; fewshot's shots come from `train`. No zoo adapter was trained on, nor
kept or tuned by, what is reported.
Metrics: `em` (normalized exact match, generative tasks), `mc_acc` (option log-likelihood,
multiple-choice tasks), `routing_top1` / `routing_topk` (own adapter routed, iid).

results.json schema:
  {"protocol", "config", "seeds",
   "tasks":   {task: {method: {metric: {"value", "ci_low", "ci_high", "n"}}}},
   "summary": {method: {metric: macro average over tasks}},
   "routings": [{"task", "prompt", "method", "adapters": [...], "right", "confidence"}],
   "fewshot": {"candidates": [...], "tasks": {task: {method: {...what was learned}}}}}
   (the last for the fewshot protocol only)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

import numpy as np
import torch
from tqdm import tqdm

from lorahub import inference
from lorahub.applied import Applied, attached
from lorahub.gating import GateConfig, train_gate
from lorahub.hub import Hub
from lorahub.learn import LoraHubConfig, learn_weights
from lorahub.tasks import Example, SplitConfig, Task, TaskKind
from router import ArrowConfig, Retriever, Routing


class Protocol(StrEnum):
    iid = "iid"
    ood = "ood"
    fewshot = "fewshot"


METHODS = (
    "base",
    "oracle",
    "selection",
    "mixture",
    "fusion",
    "auto",
    "uniform",
    "arrow",
    "lorahub",
    "gated",
)
ROUTED = ("base", "selection", "mixture", "fusion", "auto", "uniform", "arrow")
LEARNED = ("lorahub", "gated")  # learn a composition per task from its shots
# protocol -> (default methods, methods it allows)
PROTOCOL_METHODS = {
    Protocol.iid: (("base", "oracle", *ROUTED[1:]), ("oracle", *ROUTED)),
    Protocol.ood: (ROUTED, ROUTED),
    Protocol.fewshot: (("base", "uniform", "auto", *LEARNED), (*ROUTED, *LEARNED)),
}


@dataclass(frozen=True)
class EvalConfig:
    """limit: prompts per task, taken from its `on` split (test: report; validation:
    tune) of `split`. shots / candidates: fewshot's examples per task (from train) and
    adapters to compose (a seeded sample of the registry, 20 as in LoraHub)."""

    protocol: Protocol = Protocol.iid
    methods: tuple[str, ...] | None = None  # default: PROTOCOL_METHODS
    k: int = 3
    limit: int | None = 50
    on: str = "test"
    split: SplitConfig = field(default_factory=SplitConfig)
    shots: int = 5
    candidates: int = 20
    lorahub: LoraHubConfig = field(default_factory=LoraHubConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    max_new_tokens: int = 16
    batch_size: int = 32
    n_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        default, allowed = PROTOCOL_METHODS[Protocol(self.protocol)]
        methods = tuple(self.methods) if self.methods is not None else default
        bad = [m for m in methods if m not in allowed]
        if bad:
            raise ValueError(
                f"methods {bad} do not apply to the {self.protocol} protocol; "
                f"choose from {list(allowed)}"
            )
        object.__setattr__(self, "methods", methods)
        if self.on not in ("validation", "test"):
            raise ValueError(f"evaluate on 'validation' or 'test', not {self.on!r}")


@dataclass
class Item:
    """One prompt of the evaluation stream."""

    task: str
    example: Example
    own: str | None  # the adapter trained on this task, if any
    right: dict[str, bool] = field(default_factory=dict)
    routed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    confidence: dict[str, float | None] = field(default_factory=dict)


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


def build_stream(tasks: Sequence[Task], owners: dict[str, str], cfg: EvalConfig) -> list[Item]:
    """Every task's held-out prompts (at most `limit`), shuffled into one stream."""
    items = [
        Item(t.name, ex, owners.get(t.name))
        for t in tasks
        for ex in getattr(t.splits(cfg.split), cfg.on)[: cfg.limit]
    ]
    random.Random(cfg.seed).shuffle(items)
    return items


def candidate_names(hub: Hub, tasks: Sequence[Task], cfg: EvalConfig) -> list[str]:
    """fewshot: a seeded sample of `candidates` adapters, none trained on an evaluated task."""
    own = {own_adapters(hub).get(t.name) for t in tasks}
    names = [n for n in hub.registry.names() if n not in own]
    return sorted(random.Random(cfg.seed).sample(names, min(cfg.candidates, len(names))))


def _routings_for(
    hub: Hub, method: str, items: list[Item], cfg: EvalConfig, candidates: list[str]
) -> list[Routing]:
    """Per-item routings of a routed method."""
    prompts = [it.example.input for it in items]
    exclude_each = (
        [[it.own] if it.own else [] for it in items] if cfg.protocol != Protocol.iid else None
    )
    names = candidates or hub.registry.names()
    pools = [[n for n in names if n not in (ex or [])] for ex in exclude_each or [[]] * len(items)]
    retriever = Retriever(hub.registry)

    def baseline(k: int) -> list[Routing]:
        return retriever.route(prompts, k, exclude_each=exclude_each)

    table: dict[str, Callable[[], list[Routing]]] = {
        "base": lambda: [Routing()] * len(items),
        "oracle": lambda: [Routing((it.own,), (1.0,)) if it.own else Routing() for it in items],
        "selection": lambda: [r.top(1) for r in baseline(1)],
        "mixture": lambda: baseline(cfg.k),
        "fusion": lambda: baseline(cfg.k),
        "auto": lambda: hub.route(prompts, cfg.k, "mixture", exclude_each=exclude_each),
        "uniform": lambda: [_prior(pool) for pool in pools],
        # Arrow is data-free: each prompt's pool, gated per token inside the pass
        "arrow": lambda: [replace(_prior(pool), per_token=ArrowConfig()) for pool in pools],
    }
    return table[method]()


def _prior(names: list[str]) -> Routing:
    return Routing(tuple(names), tuple([1.0 / len(names)] * len(names))) if names else Routing()


def score_items(
    hub: Hub,
    items: list[Item],
    cfg: EvalConfig,
    compose: str = "mixture",
    routings: list[Routing] | None = None,
    applied: Applied | None = None,
) -> list[bool]:
    """Right or wrong per item through `Hub.score` (MC: option log-likelihood) and
    `Hub.generate` (exact match), under `routings` or an `applied` composition."""
    mc = [i for i, it in enumerate(items) if it.example.answer is not None]
    gen = [i for i, it in enumerate(items) if it.example.answer is None]
    right = [False] * len(items)

    def given(rows: list[int]) -> dict:
        return {
            "compose": compose,
            "routings": [routings[i] for i in rows] if routings is not None else None,
            "applied": applied,
            "batch_size": cfg.batch_size,
        }

    if mc:
        scores = hub.score(
            [items[i].example.input for i in mc],
            [items[i].example.options for i in mc],
            **given(mc),
        )
        for i, s in zip(mc, scores, strict=True):
            right[i] = int(np.argmax(s)) == items[i].example.answer
    if gen:
        answers = hub.generate(
            [items[i].example.input for i in gen], max_new_tokens=cfg.max_new_tokens, **given(gen)
        )
        for i, a in zip(gen, answers, strict=True):
            right[i] = inference.exact_match(a.text, items[i].example.targets)
    return right


def lorahub_starts(hub: Hub, names: list[str], shots: list[Example]) -> dict[str, list[float]]:
    """Where LoraHub's search may start besides w = 0: the uniform average of `names` and
    the router's weights for the shots (averaged over them, restricted to `names`)."""
    others = [n for n in hub.registry.names() if n not in set(names)]
    routed = hub.route([ex.input for ex in shots], k=len(names), exclude=others)
    retrieval = [sum(r.as_dict().get(n, 0.0) for r in routed) / len(shots) for n in names]
    return {"uniform": [1.0 / len(names)] * len(names), "retrieval": retrieval}


def _learn_lorahub(hub: Hub, names: list[str], shots: list[Example], n: int, cfg: EvalConfig):
    """LoraHub weights from the shots, searched from the best of (0, uniform, retrieval);
    the merged adapter alone is then applied."""
    adapters = [hub.adapters.get(x) for x in names]
    starts = lorahub_starts(hub, names, shots)
    result = learn_weights(
        hub.base, adapters, shots, cfg.lorahub, progress=False, starts=list(starts.values())
    )
    info = {
        "starts": starts,
        "weights": dict(zip(names, result.weights, strict=True)),
        "objective": result.objective,
        "evaluations": len(result.history),
        "seconds": round(result.seconds, 1),
    }
    return attached(hub.base.model, [result.adapter], ["lorahub"], torch.ones(n, 1)), info


def _learn_gated(hub: Hub, names: list[str], shots: list[Example], n: int, cfg: EvalConfig):
    """Per-token gates over the candidates, trained on the shots."""
    adapters = [hub.adapters.get(x) for x in names]
    result = train_gate(hub.base, adapters, shots, cfg.gate, progress=False)
    info = {
        "first_loss": result.losses[0],
        "final_loss": result.losses[-1],
        "seconds": round(result.seconds, 1),
    }
    return attached(hub.base.model, adapters, names, token_gate=result.gate), info


# Methods learned task by task: (hub, adapter names, shots, prompts, cfg) -> (context that
# yields the `Applied` composition, what was learned).
PER_TASK = {"lorahub": _learn_lorahub, "gated": _learn_gated}


def _per_task(
    hub: Hub,
    method: str,
    tasks: Sequence[Task],
    items: list[Item],
    pool: list[str],
    cfg: EvalConfig,
) -> dict[str, dict]:
    """Score a per-task method; returns {task: what was learned}. Outside iid, a task's own
    adapter is left out of the pool."""
    learned = {}
    for task in tqdm(tasks, disable=len(tasks) < 2, desc=method, leave=False):
        mine = [it for it in items if it.task == task.name]
        names = [
            n for n in pool if cfg.protocol == Protocol.iid or n not in {it.own for it in mine}
        ]
        shots = task.splits(cfg.split).train[: cfg.shots]
        context, info = PER_TASK[method](hub, names, shots, len(mine), cfg)
        learned[task.name] = {**info, "shots": [ex.input for ex in shots]}
        with context as applied, torch.inference_mode():
            right = score_items(hub, mine, cfg, applied=applied)
        for it, ok in zip(mine, right, strict=True):
            it.right[method], it.routed[method] = ok, tuple(names)
    return learned


def evaluate(
    hub: Hub,
    tasks: Sequence[Task],
    cfg: EvalConfig = EvalConfig(),
    progress: bool = True,
    seen: dict | None = None,
) -> dict:
    """Run every method of `cfg` over the shuffled stream of `tasks`; the results dict.
    `seen` (a dict the caller keeps across calls) remembers each (prompt, routing) scored,
    so methods and runs that route a prompt alike score it once."""
    items = build_stream(tasks, own_adapters(hub), cfg)
    fewshot = cfg.protocol == Protocol.fewshot
    candidates = candidate_names(hub, tasks, cfg) if fewshot else []
    learned: dict[str, dict] = {t.name: {} for t in tasks}
    seen = {} if seen is None else seen
    for method in tqdm(cfg.methods, disable=not progress, desc=f"eval {cfg.protocol}"):
        if method in PER_TASK:
            pool = candidates or hub.registry.names()
            for task, info in _per_task(hub, method, tasks, items, pool, cfg).items():
                learned[task][method] = info
            continue
        compose = "fusion" if method == "fusion" else "mixture"
        with torch.inference_mode():
            routings = _routings_for(hub, method, items, cfg, candidates)
            keys = [_key(it, r, compose, cfg) for it, r in zip(items, routings, strict=True)]
            todo = list({k: i for i, k in enumerate(keys) if k not in seen}.values())
            right = score_items(
                hub, [items[i] for i in todo], cfg, compose, [routings[i] for i in todo]
            )
        seen.update({keys[i]: ok for i, ok in zip(todo, right, strict=True)})
        for it, key, r in zip(items, keys, routings, strict=True):
            it.right[method], it.routed[method] = seen[key], r.adapters
            it.confidence[method] = r.confidence
    results = report_dict(items, list(cfg.methods), tasks, cfg)
    if fewshot:
        results["fewshot"] = {"candidates": candidates, "tasks": learned}
    return results


def _key(item: Item, routing: Routing, compose: str, cfg: EvalConfig) -> tuple:
    """What decides an item's answer under a routed method."""
    ex = item.example
    weights = tuple(round(w, 6) for w in routing.weights)
    return (
        ex.input,
        ex.options,
        ex.targets,
        compose,
        routing.adapters,
        weights,
        routing.per_token,
        cfg.max_new_tokens,
    )


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
            for m in ("selection", "mixture", "auto"):
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
        {
            "task": it.task,
            "prompt": it.example.input[:200],
            "method": m,
            "adapters": list(r),
            "right": it.right[m],
            "confidence": it.confidence.get(m),
        }
        for it in items
        for m, r in it.routed.items()
    ]
    return {
        "protocol": str(cfg.protocol),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
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
