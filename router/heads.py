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
  read for the shortlist only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

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
    invertible from a background of ~2,000 inputs)."""

    candidates: int = 64
    hnsw_above: int = 4096
    hnsw_m: int = 32
    ef_search: int = 128
    shrink: float = 0.1

    def __post_init__(self) -> None:
        if self.candidates <= 0 or self.hnsw_above <= 0 or self.hnsw_m <= 0:
            raise ValueError("candidates, hnsw_above and hnsw_m must be positive")
        if not 0.0 < self.shrink <= 1.0:
            raise ValueError(f"shrink is in (0, 1], got {self.shrink}")


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


@dataclass
class HeadTable:
    """The adapters' heads and centroids, changed one adapter at a time. `key` per adapter
    names what its head was made from (its examples), so an unchanged adapter is kept.
    `fitted` counts heads computed since creation: the evidence that a change fits only
    what changed."""

    precision: np.ndarray
    config: ShortlistConfig = field(default_factory=ShortlistConfig)
    names: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    intercept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    fitted: int = 0
    _index: faiss.Index | None = None

    def sync(self, keys: dict[str, str], mean_of: Callable[[str], np.ndarray]) -> None:
        """Make the table hold exactly the adapters of `keys` (name -> key): a head only
        for a new or changed adapter (`mean_of(name)`: its (d,) mean example vector),
        removed ones dropped, the others kept as they are."""
        old = dict(zip(self.names, self.keys, strict=True))
        keep = [i for i, n in enumerate(self.names) if keys.get(n) == old[n]]
        kept = {self.names[i] for i in keep}
        new = [n for n in keys if n not in kept]
        d = self.precision.shape[0]
        fresh = np.stack([mean_of(n) for n in new]) if new else np.zeros((0, d), np.float32)
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
        """Hold `names` (with their keys), their coef, intercept and centroids, and the
        centroids' index if one was kept (else it is built on first use)."""
        self.names, self.keys = list(names), list(keys)
        self.coef, self.intercept = tensors["coef"], tensors["intercept"]
        self.centroids = tensors["centroids"]
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


def score(
    table: HeadTable, none: tuple[np.ndarray, np.ndarray], queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, d) unit queries -> candidates (P, K), their probabilities (P, K) (renormalized
    over the candidates) and P(none) (P,): the shortlisted adapters' heads and the
    background's (`background_heads`) in one softmax, P(none) the background's mass."""
    cand = table.shortlist(queries)
    z = table.logits(queries, cand).astype(np.float64)  # (P, K)
    z_none = (matmul(queries, none[0].T) + none[1]).astype(np.float64)  # (P, B)
    # heads' logits span hundreds of nats: normalize in log space, never exp a raw sum
    lse, lse_none = np.logaddexp.reduce(z, axis=1), np.logaddexp.reduce(z_none, axis=1)
    return cand, np.exp(z - lse[:, None]), np.exp(-np.logaddexp(0.0, lse - lse_none))
