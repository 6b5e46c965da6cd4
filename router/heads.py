"""Routing over thousands of adapters: per-class linear heads that are fitted one at a time,
and a faiss shortlist of candidate adapters.

The task router's classifier is one multinomial logistic regression over every adapter;
adding an adapter refits all of them, and each prompt is scored against all of them. Past
`TaskRouterConfig.candidates` adapters the router switches to what this module holds:

- heads of a Gaussian classifier with one shared covariance (linear discriminant analysis):
  a class's head (w, b) = (P mu, -mu.P mu / 2) reads only the class's own mean mu and the
  shared precision P, which comes from the background's tasks (fixed data). Adding or
  removing an adapter computes or drops one head; the others do not move;
- the background's tasks are classes too; P(none) is the mass on them;
- a shortlist: the `candidates` adapters whose example centroids are nearest the prompt
  (faiss inner product: exact below `hnsw_above` adapters, HNSW above), then the heads are
  read for the shortlist only;
- prototypes: a head reads only its adapter's mean, and siblings (4- and 5-digit addition)
  have nearly the same mean. Each adapter also keeps up to `prototypes` k-means centres of
  its examples; a candidate's closeness to a prompt (the mean cosine of its `nearest`
  prototypes, less the same for its own examples) adds `prototype_weight` nats a unit to
  its head's logit when candidates are ranked and weighed. P(none) reads the heads alone,
  so the open-world decision does not move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from router.classifier import matmul

# fewer queries than this are searched on one thread: on a loaded 2-core machine a single
# query took 2 ms on one thread and 17 ms with faiss's OpenMP team (HNSW, 10,000 centroids)
SERIAL_BELOW = 8


@dataclass(frozen=True)
class ShortlistConfig:
    """candidates: adapters scored per prompt; hnsw_above: pool size from which the
    centroid index is HNSW (approximate, sublinear) instead of exact; hnsw_m and
    ef_search: HNSW's graph degree and search breadth (faiss's usual 32 and a wide 128);
    shrink: weight of the mean variance in the shared covariance (keeps 384 dimensions
    invertible from a background of ~2,000 inputs); prototypes, nearest and
    prototype_weight: see the module docstring (0: the heads alone). The weight was chosen
    on the zoo's validation prompts beside 1,000 distractors, as the one whose smallest
    gain over the heads alone, whether the zoo's adapters carry all their examples or 16,
    is largest (benchmarks/tune_heads.py, results/tune_heads.json)."""

    candidates: int = 64
    hnsw_above: int = 4096
    hnsw_m: int = 32
    ef_search: int = 128
    shrink: float = 0.1
    prototypes: int = 16
    nearest: int = 3
    prototype_weight: float = 300.0

    def __post_init__(self) -> None:
        counts = (self.candidates, self.hnsw_above, self.hnsw_m, self.prototypes, self.nearest)
        if min(counts) <= 0:
            raise ValueError(
                "candidates, hnsw_above, hnsw_m, prototypes and nearest must be positive"
            )
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink is in (0, 1], got {self.shrink}")
        if self.prototype_weight < 0:
            raise ValueError(f"prototype_weight must be >= 0, got {self.prototype_weight}")


def shared_precision(vectors: np.ndarray, groups: np.ndarray, shrink: float) -> np.ndarray:
    """(N, d) vectors labelled by (N,) groups -> (d, d) inverse of their pooled
    within-group covariance, shrunk toward its mean variance."""
    centred = vectors.astype(np.float64)
    for g in np.unique(groups):
        rows = groups == g
        centred[rows] -= centred[rows].mean(0)
    cov = centred.T @ centred / max(len(vectors) - len(np.unique(groups)), 1)
    d = cov.shape[0]
    target = np.trace(cov) / d * np.eye(d)
    return np.linalg.inv((1.0 - shrink) * cov + shrink * target)


def heads(precision: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d, d) precision, (C, d) class means -> coef (C, d) and intercept (C,): the log
    density of each class up to a term shared by all."""
    coef = means.astype(np.float64) @ precision
    return coef.astype(np.float32), (-0.5 * (coef * means).sum(1)).astype(np.float32)


