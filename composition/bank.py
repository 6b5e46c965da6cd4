"""`AdapterBank`: the adapters a batch needs, stacked once per module, and the pure
functions that apply them.

Per module, with the LoRA scaling folded into B:
  A_cat (R, d_in), B_cat (d_out, R), slot (R,)   -- all ranks concatenated (R = sum r_i);
  A_pad (n, r, d_in), B_pad (n, d_out, r)         -- ranks zero-padded to r = max r_i.
An adapter that lacks a module contributes nothing there (its rows are absent / zero).

A bank of fixed slots (`AdapterBank.slots`, for a server that pages adapters in and out)
holds every slot at one rank r, zero-padded, so A_cat and B_cat are views of A_pad and of
B_pad's storage: `write_slot` puts one adapter into one slot in place, and nothing else
is rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from registry import AdapterError, AdapterShapeError, BaseModelMismatchError, LoraAdapter


@dataclass(frozen=True)
class ModuleStack:
    A_cat: Tensor  # (R, d_in)
    B_cat: Tensor  # (d_out, R), scaling folded in
    slot: Tensor  # (R,) long, ascending: which adapter each rank row belongs to
    A_pad: Tensor  # (n, r, d_in)
    B_pad: Tensor  # (n, d_out, r), scaling folded in

    @property
    def shape(self) -> tuple[int, int]:
        """(d_in, d_out) of the layer these adapters fit."""
        return self.A_cat.shape[1], self.B_cat.shape[0]


def stack_module(
    adapters: Sequence[LoraAdapter], name: str, dtype: torch.dtype, device: torch.device | str
) -> ModuleStack:
    present = [(i, a) for i, a in enumerate(adapters) if name in a.modules]
    d_in, d_out = present[0][1].modules[name].d_in, present[0][1].modules[name].d_out
    r_max = max(a.modules[name].rank for _, a in present)
    A_pad = torch.zeros(len(adapters), r_max, d_in, dtype=torch.float32)
    B_pad = _b_store(len(adapters), r_max, d_out, torch.float32, "cpu")
    A_rows, B_cols, slot = [], [], []
    for i, a in present:
        m = a.modules[name]
        if (m.d_in, m.d_out) != (d_in, d_out):
            raise AdapterShapeError(
                f"{name}: adapters disagree on (d_in, d_out): {(d_in, d_out)} vs {(m.d_in, m.d_out)}"
            )
        A = m.lora_A.float()
        B = a.scaling(name) * m.lora_B.float()
        A_pad[i, : m.rank], B_pad[i, :, : m.rank] = A, B
        A_rows.append(A)
        B_cols.append(B)
        slot += [i] * m.rank
    to = {"dtype": dtype, "device": device}
    return ModuleStack(
        torch.cat(A_rows).to(**to),
        torch.cat(B_cols, dim=1).to(**to),
        torch.tensor(slot, device=device),
        A_pad.to(**to),
        B_pad.to(**to),  # keeps the (d_out, n, r) storage order
    )


def empty_stack(
    n: int, rank: int, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str
) -> ModuleStack:
    """n zero slots of one rank; A_cat / B_cat are views of the padded tensors."""
    A_pad = torch.zeros(n, rank, d_in, dtype=dtype, device=device)
    B_pad = _b_store(n, rank, d_out, dtype, device)
    slot = torch.arange(n, device=device).repeat_interleave(rank)
    return ModuleStack(
        A_pad.view(n * rank, d_in), B_pad.permute(1, 0, 2).view(d_out, n * rank), slot, A_pad, B_pad
    )


def _b_store(n: int, rank: int, d_out: int, dtype: torch.dtype, device) -> Tensor:
    """Zeros viewed as B_pad (n, d_out, rank), stored as (d_out, n, rank): B_cat's layout,
    where `gather_mixture` selects adapters along one contiguous dimension."""
    return torch.zeros(d_out, n, rank, dtype=dtype, device=device).permute(1, 0, 2)


@dataclass(frozen=True)
class AdapterBank:
    """Adapters `names[i]` stacked per module; gates index adapters in this order."""

    names: tuple[str, ...]
    modules: dict[str, ModuleStack]

    @classmethod
    def build(
        cls,
        adapters: Sequence[LoraAdapter],
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> AdapterBank:
        if not adapters:
            raise AdapterError("an adapter bank needs at least one adapter")
        bases = {a.base_model.name for a in adapters}
        if len(bases) > 1:
            raise BaseModelMismatchError(f"adapters are for different base models: {sorted(bases)}")
        names = tuple(names or (f"adapter{i}" for i in range(len(adapters))))
        if len(names) != len(adapters) or len(set(names)) != len(names):
            raise AdapterError(f"need {len(adapters)} distinct adapter names, got {names}")
        targets = sorted({m for a in adapters for m in a.modules})
        return cls(names, {t: stack_module(adapters, t, dtype, device) for t in targets})

    @classmethod
    def slots(
        cls,
        n: int,
        rank: int,
        shapes: dict[str, tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> AdapterBank:
        """`n` empty slots of `rank` for modules {name: (d_in, d_out)}; fill with
        `write_slot`. An empty slot contributes nothing."""
        stacks = {m: empty_stack(n, rank, *shape, dtype, device) for m, shape in shapes.items()}
        return cls(tuple(f"slot{i}" for i in range(n)), stacks)

    def write_slot(self, i: int, adapter: LoraAdapter) -> None:
        """Put `adapter` into slot i in place (its ranks zero-padded, absent modules zero).
        Only for banks made by `slots`; check `fits_slot` first."""
        for name, s in self.modules.items():
            m = adapter.modules.get(name)
            r = 0 if m is None else m.rank
            if m is not None:
                s.A_pad[i, :r] = m.lora_A
                s.B_pad[i, :, :r] = adapter.scaling(name) * m.lora_B.float()
            s.A_pad[i, r:].zero_()  # only the padding: a miss writes one slot, nothing more
            s.B_pad[i, :, r:].zero_()

    def fits_slot(self, adapter: LoraAdapter) -> str | None:
        """None if `adapter` fits a slot of this bank, else why not."""
        rank = next(iter(self.modules.values())).A_pad.shape[1]
        for name, m in adapter.modules.items():
            s = self.modules.get(name)
            if s is None:
                return f"module {name} is not in the bank"
            if (m.d_in, m.d_out) != s.shape:
                return f"{name}: (d_in, d_out) {(m.d_in, m.d_out)} but the bank holds {s.shape}"
            if m.rank > rank:
                return f"{name}: rank {m.rank} is above the bank's {rank}"
        return None

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AdapterError(
                f"unknown adapter {name!r}; the bank holds {list(self.names)}"
            ) from None


# -- the math: pure functions over tensors ----------------------------------------------------


def add_dense(out: Tensor, x: Tensor, s: ModuleStack, gates: Tensor) -> Tensor:
    """out + sum_i g_i B_i A_i x for all adapters in two matmuls, whatever their number.

    x: (b, t, d_in); out: (b, t, d_out); gates: (b, n) per sample or (b, t, n) per token.
    """
    g = gates[..., s.slot]  # (b, R) or (b, t, R): each rank row gets its adapter's gate
    if g.dim() == 2:
        g = g[:, None, :]
    h = (x @ s.A_cat.T) * g  # (b, t, R)
    if torch.is_grad_enabled():  # autograd may need `out` untouched: add out of place
        return out + h @ s.B_cat.T
    return out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), s.B_cat.T).view(out.shape)


def head(s: ModuleStack, n: int) -> ModuleStack:
    """Adapters 0..n-1 of a stack, as views (their rank rows come first in A_cat / B_cat)."""
    rows = int(torch.searchsorted(s.slot, n))
    return ModuleStack(s.A_cat[:rows], s.B_cat[:, :rows], s.slot[:rows], s.A_pad[:n], s.B_pad[:n])


def gather_mixture(s: ModuleStack, idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample factors of the chosen adapters only (output-space mixture).

    idx, w: (b, k) adapter indices and weights -> At (b, d_in, k*r), Bt (b, k*r, d_out),
    transposed for `add_gathered`, with the weights folded into Bt.
    """
    (b, k), (_, r, d_in) = idx.shape, s.A_pad.shape
    flat = idx.reshape(-1)  # index_select: ~10x faster than advanced indexing here
    At = s.A_pad.index_select(0, flat).view(b, k * r, d_in).transpose(1, 2)
    B = s.B_pad.permute(1, 0, 2).index_select(1, flat)  # (d_out, b*k, r): B_pad's storage
    Bt = B.view(-1, b, k, r).mul_(w[None, :, :, None]).view(-1, b, k * r).permute(1, 2, 0)
    return At, Bt  # strided views that bmm reads as transposed matrices, no copy


