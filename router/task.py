"""Task-level routing in the spirit of LoRAuter (arXiv 2601.21795): an adapter stands for
its task through the set of its task's example inputs, not their mean.

Two things are read from those sets:
- which adapter: a linear classifier (logistic regression) over the example embeddings of
  all adapters, fitted when the catalogue changes and cached; its probabilities, over the
  top k, are the mixture weights. On the zoo's validation prompts it routes the
  input-distinguishable tasks right 95.5% of the time, against 92.1% for the nearest mean
  embedding (LoraRetriever), since a boundary between two tasks' example clouds separates
  them where their means sit close (benchmarks/tune_router.py);
- whether any adapter fits at all: the mean cosine of the prompt's `neighbours` nearest
  examples of the best adapter. A classifier gives some class a high probability even for
  a prompt unlike every task; nearness to real examples does not. That is
  `Routing.confidence`. Below `fit_threshold` (chosen on validation) the routing is
  empty, the base model answers, and `Routing.note` says why: adapters that do not fit an
  input can only make the base model's answer worse. Between `fit_threshold` and
  `broad_threshold` the router is unsure which adapter fits: asked for a mixture (k > 1),
  it mixes its whole pool with equal weights instead of betting on the top k (the uniform
  average is the strongest data-free composition on tasks near, but not in, the zoo);
  asked for one adapter (selection), it still picks one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from registry import Registry
from registry.embedding import examples_key, meta_texts
from router.classifier import fit_linear, softmax_rows
from router.routing import Routing


@dataclass(frozen=True)
class TaskRouterConfig:
    """k: adapters per prompt; neighbours: nearest examples of an adapter averaged into its
    fit; fit_threshold: fit below which no adapter is used (-1 = always compose);
    broad_threshold: fit below which all adapters are mixed equally when the caller asks for
    more than one (<= fit_threshold: never); C: the classifier's inverse regularization."""

    # chosen on validation prompts only (benchmarks/tune_router.py, results/tune_router.json)
    k: int = 3
    neighbours: int = 5
    fit_threshold: float = 0.49
    broad_threshold: float = 0.64
    C: float = 100.0

    def __post_init__(self) -> None:
        if self.k <= 0 or self.neighbours <= 0:
            raise ValueError(f"k and neighbours must be positive, got {self.k}, {self.neighbours}")
        for name in ("fit_threshold", "broad_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine in [-1, 1], got {getattr(self, name)}")
        if self.C <= 0:
            raise ValueError(f"C must be > 0, got {self.C}")


@dataclass(frozen=True)
class _Tasks:
    """The catalogue as the router reads it: names, example vectors (A, M, d) zero-padded
    with their mask (A, M), and the classifier (coef (A, d), intercept (A,)) when A >= 2."""

    names: list[str]
    vectors: torch.Tensor
    mask: torch.Tensor
    coef: np.ndarray | None
    intercept: np.ndarray | None


class TaskRouter:
    """Routes by each adapter's example set (see the module docstring). Adapters without
    examples are represented by their description."""

    def __init__(self, registry: Registry, config: TaskRouterConfig | None = None) -> None:
        if registry.embedder is None:
            raise ValueError("the task router needs a registry opened with an embedder")
        self.registry = registry
        self.config = config or TaskRouterConfig()
        self._memo: tuple[str, _Tasks] | None = None

    def _tasks(self) -> _Tasks:
        """The catalogue's example vectors and classifier, rebuilt only when the adapters or
        their examples change (vectors and fit are also cached in the registry)."""
        embedder = self.registry.embedder
        metas = {r.name: r.meta for r in self.registry.list() if meta_texts(r.meta)}
        key = hashlib.sha256(f"{self.config.C!r}".encode())
        for name, meta in metas.items():
            key.update(f"{name}\0{examples_key(embedder, meta_texts(meta))}\0".encode())
        stamp = key.hexdigest()[:32]
        if self._memo is not None and self._memo[0] == stamp:
            return self._memo[1]
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
        if len(names) >= 2:
            fit = self.registry.cached_tensors(f"task-router-{stamp}", lambda: self._fit(blocks))
            coef, intercept = fit["coef"].numpy(), fit["intercept"].numpy()
        tasks = _Tasks(names, vectors, mask, coef, intercept)
        self._memo = (stamp, tasks)
        return tasks

    def _fit(self, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        X = torch.cat(list(blocks.values())).numpy()
        labels = np.concatenate([np.full(len(b), i) for i, b in enumerate(blocks.values())])
        coef, intercept = fit_linear(X, labels, self.config.C)
        return {"coef": torch.from_numpy(coef), "intercept": torch.from_numpy(intercept)}

    def scores(self, prompts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Adapter names, each prompt's fit (P, A) and classifier probability (P, A)."""
        tasks = self._tasks()
        shape = (len(prompts), len(tasks.names))
        if not tasks.names or not prompts:
            return tasks.names, np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        queries = self.registry.embedder.encode(list(prompts))
        fit = adapter_fit(
            torch.from_numpy(queries).float(), tasks.vectors, tasks.mask, self.config.neighbours
        ).numpy()
        if tasks.coef is None:  # one adapter: it is the only choice
            return tasks.names, fit, np.ones(shape, np.float32)
        return tasks.names, fit, softmax_rows(queries @ tasks.coef.T + tasks.intercept)

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
        names, fit, prob = self.scores([prompts[i] for i in live])
        out = [Routing(note="empty prompt")] * len(prompts)
        for row, i in enumerate(live):
            banned = set(exclude_each[i]) if exclude_each is not None else set()
            allowed = [j for j in range(len(names)) if names[j] not in banned]
            out[i] = self._weigh(names, allowed, fit[row], prob[row], k)
        return out

    def _weigh(
        self, names: list[str], allowed: list[int], fit: np.ndarray, prob: np.ndarray, k: int
    ) -> Routing:
        if not allowed:
            return Routing(note="no adapter to route to")
        best = float(fit[allowed].max())
        if best < self.config.fit_threshold:
            return Routing(
                confidence=best,
                note=f"no adapter fits: best fit {best:.3f} < {self.config.fit_threshold:.3f}",
            )
        if best < self.config.broad_threshold and k > 1:
            return Routing(
                tuple(names[j] for j in allowed),
                tuple([1.0 / len(allowed)] * len(allowed)),
                tuple(float(prob[j]) for j in allowed),
                confidence=best,
                note=f"unsure: best fit {best:.3f} < {self.config.broad_threshold:.3f}, "
                "all adapters mixed equally",
            )
        top = sorted(allowed, key=lambda j: -prob[j])[:k]
        total = float(prob[top].sum()) or 1.0
        return Routing(
            tuple(names[j] for j in top),
            tuple(float(prob[j]) / total for j in top),
            tuple(float(prob[j]) for j in top),
            confidence=best,
        )


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