def background_heads(
    precision: np.ndarray, vectors: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The background's tasks ((N, d) vectors, (N,) task labels) as classes of the same
    model, their prior shared so that `none` weighs as much as one adapter (as in the
    balanced classifier): coef (B, d), intercept (B,)."""
    labels = np.unique(groups)
    coef, intercept = heads(precision, np.stack([vectors[groups == g].mean(0) for g in labels]))
    return coef, intercept - np.float32(np.log(len(labels)))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)).astype(np.float32)


def prototypes(vectors: np.ndarray, m: int, iters: int = 20) -> np.ndarray:
    """(n, d) unit example vectors -> (min(n, m), d) unit prototypes: spherical k-means
    started from m evenly spaced examples (deterministic); the examples themselves when
    there are no more than m."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
    if len(x) <= m:
        return x.numpy()
    centres = x[torch.linspace(0, len(x) - 1, m).round().long()]
    for _ in range(iters):
        nearest = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        norms = sums.norm(dim=1, keepdim=True)
        centres = torch.where(norms > 0, sums / norms.clamp(min=1e-12), centres)
    return centres.numpy()


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


@dataclass(frozen=True)
class Summary:
    """What the table keeps of one adapter's (n, d) example vectors: their mean, up to m
    prototypes zero-padded to (m, d) with their mask (m,), and `typical`, the closeness of
    its own examples to its prototypes (what a prompt's closeness is measured against)."""

    mean: np.ndarray
    prototypes: np.ndarray
    mask: np.ndarray
    typical: float

    @classmethod
    def of(cls, examples: np.ndarray, m: int, nearest: int) -> Summary:
        made = prototypes(examples, m)
        padded = np.zeros((m, examples.shape[1]), np.float32)
        padded[: len(made)] = made
        mask = np.arange(m) < len(made)
        own = adapter_fit(
            torch.from_numpy(np.ascontiguousarray(examples, np.float32)),
            torch.from_numpy(padded)[None],
            torch.from_numpy(mask)[None],
            nearest,
        )
        return cls(examples.mean(0), padded, mask, float(own.mean()))


@dataclass
class HeadTable:
    """The adapters' heads, centroids and prototypes, changed one adapter at a time. `key`
    per adapter names what its head was made from (its examples), so an unchanged adapter
    is kept. `fitted` counts heads computed since creation: the evidence that a change fits
    only what changed. Prototypes are kept in float16 (12 KB an adapter)."""

    precision: np.ndarray
    config: ShortlistConfig = field(default_factory=ShortlistConfig)
    names: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    intercept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    prototypes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float16))
    prototype_mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    typical: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    fitted: int = 0
    _index: faiss.Index | None = None

    def sync(self, keys: dict[str, str], examples_of: Callable[[str], np.ndarray]) -> None:
        """Make the table hold exactly the adapters of `keys` (name -> key): a head and
        prototypes only for a new or changed adapter (`examples_of(name)`: its (n, d) unit
        example vectors), removed ones dropped, the others kept as they are."""
        old = dict(zip(self.names, self.keys, strict=True))
        keep = [i for i, n in enumerate(self.names) if keys.get(n) == old[n]]
        kept = {self.names[i] for i in keep}
        new = [n for n in keys if n not in kept]
        d, m = self.precision.shape[0], self.config.prototypes
        made = [Summary.of(examples_of(n), m, self.config.nearest) for n in new]
        fresh = np.stack([s.mean for s in made]) if new else np.zeros((0, d), np.float32)
        coef, intercept = heads(self.precision, fresh)
        self.fitted += len(new)
        index = self._index if len(keep) == len(self.names) else None  # only additions
        self.restore(
            [self.names[i] for i in keep] + new,
            [self.keys[i] for i in keep] + [keys[n] for n in new],
            {
                "coef": np.concatenate([self.coef.reshape(-1, d)[keep], coef]),
                "intercept": np.concatenate([self.intercept[keep], intercept]),
                "centroids": np.concatenate([self.centroids.reshape(-1, d)[keep], unit(fresh)]),
                "prototypes": np.concatenate(
                    [
                        self.prototypes.reshape(-1, m, d)[keep],
                        np.array([s.prototypes for s in made], np.float16).reshape(-1, m, d),
                    ]
                ),
                "prototype_mask": np.concatenate(
                    [
                        self.prototype_mask.reshape(-1, m)[keep],
                        np.array([s.mask for s in made], bool).reshape(-1, m),
                    ]
                ),
                "typical": np.concatenate(
                    [self.typical[keep], np.array([s.typical for s in made], np.float32)]
                ),
            },
        )
        if index is not None and isinstance(index, self._kind()):
            index.add(unit(fresh))  # HNSW grows in place; a removal rebuilds it
            self._index = index

    def restore(
        self,
        names: list[str],
        keys: list[str],
        tensors: dict[str, np.ndarray],
        index: faiss.Index | None = None,
    ) -> None:
        """Hold `names` (with their keys), their tensors (`TABLE_TENSORS`), and the
        centroids' index if one was kept (else it is built on first use)."""
        self.names, self.keys = list(names), list(keys)
        for name in TABLE_TENSORS:
            setattr(self, name, tensors[name])
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = self.config.ef_search
        self._index = index

    def _kind(self) -> type:
        hnsw = len(self.names) > self.config.hnsw_above
        return faiss.IndexHNSWFlat if hnsw else faiss.IndexFlatIP

    def index(self) -> faiss.Index:
        if self._index is None:
            d = self.precision.shape[0]
            cfg = self.config
            if len(self.names) > cfg.hnsw_above:
                index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efSearch = cfg.ef_search
            else:
                index = faiss.IndexFlatIP(d)
            index.add(self.centroids)
            self._index = index
        return self._index

    def shortlist(self, queries: np.ndarray) -> np.ndarray:
        """(P, d) unit queries -> (P, K) indices of the K nearest centroids (K =
        min(candidates, pool)); every adapter when the pool is no larger than K."""
        n, k = len(self.names), min(self.config.candidates, len(self.names))
        if n <= self.config.candidates:
            return np.tile(np.arange(n), (len(queries), 1))
        threads = faiss.omp_get_max_threads()
        if len(queries) < SERIAL_BELOW:  # faiss splits work by query: threads only wait
            faiss.omp_set_num_threads(1)
        try:
            _, ids = self.index().search(np.ascontiguousarray(queries, np.float32), k)
        finally:
            faiss.omp_set_num_threads(threads)
        return ids

    def logits(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(P, d) queries, (P, K) candidate indices -> (P, K) head logits."""
        w = self.coef[candidates]  # (P, K, d)
        return np.einsum("pd,pkd->pk", queries, w) + self.intercept[candidates]

    def closeness(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(P, d) unit queries, (P, K) candidate indices -> (P, K): the mean cosine of each
        candidate's `nearest` nearest prototypes, less its `typical`. One prompt at a
        time: a batch's gathered prototypes would be P x K x 24 KB."""
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
        out = np.empty(candidates.shape, np.float32)
        for p, row in enumerate(candidates):
            protos = torch.from_numpy(self.prototypes[row]).float()
            mask = torch.from_numpy(self.prototype_mask[row])
            out[p] = adapter_fit(q[p : p + 1], protos, mask, self.config.nearest)[0].numpy()
        return out - self.typical[candidates]


TABLE_TENSORS = ("coef", "intercept", "centroids", "prototypes", "prototype_mask", "typical")


def score(
    table: HeadTable, none: tuple[np.ndarray, np.ndarray], queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, d) unit queries -> candidates (P, K), their probabilities (P, K) (renormalized
    over the candidates) and P(none) (P,). P(none) is the background's mass in one softmax
    of the shortlisted adapters' heads and the background's (`background_heads`); the
    candidates' probabilities add their closeness to their heads' logits."""
    cand = table.shortlist(queries)
    z = table.logits(queries, cand).astype(np.float64)  # (P, K)
    z_none = (matmul(queries, none[0].T) + none[1]).astype(np.float64)  # (P, B)
    # heads' logits span hundreds of nats: normalize in log space, never exp a raw sum
    lse, lse_none = np.logaddexp.reduce(z, axis=1), np.logaddexp.reduce(z_none, axis=1)
    p_none = np.exp(-np.logaddexp(0.0, lse - lse_none))
    weight = table.config.prototype_weight
    if weight:
        z = z + weight * table.closeness(queries, cand)
    return cand, np.exp(z - np.logaddexp.reduce(z, axis=1)[:, None]), p_none
