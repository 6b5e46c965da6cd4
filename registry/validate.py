"""Checks an adapter must pass before it is stored or used. Each raises a typed error
that names the module and the numbers involved."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from registry.adapter import LoraAdapter
from registry.errors import AdapterLimitError, AdapterShapeError, AdapterValueError


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a registry accepts (defaults fit LoRAs of models up to ~70B)."""

    max_rank: int = 1024
    max_bytes: int = 4 * 2**30
    max_modules: int = 10_000

    def __post_init__(self) -> None:
        if min(self.max_rank, self.max_bytes, self.max_modules) <= 0:
            raise ValueError(f"limits must be positive, got {self}")


def check_pair(module: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """A must be (r, d_in) and B (d_out, r) with the same r > 0."""
    if lora_A.ndim != 2 or lora_B.ndim != 2:
        raise AdapterShapeError(
            f"{module}: lora_A and lora_B must be 2-D, got {tuple(lora_A.shape)} and "
            f"{tuple(lora_B.shape)}"
        )
    if lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] == 0:
        raise AdapterShapeError(
            f"{module}: lora_A {tuple(lora_A.shape)} (r x d_in) and lora_B "
            f"{tuple(lora_B.shape)} (d_out x r) disagree on the rank"
        )
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise AdapterValueError(f"{module}: tensors must be floating point, got {lora_A.dtype}")


def check_finite(adapter: LoraAdapter) -> None:
    for name, m in adapter.modules.items():
        for label, t in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            if not torch.isfinite(t).all():
                raise AdapterValueError(f"{name}.{label} contains NaN or Inf values")


def check_limits(adapter: LoraAdapter, limits: Limits) -> None:
    if not adapter.modules:
        raise AdapterShapeError("the adapter has no LoRA modules")
    if len(adapter.modules) > limits.max_modules:
        raise AdapterLimitError(
            f"{len(adapter.modules)} modules exceed the limit of {limits.max_modules}"
        )
    for name, m in adapter.modules.items():
        if m.rank > limits.max_rank:
            raise AdapterLimitError(f"{name}: rank {m.rank} exceeds max_rank {limits.max_rank}")
    check_size(adapter.nbytes, limits)


def check_size(nbytes: int, limits: Limits) -> None:
    if nbytes > limits.max_bytes:
        raise AdapterLimitError(f"{nbytes} bytes of tensors exceed max_bytes {limits.max_bytes}")


def check_shapes_match(
    shapes: dict[str, tuple[int, int]], known: dict[str, tuple[int, int]], base: str
) -> None:
    """An adapter's module -> (d_in, d_out) against `known`, those already established for
    base model `base`."""
    for name, shape in shapes.items():
        if name in known and known[name] != shape:
            raise AdapterShapeError(
                f"{name}: (d_in, d_out) = {shape} contradicts {known[name]} of the adapters "
                f"already registered for base model {base!r}"
            )


def validate(adapter: LoraAdapter, limits: Limits) -> None:
    """Everything that can be checked on the adapter alone."""
    check_limits(adapter, limits)
    for name, m in adapter.modules.items():
        check_pair(name, m.lora_A, m.lora_B)
        if m.alpha <= 0 or m.alpha != m.alpha:
            raise AdapterValueError(f"{name}: lora_alpha must be > 0, got {m.alpha}")
    check_finite(adapter)
