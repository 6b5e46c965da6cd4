"""Task-level routing in the spirit of LoRAuter (arXiv 2601.21795): an adapter stands for
its task through the set of its task's example inputs, not their mean.

Three things are read from those sets:
- which adapter: a linear classifier (logistic regression) over the example embeddings of
  all adapters, fitted when the catalogue changes and cached; its probabilities, over the
  top k, are the mixture weights. On the zoo's validation prompts it routes the
  input-distinguishable tasks right 95.5% of the time, against 92.1% for the nearest mean
  embedding (LoraRetriever), since a boundary between two tasks' example clouds separates
  them where their means sit close (benchmarks/tune_router.py);
- whether any adapter fits at all: the `fit`, that is `Routing.confidence`. By default
  (`FitScore.background`) the classifier has one more class, `none`, learned from
  example inputs of tasks no adapter was made for (router/data/background.jsonl: the
  tuning half of the open-world split and a chat-shaped tuning set), and the fit is
  1 - P(none). The older score,
  `FitScore.neighbours` (the mean cosine of the prompt's nearest examples of the best
  adapter), measures how alike two short strings look, not whether a task fits: greetings,
  gibberish and emoji fit the zoo better than its own prompts do. Ranking zoo prompts above
  other tasks' prompts (reporting half, test), 1 - P(none) scores AUROC 0.99, the older
  score 0.94 (`benchmarks/openworld.py diagnose`). Below `fit_threshold` the routing is
  empty, the base model answers, and `Routing.note` says why. Between `fit_threshold` and
  `broad_threshold` the router is unsure which adapter fits: asked for a mixture (k > 1),
  it mixes its `broad_k` most probable adapters with equal weights instead of betting on
  the top k by weight; asked for one adapter (selection), it still picks one.
- whether composing helps anyway: "no adapter's task" is not "nothing helps" (a
  subtraction prompt beside the addition adapters is helped by them). Each background task
  carries its measured gain of composing over the base model (router/data/
  background-gains.json: accuracy on its validation prompts, `auto` with abstention off
  minus base). Below `fit_threshold`, a prompt whose `gain_neighbours` nearest background
  inputs average a gain >= `gain_threshold` gets the top k anyway, and its note says
  `helped`; LoRAuter's helpfulness estimate from a measured adapter-by-task matrix, kept to
  the one decision the router cannot make from similarity alone.

At scale (more adapters than `shortlist.candidates`, background fit) the one classifier
gives way to per-adapter heads scored over a faiss shortlist (router/heads.py), the likeliest
few re-scored under their own examples' spread: adding an adapter fits its head (and keeps
its spread) only, each prompt reads `candidates` heads, and the heads are cached
in the registry by the catalogue's content, so a restart does not recompute them. Up to
`candidates` adapters (the zoo's 24) the decision is the classifier's, exactly as above.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import faiss
import numpy as np
import torch

from registry import Registry
from registry.embedding import examples_key, meta_texts
from router.background import (
    background_gains,
    background_tasks,
    background_texts,
    shipped_vectors,
)
from router.classifier import fit_linear, matmul, softmax_rows
from router.heads import (
    TENSORS,
    HeadTable,
    ShortlistConfig,
    background_heads,
    score,
    shared_precision,
)
from router.routing import Decision, Routing


class FitScore(StrEnum):
    """How the router measures whether any adapter fits a prompt (`Routing.confidence`)."""

    background = "background"  # 1 - P(none): the classifier's background class
    neighbours = "neighbours"  # the mean cosine of the best adapter's nearest examples


@dataclass(frozen=True)
class TaskRouterConfig:
    """k: adapters per prompt; neighbours: nearest examples of an adapter averaged into its
    neighbour fit; fit: the score `fit_threshold` and `broad_threshold` read; fit_threshold:
    fit below which no adapter is used (-1 = always compose); broad_threshold: fit below
    which the `broad_k` most probable adapters (at most the caller's k) are mixed equally
    when the caller asks for more than one (<= fit_threshold: never); C: the classifier's
    inverse regularization; gain_neighbours / gain_threshold: when composing anyway below fit_threshold (below);
    shortlist: how a pool larger than `shortlist.candidates` is routed (router/heads.py)."""

    k: int = 3
    neighbours: int = 5
    fit: FitScore = FitScore.background
    # chosen on the zoo's validation prompts with the background (tuning half + chat
    # tuning set): abstain keeps 99% of them, 95% keep their top k, and the 3 likeliest
    # hold the own adapter of 95% of those in between (benchmarks/openworld.py tune,
    # results/openworld/tune.json)
    fit_threshold: float = 0.94
    broad_threshold: float = 0.98
    broad_k: int = 3
    # below fit_threshold, compose the top k anyway where the prompt's `gain_neighbours`
    # nearest background inputs come from tasks that composing helped by >= gain_threshold
    # on average (router/data/background-gains.json, 24 validation prompts a task; > 1:
    # never); chosen on the tuning half by task-wise cross-fitting over its 121 tasks (a
    # fold's half-size background searched for as many neighbours in proportion), among
    # pairs that cost no tuning task more than 5 points: 0.253 of their validation prompts
    # right against 0.249 never composing below fit_threshold, 1.8% of them composed, 1 of
    # 154 chat tuning prompts (benchmarks/openworld.py tune-gains,
    # results/openworld/tune_gains.json)
    gain_neighbours: int = 160
    gain_threshold: float = 0.5
    C: float = 100.0  # benchmarks/tune_router.py, results/tune_router.json (validation)
    shortlist: ShortlistConfig = field(default_factory=ShortlistConfig)

    def __post_init__(self) -> None:
        counts = (self.k, self.neighbours, self.broad_k, self.gain_neighbours)
        if min(counts) <= 0:
            raise ValueError(
                f"k, neighbours, broad_k and gain_neighbours must be positive, got {counts}"
            )
        if self.fit not in set(FitScore):
            raise ValueError(f"unknown fit {self.fit!r}; choose from {[f.value for f in FitScore]}")
        object.__setattr__(self, "fit", FitScore(self.fit))
        for name in ("fit_threshold", "broad_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a score in [-1, 1], got {getattr(self, name)}")
        if self.C <= 0:
            raise ValueError(f"C must be > 0, got {self.C}")


@dataclass(frozen=True)
class _Tasks:
    """The catalogue as the router reads it: names, example vectors (A, M, d) zero-padded
    with their mask (A, M), and the classifier (coef (A [+1 none], d), intercept) when it
    has two classes or more; at scale instead, the adapters' heads and the background's
    (coef (B, d), intercept (B,))."""

    names: list[str]
    vectors: torch.Tensor
    mask: torch.Tensor
    coef: np.ndarray | None
    intercept: np.ndarray | None
    table: HeadTable | None = None
    none_heads: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Scores:
    """Per prompt: the adapters' classifier probabilities prob (P, A) (renormalized over
    the adapters), P(none) (P,) (zeros without a background) and, when the fit reads them,
    the neighbour fits (P, A). At scale, `candidates` (P, K) are the adapters scored per
    prompt (prob is 0 elsewhere); None: every adapter. `gain` (P,): the measured gain of
    composing on the tasks of the prompt's nearest background inputs (None: no background)."""

    names: list[str]
    prob: np.ndarray
    p_none: np.ndarray
    neighbour: np.ndarray | None
    candidates: np.ndarray | None = None
    gain: np.ndarray | None = None


