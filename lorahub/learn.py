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
from enum import StrEnum

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from composition import Composer, LearnedGate, merge
from lorahub.models import BaseModel
from lorahub.tasks import Example
from lorahub.train import batch_for_step, make_batch
from registry import LoraAdapter


class Composition(StrEnum):
    elementwise = "elementwise"  # A = sum w_i A_i, B = sum w_i s_i B_i (the reference's sum)
    delta = "delta"  # sum w_i s_i B_i A_i (exact task arithmetic)


# How each composition runs inside the pass, and the merge that returns exactly that.
_MODES = {Composition.elementwise: ("fusion", "fusion"), Composition.delta: ("mixture", "linear")}


@dataclass(frozen=True)
class LoraHubConfig:
    """Defaults follow the reference package (max_inference_step=40, bounds 1.5, L1 0.05,
    NGOpt, seed 42). population: candidates asked and scored per forward pass; patience:
    evaluations without an improvement > tol before stopping early (0 = never)."""

    steps: int = 40
    bound: float = 1.5
    l1: float = 0.05
    optimizer: str = "NGOpt"
    composition: Composition = Composition.elementwise
    population: int = 8
    patience: int = 16
    tol: float = 1e-4
    max_rows: int = 64
    max_length: int = 512
    seed: int = 42

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.population <= 0 or self.bound <= 0 or self.l1 < 0:
            raise ValueError(f"invalid LoraHub config: {self}")
        Composition(self.composition)


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
        composition: Composition = Composition.elementwise,
        max_rows: int = 64,
        max_length: int = 512,
    ) -> None:
        if not examples:
            raise ValueError("LoraHub learning needs at least one example")
        self.base = base
        self.mode = _MODES[Composition(composition)][0]
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
            with self.composer.compose(gates[rows], mode=self.mode, path="gathered"):
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
    config: LoraHubConfig = LoraHubConfig(),
    progress: bool = True,
) -> LoraHubResult:
    """Find composition weights for `adapters` on a few `examples` (input -> target)."""
    import nevergrad as ng

    start = time.perf_counter()
    n = len(adapters)
    param = ng.p.Array(init=np.zeros(n), lower=-config.bound, upper=config.bound)
    param.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.registry[config.optimizer](
        parametrization=param, budget=config.steps, num_workers=config.population
    )
    scorer = PopulationScorer(
        base, adapters, examples, config.composition, config.max_rows, config.max_length
    )
    # The start point w = 0 (no composition) is scored once, outside the optimizer's budget
    # and without telling it (told, it anchored MetaModel's search near 0: worse weights on
    # real tasks), and kept unless a candidate beats it: never worse than the base model.
    zero_loss = float(scorer.losses(torch.zeros(1, n))[0])
    history: list[float] = []
    best = (zero_loss, np.zeros(n), zero_loss)  # objective, weights, loss
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
    merged = merge(adapters, weights, _MODES[Composition(config.composition)][1]).adapter
    return LoraHubResult(weights, best[0], best[2], merged, history, time.perf_counter() - start)


@dataclass(frozen=True)
class GateConfig:
    """Learned per-token gates over frozen adapters. balance: weight of the MoLE balance
    loss (0 turns it off); lr: Adam's learning rate for the routers."""

    steps: int = 60
    lr: float = 1e-2
    batch_size: int = 8
    balance: float = 0.0
    temperature: float = 1.0
    max_length: int = 512
    seed: int = 0


@dataclass(frozen=True)
class GateResult:
    gate: LearnedGate
    losses: list[float]
    seconds: float


def train_gate(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    examples: Sequence[Example],
    config: GateConfig = GateConfig(),
    progress: bool = True,
) -> GateResult:
    """Train a LearnedGate on `examples`; base model and adapters stay frozen."""
    if not examples:
        raise ValueError("gate training needs at least one example")
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    composer = Composer.attach(base.model, adapters)
    layers = {name: stack.shape[0] for name, stack in composer.bank.modules.items()}
    gate = LearnedGate(layers, len(adapters), config.temperature)
    frozen = [p for p in base.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    gate.train()
    try:
        for step in tqdm(range(config.steps), disable=not progress, desc="gates", leave=False):
            idx = batch_for_step(len(examples), step, config.batch_size, config.seed)
            batch = make_batch(base, [examples[i] for i in idx], config.max_length)
            with composer.compose(token_gate=gate):
                loss = base.model(**batch).loss
            total = loss + config.balance * gate.balance_loss() if config.balance else loss
            gate.forget()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        gate.eval()
        composer.detach()
        for p in frozen:
            p.requires_grad_(True)
    return GateResult(gate, losses, time.perf_counter() - start)
