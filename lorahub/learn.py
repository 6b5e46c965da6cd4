"""LoraHub learning (Huang et al. 2023): composition weights for a new task from a few
examples, by gradient-free search.

Objective (the reference `lorahub` package's defaults): cross-entropy of the examples'
answers + 0.05 * mean |w|, weights bounded to [-1.5, 1.5], starting at 0, nevergrad NGOpt,
40 evaluations. Unlike the reference, which rebuilds a state dict and reloads the model
for every candidate, a whole population of candidates is scored in one batched forward
pass: each row carries its candidate's composition (composition.Composer, per-sample
gates), the tokenized examples are built once, and the search stops early once it stalls.
Works for causal LMs and seq2seq models alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from composition import Composer, Mode, merge
from lorahub.applied import Applied
from lorahub.models import BaseModel
from lorahub.tasks import Example
from lorahub.train import make_batch
from registry import LoraAdapter

# The merge that returns exactly what a mode scored inside the pass: fusion is the
# reference's element-wise A/B sum (scalings folded in); mixture is exact task arithmetic.
MERGE_FOR = {Mode.fusion: "fusion", Mode.mixture: "linear"}


@dataclass(frozen=True)
class LoraHubConfig:
    """Defaults follow the reference package (max_inference_step=40, bounds 1.5, L1 0.05,
    NGOpt, seed 42). mode: fusion (A = sum w_i A_i, B = sum w_i B_i, the reference) or
    mixture (sum w_i B_i A_i). population: candidates asked and scored per forward pass;
    patience: evaluations without an improvement > tol before stopping early (0 = never)."""

    steps: int = 40
    bound: float = 1.5
    l1: float = 0.05
    optimizer: str = "NGOpt"
    mode: Mode = Mode.fusion
    population: int = 8
    patience: int = 16
    tol: float = 1e-4
    max_rows: int = 64
    max_length: int = 512
    seed: int = 42

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.population <= 0 or self.bound <= 0 or self.l1 < 0:
            raise ValueError(f"invalid LoraHub config: {self}")
        Mode(self.mode)
        import nevergrad as ng

        if self.optimizer not in ng.optimizers.registry:
            raise ValueError(
                f"unknown nevergrad optimizer {self.optimizer!r} (e.g. NGOpt, OnePlusOne, Cobyla)"
            )


@dataclass(frozen=True)
class LoraHubResult:
    weights: list[float]
    objective: float  # loss + l1 * mean |w| of `weights`
    loss: float
    adapter: LoraAdapter  # the composition merged into one adapter (PEFT-savable)
    history: list[float]  # objective of every evaluated candidate, in order
    seconds: float


class PopulationScorer:
    """Loss of many candidate weight vectors over the same examples, in batched passes.

    The adapters stay attached for the scorer's life; the examples are tokenized once.
    """

    def __init__(
        self,
        base: BaseModel,
        adapters: Sequence[LoraAdapter],
        examples: Sequence[Example],
        mode: Mode = Mode.fusion,
        max_rows: int = 64,
        max_length: int = 512,
    ) -> None:
        if not examples:
            raise ValueError("LoraHub learning needs at least one example")
        self.base = base
        self.mode = Mode(mode)
        self.batch = make_batch(base, list(examples), max_length)  # built once, reused
        self.max_rows = max_rows
        self.composer = Composer.attach(base.model, adapters)

    @torch.inference_mode()
    def losses(self, candidates: Tensor) -> Tensor:
        """candidates: (P, n) weights -> (P,) token-mean cross-entropy of each."""
        n_ex = self.batch["input_ids"].shape[0]
        gates = candidates.float().repeat_interleave(n_ex, dim=0)  # row = (candidate, example)
        total = torch.zeros(len(gates))
        count = torch.zeros(len(gates))
        for start in range(0, len(gates), self.max_rows):
            rows = torch.arange(start, min(start + self.max_rows, len(gates)))
            batch = {k: v[rows % n_ex] for k, v in self.batch.items()}
            applied = Applied(self.composer, gates, (self.mode,) * len(gates))
            with applied.rows(rows):
                total[rows], count[rows] = _token_losses(self.base, batch)
        per = candidates.shape[0]
        return total.view(per, n_ex).sum(1) / count.view(per, n_ex).sum(1).clamp(min=1)

    def close(self) -> None:
        self.composer.detach()


def _token_losses(base: BaseModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row summed cross-entropy over answer tokens, and their count. Causal LMs project
    only the positions that predict an answer token onto the vocabulary (the prompts are
    most of the tokens, and the head of a 49k-token vocabulary is ~20% of SmolLM2's work)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if base.is_seq2seq:
        logits = base.model(**inputs, labels=labels, use_cache=False).logits
    else:
        labels = labels[:, 1:]
        cols = (labels != -100).any(0).nonzero().squeeze(1)  # predicted by the token before
        logits = base.model(**inputs, use_cache=False, logits_to_keep=cols).logits
        labels = labels[:, cols]
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none"
    )  # (b, t)
    return (ce * keep).sum(1), keep.sum(1).float()


def learn_weights(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    examples: Sequence[Example],
    config: LoraHubConfig | None = None,
    progress: bool = True,
    starts: Sequence[Sequence[float]] = (),
) -> LoraHubResult:
    """Find composition weights for `adapters` on a few `examples` (input -> target).

    The search starts from the best of w = 0 (no composition) and `starts` (e.g. the
    uniform average, the router's weights): each is scored once, outside the optimizer's
    budget and without telling it (told, w = 0 anchored MetaModel's search near 0: worse
    weights on real tasks), and kept unless a candidate beats it. So the result never
    scores worse on the examples than the base model or any start."""
    import nevergrad as ng

    config = config or LoraHubConfig()
    start = time.perf_counter()
    n = len(adapters)
    if any(len(s) != n for s in starts):
        raise ValueError(f"every start needs {n} weights, one per adapter")
    points = np.array([np.zeros(n), *[np.asarray(s, dtype=float) for s in starts]])
    scorer = PopulationScorer(
        base, adapters, examples, config.mode, config.max_rows, config.max_length
    )
    start_losses = scorer.losses(torch.tensor(points, dtype=torch.float32)).tolist()
    start_objectives = [
        loss + config.l1 * float(np.abs(p).mean())
        for loss, p in zip(start_losses, points, strict=True)
    ]
    first = int(np.argmin(start_objectives))
    best = (start_objectives[first], points[first], start_losses[first])  # objective, w, loss
    param = ng.p.Array(
        init=np.clip(points[first], -config.bound, config.bound),
        lower=-config.bound,
        upper=config.bound,
    )
    param.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.registry[config.optimizer](
        parametrization=param, budget=config.steps, num_workers=config.population
    )
    history: list[float] = []
    since_best = 0
    bar = tqdm(total=config.steps, disable=not progress, desc="lorahub", leave=False)
    try:
        while len(history) < config.steps and (not config.patience or since_best < config.patience):
            asked = [
                optimizer.ask() for _ in range(min(config.population, config.steps - len(history)))
            ]
            W = torch.tensor(np.stack([c.value for c in asked]), dtype=torch.float32)
            losses = scorer.losses(W)
            objectives = losses + config.l1 * W.abs().mean(1)
            for cand, obj, loss in zip(asked, objectives.tolist(), losses.tolist(), strict=True):
                optimizer.tell(cand, obj)
                history.append(obj)
                if obj < best[0] - config.tol:
                    best, since_best = (obj, np.array(cand.value), loss), 0
                else:
                    since_best += 1
            bar.update(len(asked))
            bar.set_postfix(best=f"{best[0]:.4f}")
    finally:
        bar.close()
        scorer.close()
    weights = [float(w) for w in best[1]]
    merged = merge(adapters, weights, MERGE_FOR[Mode(config.mode)]).adapter
    return LoraHubResult(weights, best[0], best[2], merged, history, time.perf_counter() - start)
