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
- a local re-scoring of the heads' `rescore` likeliest candidates. One covariance for every
  class cannot tell apart siblings whose means nearly coincide (4- and 5-digit addition):
  they differ along directions in which their own examples spread. The candidates' own
  spread (each adapter's `rank` main directions in the whitened coordinates where LDA
  compares, and the rest of its spread's trace, spread evenly) is pooled and shrunk toward
  the shared covariance, the more the fewer examples it comes from, and the candidates
  are scored again by LDA under it (`local_logits`). They keep the probability mass the
  heads gave them: P(none) and the decision do not move, only the order among them. With
  few examples the shrinkage leaves the heads nearly as they were; the gain is where
  adapters carry many. Chosen on the zoo's validation prompts beside 1,000 distractors,
  with the zoo's examples also thinned, to see what adapters with few examples lose
  (benchmarks/tune_rescore.py, results/tune_rescore.json).
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
    invertible from a background of ~2,000 inputs); rescore: the heads' likeliest
    candidates re-scored under their own pooled spread (< 2: none); rank: main directions
    of each adapter's spread kept; local_shrink, local_prior: the pooled spread of n
    examples is shrunk toward the shared covariance with weight
    max(local_shrink, local_prior / (local_prior + n))."""

    candidates: int = 64
    hnsw_above: int = 4096
    hnsw_m: int = 32
    ef_search: int = 128
    shrink: float = 0.1
    # benchmarks/tune_rescore.py, results/tune_rescore.json (validation, systems up to
    # 128-square): top-1 +4.4 points beside 1,000 distractors, +0.8 on average over eight
    # cells (zoo beside the distractors or alone, examples as registered or thinned), -0.1
    # in the worst
    rescore: int = 8
    rank: int = 16
    local_shrink: float = 0.5
    local_prior: float = 512.0

    def __post_init__(self) -> None:
        if self.candidates <= 0 or self.hnsw_above <= 0 or self.hnsw_m <= 0:
            raise ValueError("candidates, hnsw_above and hnsw_m must be positive")
        if self.rescore < 0 or self.rank <= 0 or self.local_prior < 0:
            raise ValueError("rescore and local_prior must be >= 0 and rank positive")
        for name in ("shrink", "local_shrink"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is in (0, 1], got {getattr(self, name)}")


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


def spread(examples: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """(n, d) examples -> (rank, d) F whose F^T F is the best rank-`rank` approximation of
    their scatter about their mean (zero rows past its rank), and the trace of the
    scatter that F leaves out. From the eigenvectors of the smaller Gram matrix of the
    centred examples: (n, n) when n < d, else (d, d)."""
    centred = examples.astype(np.float64) - examples.mean(0, dtype=np.float64)
    out = np.zeros((rank, examples.shape[1]))
    if len(centred) < centred.shape[1]:
        _, vectors = np.linalg.eigh(matmul(centred, centred.T))  # ascending
        top = matmul(vectors[:, ::-1][:, :rank].T.copy(), centred)  # no negative stride
    else:
        values, vectors = np.linalg.eigh(matmul(centred.T, centred))
        top = np.sqrt(values[::-1][:rank].clip(min=0))[:, None] * vectors[:, ::-1][:, :rank].T
    out[: len(top)] = top
    return out, max(float((centred**2).sum() - (top**2).sum()), 0.0)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)).astype(np.float32)


TENSORS = ("coef", "intercept", "centroids", "whitened", "spread", "leftover", "counts")


@dataclass
class HeadTable:
    """The adapters' heads and centroids, changed one adapter at a time. `key` per adapter
    names what its head was made from (its examples), so an unchanged adapter is kept.
    `fitted` counts heads computed since creation: the evidence that a change fits only
    what changed. Per adapter, in the shared covariance's whitened coordinates (`root`):
    its mean (`whitened`, (A, d)), the main directions of its examples' spread
    (`spread`, (A, rank, d), see `spread`) and the trace of the spread they leave out
    (`leftover`, (A,)); `counts` its number of examples."""

    precision: np.ndarray
    config: ShortlistConfig = field(default_factory=ShortlistConfig)
    names: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    coef: np.ndarray = field(init=False)
    intercept: np.ndarray = field(init=False)
    centroids: np.ndarray = field(init=False)
    whitened: np.ndarray = field(init=False)
    spread: np.ndarray = field(init=False)
    leftover: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    fitted: int = 0
    _index: faiss.Index | None = None
    _root: np.ndarray | None = None

    def __post_init__(self) -> None:
        d, rank = self.precision.shape[0], self.config.rank
        shapes = ((0, d), (0,), (0, d), (0, d), (0, rank, d), (0,), (0,))
        for k, shape in zip(TENSORS, shapes, strict=True):
            setattr(self, k, np.zeros(shape, np.float32))

    def sync(self, keys: dict[str, str], examples_of: Callable[[str], np.ndarray]) -> None:
        """Make the table hold exactly the adapters of `keys` (name -> key): a head only
        for a new or changed adapter (`examples_of(name)`: its (n, d) example vectors),
        removed ones dropped, the others kept as they are."""
        old = dict(zip(self.names, self.keys, strict=True))
        keep = [i for i, n in enumerate(self.names) if keys.get(n) == old[n]]
        kept = {self.names[i] for i in keep}
        new = [n for n in keys if n not in kept]
        d, rank, root = self.precision.shape[0], self.config.rank, self.root()
        fresh, whitened = np.zeros((len(new), d), np.float32), np.zeros((len(new), d), np.float32)
        spreads = np.zeros((len(new), rank, d), np.float32)
        leftover, counts = np.zeros(len(new), np.float32), np.zeros(len(new), np.float32)
        for i, name in enumerate(new):  # one adapter's examples in memory at a time
            block = examples_of(name)
            white = matmul(block.astype(np.float64), root)  # where LDA compares them
            fresh[i], whitened[i], counts[i] = block.mean(0), white.mean(0), len(block)
            spreads[i], leftover[i] = spread(white, rank)
        coef, intercept = heads(self.precision, fresh)
        made = {"coef": coef, "intercept": intercept, "centroids": unit(fresh)}
        made |= {"whitened": whitened, "spread": spreads, "leftover": leftover, "counts": counts}
        self.fitted += len(new)
        added = len(keep) == len(self.names)  # only additions: the index grows in place
        index = self._index if added else None
        rows = slice(None) if added else keep  # all kept: a view, the one copy is the concat
        self.restore(
            [self.names[i] for i in keep] + new,
            [self.keys[i] for i in keep] + [keys[n] for n in new],
            {k: np.concatenate([getattr(self, k)[rows], v]) for k, v in made.items()},
        )
        if index is not None and isinstance(index, self._kind()):
            index.add(unit(fresh))  # HNSW grows in place; a removal rebuilds it
            self._index = index

    def root(self) -> np.ndarray:
        """L with precision = L L^T: x @ L is x in the coordinates where the shared
        covariance is the identity."""
        if self._root is None:
            self._root = np.linalg.cholesky(self.precision)
        return self._root

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
        for k in TENSORS:
            setattr(self, k, tensors[k])
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


def local_logits(
    table: HeadTable, ids: np.ndarray, whitened: np.ndarray, head_logits: np.ndarray
) -> np.ndarray:
    """Adapters `ids` (m,), queries in whitened coordinates (P, d) and their head logits
    (P, m) -> (P, m): LDA logits under the covariance lam * shared + alpha * S, S the
    adapters' pooled spread (n examples, alpha = (1 - lam) / (n - m)). In whitened
    coordinates the shared covariance is the identity and S is K^T K (K: the adapters'
    stacked main directions) plus the trace they leave out, spread evenly (rho I); with
    lam' = lam + alpha * rho, by Woodbury the logit is the head's less a correction from
    one (m * rank)-square system:
    (z_a - h_a^T (K K^T + lam' / alpha I)^-1 (K u - h_a / 2)) / lam', h_a = K nu_a, nu_a
    the adapter's whitened mean."""
    cfg = table.config
    n = float(table.counts[ids].sum())
    lam = max(cfg.local_shrink, cfg.local_prior / (cfg.local_prior + n))
    if lam >= 1.0:
        return head_logits
    d = table.spread.shape[2]
    alpha = (1.0 - lam) / max(n - len(ids), 1.0)
    lam += alpha * float(table.leftover[ids].sum()) / d
    k = torch.from_numpy(table.spread[ids]).reshape(-1, d).double()
    h = k @ torch.from_numpy(table.whitened[ids]).double().T  # (R, m)
    t = torch.linalg.solve(k @ k.T + (lam / alpha) * torch.eye(len(k), dtype=k.dtype), h)
    correction = torch.from_numpy(whitened) @ k.T @ t - 0.5 * (h * t).sum(0)
    return (head_logits - correction.numpy()) / lam


def rescored(table: HeadTable, queries: np.ndarray, cand: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(P, d) queries, (P, K) candidates and their head logits -> the logits with each
    prompt's `rescore` likeliest candidates re-scored by `local_logits`, shifted so that
    together they keep the probability the heads gave them. Prompts with the same
    likeliest set share one solve."""
    m = min(table.config.rescore, z.shape[1])
    if m < 2:
        return z
    top = np.argpartition(-z, m - 1, axis=1)[:, :m]
    ids = np.take_along_axis(cand, top, 1)
    order = np.argsort(ids, axis=1)
    top, ids = np.take_along_axis(top, order, 1), np.take_along_axis(ids, order, 1)
    whitened = matmul(queries.astype(np.float64), table.root())
    sets: dict[bytes, list[int]] = {}
    for p, row in enumerate(ids):
        sets.setdefault(row.tobytes(), []).append(p)
    out = z.copy()
    for members in sets.values():
        rows = np.array(members)
        head = np.take_along_axis(z[rows], top[rows], 1)
        local = local_logits(table, ids[rows[0]], whitened[rows], head)
        shift = np.logaddexp.reduce(head, axis=1) - np.logaddexp.reduce(local, axis=1)
        out[rows[:, None], top[rows]] = local + shift[:, None]
    return out


def score(
    table: HeadTable, none: tuple[np.ndarray, np.ndarray], queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, d) unit queries -> candidates (P, K), their probabilities (P, K) (renormalized
    over the candidates) and P(none) (P,): the shortlisted adapters' heads and the
    background's (`background_heads`) in one softmax, P(none) the background's mass."""
    cand = table.shortlist(queries)
    z = rescored(table, queries, cand, table.logits(queries, cand).astype(np.float64))  # (P, K)
    z_none = (matmul(queries, none[0].T) + none[1]).astype(np.float64)  # (P, B)
    # heads' logits span hundreds of nats: normalize in log space, never exp a raw sum
    lse, lse_none = np.logaddexp.reduce(z, axis=1), np.logaddexp.reduce(z_none, axis=1)
    return cand, np.exp(z - lse[:, None]), np.exp(-np.logaddexp(0.0, lse - lse_none))