def gather_fusion(s: ModuleStack, gates: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample parameter averaging (LoraRetriever's fusion): A = sum w_i A_i,
    B = sum w_i B_i. gates: (b, n) -> At (b, d_in, r), Bt (b, r, d_out)."""
    b, (n, r, d_in), d_out = gates.shape[0], s.A_pad.shape, s.B_pad.shape[1]
    At = (gates @ s.A_pad.reshape(n, -1)).view(b, r, d_in).transpose(1, 2)
    Bt = (gates @ s.B_pad.reshape(n, -1)).view(b, d_out, r).transpose(1, 2)
    return At, Bt  # strided views: bmm reads them transposed, no copy


def add_gathered(out: Tensor, x: Tensor, At: Tensor, Bt: Tensor) -> Tensor:
    """out + (x @ At) @ Bt per sample, added in place into the base layer's fresh output
    when gradients are off (3x cheaper than a separate add at prefill sizes).
    x: (b, t, d_in), At: (b, d_in, K), Bt: (b, K, d_out), out: (b, t, d_out)."""
    h = torch.bmm(x, At)
    return torch.baddbmm(out, h, Bt) if torch.is_grad_enabled() else out.baddbmm_(h, Bt)


def merged_delta(s: ModuleStack, weights: Tensor) -> Tensor:
    """One composition for the whole batch as a dense weight update: (d_out, d_in)."""
    return (s.B_cat * weights[s.slot]) @ s.A_cat


def fused_delta(s: ModuleStack, weights: Tensor) -> Tensor:
    """Fusion of one composition as a dense update: (sum w B_i) @ (sum w A_i)."""
    At, Bt = gather_fusion(s, weights[None])
    return (At[0] @ Bt[0]).T
