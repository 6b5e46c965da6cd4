"""Choosing each row's next token: greedy at temperature 0, else a draw from the top_p
nucleus of softmax(logits / temperature) with the row's own generator (its seed), so a
row's draws do not depend on which other rows share its batch."""

from __future__ import annotations

import torch
from torch import Tensor


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs (V,) -> probs restricted to the smallest set whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already enough
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_p / sorted_p.sum())


def next_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """logits (V,) float32 -> a token id."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
