"""Learned gating over frozen adapters (MoLE / LoRA-Flow): per-layer, per-token routers
trained on a few examples while the base model and the adapters stay frozen."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from composition import LearnedGate
from lorahub.applied import attached
from lorahub.models import BaseModel
from lorahub.tasks import Example
from lorahub.train import batch_for_step, make_batch
from registry import LoraAdapter


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
    layers = {name: d_in for a in adapters for name, (d_in, _) in a.shapes().items()}
    gate = LearnedGate(layers, len(adapters), config.temperature)
    frozen = [p for p in base.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    names = [f"adapter{i}" for i in range(len(adapters))]
    gate.train()
    try:
        with attached(base.model, adapters, names, token_gate=gate) as applied:
            for step in tqdm(range(config.steps), disable=not progress, desc="gates", leave=False):
                idx = batch_for_step(len(examples), step, config.batch_size, config.seed)
                batch = make_batch(base, [examples[i] for i in idx], config.max_length)
                with applied.rows(torch.as_tensor(idx)):
                    loss = base.model(**batch).loss
                total = loss + config.balance * gate.balance_loss() if config.balance else loss
                gate.forget()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        gate.eval()
        for p in frozen:
            p.requires_grad_(True)
    return GateResult(gate, losses, time.perf_counter() - start)