# fit of one prompt: (its scores row, allowed adapter indices) -> the decision's score.
# 1 - P(none) does not depend on exclusions: it says whether the prompt is any registered
# adapter's task, and an excluded adapter's task still belongs to the catalogue.
FITS: dict[FitScore, Callable[[Scores, int, list[int]], float]] = {
    FitScore.background: lambda s, row, allowed: 1.0 - float(s.p_none[row]),
    FitScore.neighbours: lambda s, row, allowed: float(s.neighbour[row, allowed].max()),
}


# example inputs an adapter should carry: the thresholds were tuned on the zoo's (256 an
# adapter, two with 34); with fewer, fewer of an adapter's own prompts clear fit_threshold
# (benchmarks/openworld.py examples, results/openworld/examples.json)
EXAMPLES_ADVISED = 32
HEADS_FORMAT = 3  # the cached head tables' layout (3: each adapter's whitened spread kept)
# cache key prefixes in the registry; writing a new entry removes the others under its prefix
HEADS_CACHE, CLASSIFIER_CACHE = "task-heads-", "task-router-"
_BACKGROUND_VECTORS: dict[str, torch.Tensor] = {}  # examples key -> (N, d), per process


class TaskRouter:
    """Routes by each adapter's example set (see the module docstring). Adapters without
    examples are represented by their description."""

    def __init__(self, registry: Registry, config: TaskRouterConfig | None = None) -> None:
        if registry.embedder is None:
            raise ValueError("the task router needs a registry opened with an embedder")
        self.registry = registry
        self.config = config or TaskRouterConfig()
        self._memo: tuple[int, str, _Tasks] | None = None
        self._table: HeadTable | None = None

    @property
    def _background(self) -> tuple[str, ...]:
        return background_texts() if self.config.fit == FitScore.background else ()

    def _tasks(self) -> _Tasks:
        """The catalogue's example vectors and classifier, rebuilt only when the adapters,
        their examples or the background change (vectors and fit are also cached in the
        registry, keyed by embedder and texts)."""
        generation = self.registry.generation()
        if self._memo is not None and self._memo[0] == generation:
            return self._memo[2]
        embedder = self.registry.embedder
        metas = {r.name: r.meta for r in self.registry.list() if meta_texts(r.meta)}
        keys = {name: examples_key(embedder, meta_texts(meta)) for name, meta in metas.items()}
        key = hashlib.sha256(f"{self.config.C!r}".encode())
        for name, examples in keys.items():
            key.update(f"{name}\0{examples}\0".encode())
        if self._background:
            key.update(f"none\0{examples_key(embedder, self._background)}".encode())
        stamp = key.hexdigest()[:32]
        if self._memo is None or self._memo[1] != stamp:
            at_scale = self._background and len(metas) > self.config.shortlist.candidates
            tasks = self._at_scale(metas, keys, stamp) if at_scale else self._exact(metas, stamp)
            self._memo = (generation, stamp, tasks)
        self._memo = (generation, *self._memo[1:])
        return self._memo[2]

    def _exact(self, metas: dict, stamp: str) -> _Tasks:
        blocks = {
            name: torch.from_numpy(self.registry.example_vectors(meta)).float()
            for name, meta in metas.items()
        }
        names = list(blocks)
        width = max((len(b) for b in blocks.values()), default=0)
        dim = next(iter(blocks.values())).shape[1] if blocks else 0
        vectors = torch.zeros(len(names), width, dim)
        mask = torch.zeros(len(names), width, dtype=torch.bool)
        for i, block in enumerate(blocks.values()):
            vectors[i, : len(block)] = block
            mask[i, : len(block)] = True
        coef = intercept = None
        classes = [*blocks.values(), *([self._background_vectors()] if self._background else [])]
        if names and len(classes) >= 2:
            fit = self.registry.cached_tensors(
                f"{CLASSIFIER_CACHE}{stamp}", lambda: self._fit(classes), replaces=CLASSIFIER_CACHE
            )
            coef, intercept = fit["coef"].numpy(), fit["intercept"].numpy()
        return _Tasks(names, vectors, mask, coef, intercept)

    def _at_scale(self, metas: dict, keys: dict[str, str], stamp: str) -> _Tasks:
        """Per-adapter heads: restored from the registry's cache when this catalogue was
        seen before, else synced one adapter at a time (only new or changed ones fitted)."""
        cfg = self.config.shortlist
        bg, groups = self._background_vectors().numpy(), np.asarray(background_tasks())
        if self._table is None:
            self._table = HeadTable(shared_precision(bg, groups, cfg.shrink), cfg)
        table, names = self._table, list(metas)

        def fitted() -> dict[str, torch.Tensor]:
            table.sync(keys, lambda n: self.registry.example_vectors(metas[n]))
            pos = {n: i for i, n in enumerate(names)}
            index = faiss.serialize_index(table.index())  # HNSW takes seconds to build
            return {k: torch.from_numpy(getattr(table, k)) for k in TENSORS} | {
                "rows": torch.tensor([pos[n] for n in table.names]),
                "index": torch.from_numpy(index),
            }

        family = self._heads_family()
        made = self.registry.cached_tensors(family + stamp, fitted, replaces=HEADS_CACHE)
        held = [names[i] for i in made["rows"].tolist()]
        if table.names != held or table.keys != [keys[n] for n in held]:  # a cache hit
            tensors = {k: made[k].numpy() for k in TENSORS}
            index = faiss.deserialize_index(made["index"].numpy())
            table.restore(held, [keys[n] for n in held], tensors, index)
        none = background_heads(table.precision, bg, groups)
        return _Tasks(table.names, torch.zeros(0), torch.zeros(0), None, None, table, none)

    def _heads_family(self) -> str:
        """The cache key prefix of this router's head tables: everything they are made of
        but the catalogue. A new table replaces every other (only the latest is read, and
        one is about 310 MB at 10,000 adapters): a table of an older format or another
        config would stay on disk for ever; a router made otherwise fits its own again."""
        cfg, embedder = self.config.shortlist, self.registry.embedder
        made_of = (HEADS_FORMAT, embedder.id, self.config.C, cfg.shrink, cfg.rank)
        made_of += (cfg.hnsw_above, cfg.hnsw_m)
        made_of += (examples_key(embedder, self._background),)
        return f"{HEADS_CACHE}{hashlib.sha256(repr(made_of).encode()).hexdigest()[:16]}-"

    def _background_vectors(self) -> torch.Tensor:
        """Shipped for the default embedder; else embedded once per process and registry
        cache, keyed by embedder and texts."""
        texts = list(self._background)
        key = examples_key(self.registry.embedder, texts)
        if key not in _BACKGROUND_VECTORS:
            shipped = shipped_vectors(key)  # the default embedder's, made once for everyone
            if shipped is None:
                made = self.registry.cached_tensors(
                    key, lambda: {"vectors": torch.from_numpy(self.registry.embedder.encode(texts))}
                )
                shipped = made["vectors"].float()
            _BACKGROUND_VECTORS[key] = shipped
        return _BACKGROUND_VECTORS[key]

    def _fit(self, classes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One class per adapter (and the background last): balanced, so a class's weight
        does not grow with its number of examples."""
        X = torch.cat(classes).numpy()
        labels = np.concatenate([np.full(len(b), i) for i, b in enumerate(classes)])
        coef, intercept = fit_linear(X, labels, self.config.C, balanced=bool(self._background))
        return {"coef": torch.from_numpy(coef), "intercept": torch.from_numpy(intercept)}

    def scores(self, prompts: Sequence[str]) -> Scores:
        tasks = self._tasks()
        n, a = len(prompts), len(tasks.names)
        if not a or not prompts:
            return Scores(tasks.names, np.zeros((n, a), np.float32), np.zeros(n, np.float32), None)
        queries = self.registry.embedder.encode(list(prompts))
        scores = self._scores(tasks, queries)
        return replace(scores, gain=self._gain(queries)) if self._background else scores

    def _gain(self, queries: np.ndarray) -> np.ndarray:
        """(P, d) unit queries -> (P,): the mean measured gain of composing over the tasks
        of each query's `gain_neighbours` nearest background inputs."""
        vectors = self._background_vectors().numpy()
        gains = np.asarray(background_gains(), np.float32)
        m = min(self.config.gain_neighbours, len(vectors))
        nearest = np.argpartition(-matmul(queries, vectors.T), m - 1, axis=1)[:, :m]
        return gains[nearest].mean(1)

    def _scores(self, tasks: _Tasks, queries: np.ndarray) -> Scores:
        n, a = len(queries), len(tasks.names)
        if tasks.table is not None:
            return _scaled_scores(tasks, queries)
        neighbour = None
        if self.config.fit == FitScore.neighbours:
            neighbour = adapter_fit(
                torch.from_numpy(queries).float(), tasks.vectors, tasks.mask, self.config.neighbours
            ).numpy()
        if tasks.coef is None:  # one adapter, no background: it is the only choice
            return Scores(
                tasks.names, np.ones((n, a), np.float32), np.zeros(n, np.float32), neighbour
            )
        prob = softmax_rows(matmul(queries, tasks.coef.T) + tasks.intercept)
        p_none = prob[:, a] if prob.shape[1] > a else np.zeros(n, np.float32)
        prob = prob[:, :a] / prob[:, :a].sum(1, keepdims=True)
        return Scores(tasks.names, prob, p_none, neighbour)

    def route(
        self,
        prompts: Sequence[str],
        k: int | None = None,
        exclude_each: Sequence[Sequence[str]] | None = None,
    ) -> list[Routing]:
        k = k or self.config.k
        if exclude_each is not None and len(exclude_each) != len(prompts):
            raise ValueError("exclude_each needs one list per prompt")
        live = [i for i, p in enumerate(prompts) if p.strip()]
        scores = self.scores([prompts[i] for i in live])
        names = scores.names
        out = [Routing(note="empty prompt")] * len(prompts)
        for row, i in enumerate(live):
            banned = set(exclude_each[i]) if exclude_each is not None else set()
            pool = range(len(names)) if scores.candidates is None else scores.candidates[row]
            allowed = [int(j) for j in pool if names[j] not in banned]
            if not allowed:
                out[i] = Routing(note="no adapter to route to")
                continue
            fit = FITS[self.config.fit](scores, row, allowed)
            gain = None if scores.gain is None else float(scores.gain[row])
            out[i] = self._weigh(names, allowed, fit, gain, scores.prob[row], k)
        return out

    def _weigh(
        self,
        names: list[str],
        allowed: list[int],
        fit: float,
        gain: float | None,
        prob: np.ndarray,
        k: int,
    ) -> Routing:
        cfg = self.config
        order = sorted(allowed, key=lambda j: -prob[j])
        if fit < cfg.fit_threshold and gain is not None and gain >= cfg.gain_threshold:
            note = (
                f"helped: {cfg.fit} fit {fit:.3f} < {cfg.fit_threshold:.3f}, but composing "
                f"helped the nearest tasks without an adapter by {gain:+.2f} "
                f"(>= {cfg.gain_threshold:.2f})"
            )
            return _weighted(names, order[:k], prob, fit, note, Decision.helped)
        if fit < cfg.fit_threshold:
            return Routing(
                confidence=fit,
                note=f"no adapter fits: {cfg.fit} fit {fit:.3f} < {cfg.fit_threshold:.3f}",
            )
        if fit < cfg.broad_threshold and k > 1:
            top = order[: min(k, cfg.broad_k)]
            return Routing(
                tuple(names[j] for j in top),
                tuple([1.0 / len(top)] * len(top)),
                tuple(float(prob[j]) for j in top),
                confidence=fit,
                note=f"unsure: {cfg.fit} fit {fit:.3f} < {cfg.broad_threshold:.3f}, "
                f"the {len(top)} likeliest adapters mixed equally",
                decision=Decision.broad,
            )
        return _weighted(names, order[:k], prob, fit)


def _weighted(
    names: list[str],
    top: list[int],
    prob: np.ndarray,
    fit: float,
    note: str = "",
    decision: Decision = Decision.adapters,
) -> Routing:
    """The `top` adapters weighted by their probabilities, renormalized."""
    total = float(prob[top].sum()) or 1.0
    return Routing(
        tuple(names[j] for j in top),
        tuple(float(prob[j]) / total for j in top),
        tuple(float(prob[j]) for j in top),
        confidence=fit,
        note=note,
        decision=decision,
    )


def _scaled_scores(tasks: _Tasks, queries: np.ndarray) -> Scores:
    cand, prob_cand, p_none = score(tasks.table, tasks.none_heads, queries)
    prob = np.zeros((len(queries), len(tasks.names)), np.float32)
    np.put_along_axis(prob, cand, prob_cand.astype(np.float32), 1)
    return Scores(tasks.names, prob, p_none, None, cand)


def adapter_fit(
    queries: torch.Tensor, vectors: torch.Tensor, mask: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """(P, d) unit queries, (A, M, d) unit example vectors with mask (A, M) -> (P, A): the
    mean cosine of each adapter's `neighbours` nearest examples (fewer if it has fewer)."""
    sims = torch.einsum("pd,amd->pam", queries, vectors).masked_fill(~mask, float("-inf"))
    m = min(neighbours, vectors.shape[1])
    top = sims.topk(m, dim=2).values  # (P, A, m), -inf where an adapter has < m examples
    counts = mask.sum(1).clamp(max=m)  # (A,)
    return top.where(top.isfinite(), torch.zeros(())).sum(2) / counts
