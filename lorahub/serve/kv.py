"""The running batch's KV cache, left-padded: every row ends at the same column, so one
decode step appends one column for all rows. Pure functions over a transformers
`DynamicCache` (tensors (batch, heads, length, head_dim) per layer) and its (batch, length)
attention mask."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list:
    layers = cache.layers
    if any(not hasattr(layer, "keys") or layer.keys is None for layer in layers):
        raise ValueError("only a dense DynamicCache can be batched continuously")
    return layers


def _left_pad(t: Tensor, length: int) -> Tensor:
    """(b, h, n, d) -> (b, h, length, d) with zeros before."""
    missing = length - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def join(
    cache: DynamicCache | None, mask: Tensor | None, new: DynamicCache, new_mask: Tensor
) -> tuple[DynamicCache, Tensor]:
    """Rows of `new` appended below the running batch, the shorter side left-padded."""
    if cache is None:
        return new, new_mask
    length = max(mask.shape[1], new_mask.shape[1])
    for old, add in zip(_layers(cache), _layers(new), strict=True):
        old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(add.keys, length)])
        old.values = torch.cat([_left_pad(old.values, length), _left_pad(add.values, length)])
    pad = torch.nn.functional.pad
    mask = torch.cat(
        [pad(mask, (length - mask.shape[1], 0)), pad(new_mask, (length - new_mask.shape[1], 0))]
    )
    return cache, mask


def keep(cache: DynamicCache, mask: Tensor, rows: Tensor) -> tuple[DynamicCache, Tensor]:
    """Only `rows` (a 1-D long tensor) stay; columns no row uses any more are dropped."""
    mask = mask[rows]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys[rows, :, start:]
        layer.values = layer.values[rows, :, start:]
    return cache, mask[:, start:]


def select(cache: DynamicCache, mask: Tensor, rows: Tensor) -> tuple[DynamicCache, Tensor]:
    """A new cache of only `rows` (a 1-D long tensor); `cache` is left as it was."""
    out = DynamicCache()
    for i, layer in enumerate(_layers(cache)):
        out.update(layer.keys[rows], layer.values[rows], i)
    return keep(out, mask[rows], torch.arange(len(rows)))
