"""Arrow routing (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a
Library of LoRAs"): data-free and per token.

Each adapter's prototype at a layer is the top right singular vector of its update B A.
A token with hidden state h picks, at that layer, the k adapters with the largest
|h . v_i| / T and weighs them by a softmax over those logits. The gate runs inside the
composer's forward pass (a `composition.TokenGate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from registry import LoraAdapter, Registry


def top_right_singular_vector(A: Tensor, B: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Top right singular vector of B @ A by power iteration on (BA)^T BA, never forming
    it: v <- A^T (B^T B) (A v). A: (r, d_in), B: (d_out, r) -> (d_in,), unit norm."""
    A64, G = A.double(), B.double().T @ B.double()  # G: (r, r)
    v = A64.sum(0)  # deterministic start inside the row space of A
    if v.norm() == 0:
        v = A64[0] if A64.abs().sum() else torch.ones_like(A64[0])
    v = v / v.norm()
    for _ in range(iters):
        w = A64.T @ (G @ (A64 @ v))
        norm = w.norm()
        if norm == 0:
            break
        w = w / norm
        done = (w - v).norm() < tol or (w + v).norm() < tol
        v = w
        if done:
            break
    return v.float()


def prototypes(adapter: LoraAdapter) -> dict[str, Tensor]:
    """Module -> (d_in,) prototype of one adapter."""
    return {
        name: top_right_singular_vector(m.lora_A, m.lora_B) for name, m in adapter.modules.items()
    }


@dataclass(frozen=True)
class ArrowConfig:
    """k: adapters per token; temperature T in |h . v| / T (PEFT's ArrowConfig default 1.0)."""

    k: int = 3
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class ArrowGate:
    """A `TokenGate`: (module, x (b, t, d_in)) -> gates (b, t, n) with k non-zeros per token.

    `protos[module]` is (n, d_in), rows in the composer's adapter order; an adapter that
    lacks the module has a NaN row and is never chosen there.
    """

    def __init__(self, protos: dict[str, Tensor], config: ArrowConfig = ArrowConfig()) -> None:
        self.protos = protos
        self.config = config

    def __call__(self, module: str, x: Tensor) -> Tensor:
        P = self.protos[module].to(x.device, x.dtype)  # (n, d_in)
        logits = (x @ P.nan_to_num().T).abs() / self.config.temperature  # (b, t, n)
        logits = logits.masked_fill(P.isnan().any(-1), float("-inf"))
        k = min(self.config.k, P.shape[0])
        top, idx = logits.topk(k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


def arrow_gate(
    adapters: Sequence[LoraAdapter],
    config: ArrowConfig = ArrowConfig(),
    registry: Registry | None = None,
) -> ArrowGate:
    """Stack the adapters' prototypes per module (from the registry's cache when given)."""
    per = [
        cached_prototypes(registry, a) if registry is not None else prototypes(a) for a in adapters
    ]
    modules = sorted({m for p in per for m in p})
    stacked = {}
    for m in modules:
        d_in = next(p[m].shape[0] for p in per if m in p)
        stacked[m] = torch.stack([p.get(m, torch.full((d_in,), float("nan"))) for p in per])
    return ArrowGate(stacked, config)


def cached_prototypes(registry: Registry, adapter: LoraAdapter) -> dict[str, Tensor]:
    """Prototypes are a pure function of the weights: cached by the adapter's sha256."""
    return registry.cached_tensors(f"arrow-{adapter.sha256()}", lambda: prototypes(adapter))
