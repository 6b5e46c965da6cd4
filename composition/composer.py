"""`Composer`: many LoRA adapters inside ONE forward pass of a `transformers` model.

    composer = Composer.attach(model, adapters, names)     # wraps every target layer
    with composer.compose(gates):                          # gates: (batch, n)
        model.generate(**batch)                            # each row its own composition
    composer.detach()                                      # the model is as it was

Gates per sample (batch, n): one-hot = selection, k non-zeros = mixture (output space,
exact) or, with mode="fusion", per-sample parameter averaging. Per token, a `TokenGate`
computes (batch, tokens, n) from each layer's input inside the pass. When every row uses
the same composition, it is merged into the weights for the duration (zero overhead) and
restored bit-exactly afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from composition.bank import (
    AdapterBank,
    ModuleStack,
    add_dense,
    add_gathered,
    fused_delta,
    gather_fusion,
    gather_mixture,
    head,
    merged_delta,
)
from registry import AdapterError, AdapterShapeError, LoraAdapter


class GateError(AdapterError):
    """Gates of the wrong shape, with NaN/Inf, or naming unknown adapters."""


# Rows per distinct row from which the per-row factors are built once per distinct row and
# copied out: a mixture row's build moves its factors about three times (gather A, gather B,
# weigh B), the copy out twice.
ROWS_PER_DISTINCT_TO_DEDUPE = 3


class Mode(StrEnum):
    mixture = "mixture"  # sum_i g_i * B_i A_i x  (output space, exact)
    fusion = "fusion"  # (sum_i g_i B_i)(sum_i g_i A_i) x  (LoraRetriever's parameter averaging)


class ComputePath(StrEnum):
    auto = "auto"
    dense = "dense"  # concatenated A/B: two matmuls whatever n
    gathered = "gathered"  # per-sample factors of the chosen adapters only
    merged = "merged"  # one composition for all rows, folded into the weights


class TokenGate(Protocol):
    """Per-token gates from a layer's input: (module name, x (b, t, d_in)) -> (b, t, n)."""

    def __call__(self, module: str, x: Tensor) -> Tensor: ...


def _in_out(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):  # GPT-2: weight is (d_in, d_out)
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


class MultiLoraLinear(nn.Module):
    """A target layer plus the composer's contribution; `base_layer` is the original
    module (PEFT's name for it)."""

    def __init__(self, base_layer: nn.Module, name: str, composer: Composer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self._composer = [composer]  # a list: keep it out of the module tree

    @property
    def weight(self) -> Tensor:  # models read it (T5 casts to wo.weight.dtype)
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        return self._composer[0]._apply(self.name, x, self.base_layer(x))


@dataclass
class Composition:
    """A composition ready to apply (`Composer.prepare`): in force inside `Composer.use`.
    It keeps the per-sample factors it builds, so using it again (a decode step of the same
    rows) costs nothing more; it is valid while the bank's adapters do not change."""

    fusion: Tensor | None  # (b,) bool: which rows average parameters; None with a token gate
    path: ComputePath
    gates: Tensor | None  # (b, n)
    token_gate: TokenGate | None
    k: int = 1  # most adapters any row uses
    span: int = 1  # adapters 0..span-1 hold every non-zero gate: the rest are left out
    fuses: bool = False  # whether any row averages parameters
    brief: bool = False  # used for a few passes only (merge=False): a build seldom pays back
    cache: dict[tuple, object] = field(default_factory=dict)  # per batch size, per module

    def distinct_rows(self, gates: Tensor, fusion: Tensor) -> tuple[Tensor, Tensor | None]:
        """The distinct (gate row, mode) pairs as rows of [gates | fusion], and each row's
        index among them (None: build every row). Rows repeat (LoraHub scores every candidate
        on several examples; many prompts share a routing); building the distinct rows'
        factors and copying them out to every row pays only when each distinct row stands
        for at least ROWS_PER_DISTINCT_TO_DEDUPE rows."""
        key = ("distinct", gates.shape[0])
        if key not in self.cache:
            keyed = torch.cat([gates, fusion[:, None].to(gates.dtype)], dim=1)
            rows, inverse = torch.unique(keyed, dim=0, return_inverse=True)
            built_once = len(rows) * ROWS_PER_DISTINCT_TO_DEDUPE <= len(keyed)
            self.cache[key] = (rows, inverse) if built_once else (keyed, None)
        return self.cache[key]

    def gates_for(self, batch: int, like: Tensor) -> Tensor:
        """(batch, span): the gates over the adapters in the span."""
        key = ("gates", batch, like.dtype)
        if key not in self.cache:
            gates = _expand(self.gates[:, : self.span], batch)
            self.cache[key] = gates.to(like.device, like.dtype)
        return self.cache[key]

    def fusion_for(self, batch: int) -> Tensor:
        return _expand(self.fusion, batch)


class Composer:
    """Attach an `AdapterBank` to a model; see the module docstring."""

    def __init__(self, model: nn.Module, bank: AdapterBank) -> None:
        self.model = model
        self.bank = bank
        self._active: Composition | None = None
        self._originals: dict[str, nn.Module] = {}
        self._heads: dict[tuple[str, int], ModuleStack] = {}  # see stack_for
        self._attach()

    @classmethod
    def attach(
        cls, model: nn.Module, adapters: Sequence[LoraAdapter], names: Sequence[str] | None = None
    ) -> Composer:
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        return cls(model, AdapterBank.build(adapters, names, dtype=dtype, device=device))

    def _attach(self) -> None:
        for name, stack in self.bank.modules.items():
            layer = get_layer(self.model, name)
            if not isinstance(layer, nn.Linear | Conv1D):
                raise AdapterShapeError(
                    f"{name}: a {type(layer).__name__}, not nn.Linear or Conv1D"
                )
            if _in_out(layer) != stack.shape:
                raise AdapterShapeError(
                    f"{name}: adapters have (d_in, d_out) = {stack.shape} but the model's layer "
                    f"is {_in_out(layer)}"
                )
        for name in self.bank.modules:
            layer = get_layer(self.model, name)
            self._originals[name] = layer
            set_layer(self.model, name, MultiLoraLinear(layer, name, self))

    def detach(self) -> nn.Module:
        """Put the original layers back; the model is bit-identical to before `attach`."""
        if self._active is not None:
            raise AdapterError("detach() inside a compose() block")
        for name, layer in self._originals.items():
            set_layer(self.model, name, layer)
        self._originals.clear()
        return self.model

    # -- gates ------------------------------------------------------------------------------
    def gates_for(self, routings: Sequence[Mapping[str, float]]) -> Tensor:
        """Per-sample gates (b, n) from one {adapter name: weight} per row."""
        g = torch.zeros(len(routings), len(self.bank))
        for row, routing in enumerate(routings):
            for name, weight in routing.items():
                g[row, self.bank.index(name)] = float(weight)
        return g

    def _check(self, gates: Tensor) -> Tensor:
        n = len(self.bank)
        if gates.dim() != 2 or gates.shape[1] != n:
            raise GateError(f"gates must have shape (batch, {n}), got {tuple(gates.shape)}")
        if not torch.isfinite(gates).all():
            raise GateError("gates contain NaN or Inf")
        return gates.float()

    @contextmanager
    def compose(
        self,
        gates: Tensor | None = None,
        mode: Mode | str | Sequence[Mode | str] = Mode.mixture,
        token_gate: TokenGate | None = None,
        path: ComputePath | str = ComputePath.auto,
        merge: bool = True,
    ) -> Iterator[None]:
        """Within the block, every forward pass applies the adapters with these gates.
        `mode` is one for all rows or one per row (mixture and fusion rows share a pass).
        `merge=False` says the block is brief (one or a few decode steps): `auto` then
        neither folds a batch-wide composition into the weights nor builds per-row factors
        for one token a row; both pay back over a long block (a whole generate)."""
        with self.use(self.prepare(gates, mode, token_gate, path, merge)):
            yield

    def prepare(
        self,
        gates: Tensor | None = None,
        mode: Mode | str | Sequence[Mode | str] = Mode.mixture,
        token_gate: TokenGate | None = None,
        path: ComputePath | str = ComputePath.auto,
        merge: bool = True,
    ) -> Composition:
        """The composition `compose` would apply, checked, for `use` (once or many times)."""
        if (gates is None) == (token_gate is None):
            raise GateError("give exactly one of gates (per sample) or token_gate (per token)")
        path = ComputePath(path)
        if token_gate is not None:
            if _modes(mode, 1).any() or path in (ComputePath.gathered, ComputePath.merged):
                raise GateError("per-token gates use the dense mixture path")
            n = len(self.bank)
            return Composition(None, path, None, token_gate, n, n)
        gates = self._check(gates)
        fusion = _modes(mode, len(gates))
        path = _choose_path(path, gates, fusion, merge)
        # A gate that needs a gradient has one even at zero: the span then holds them all.
        span = len(self.bank) if gates.requires_grad else _span(gates)
        k, fuses = _max_nonzero(gates), bool(fusion.any())
        return Composition(fusion, path, gates, None, k, span, fuses, brief=not merge)

    @contextmanager
    def use(self, composition: Composition) -> Iterator[None]:
        """Within the block, every forward pass applies `composition`."""
        if self._active is not None:
            raise AdapterError("compose() blocks do not nest")
        # One state for every path: nesting and detach() are refused inside any block.
        self._active = composition
        try:
            if composition.path == ComputePath.merged:
                c = composition
                with self._merged(c.gates[0], Mode.fusion if c.fusion[0] else Mode.mixture):
                    yield
            else:
                yield
        finally:
            self._active = None

    @contextmanager
    def _merged(self, weights: Tensor, mode: Mode) -> Iterator[None]:
        delta_fn = fused_delta if mode == Mode.fusion else merged_delta
        saved = {}
        try:
            with torch.no_grad():
                for name, stack in self.bank.modules.items():
                    w = self._originals[name].weight
                    saved[name] = w.detach().clone()
                    delta = delta_fn(stack, weights.to(stack.A_cat.device, stack.A_cat.dtype))
                    w.add_(
                        (delta.T if isinstance(self._originals[name], Conv1D) else delta).to(
                            w.dtype
                        )
                    )
            yield
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self._originals[name].weight.copy_(original)

    # -- the forward contribution -------------------------------------------------------------
    def _apply(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        """The base layer's output `out` plus the active composition's contribution."""
        active = self._active
        if active is None or active.path == ComputePath.merged:  # merged: in the weights
            return out
        stack = self.stack_for(name, active.span)
        if not len(stack.slot):  # no adapter in the span has this module
            return out
        x3, out3 = (x, out) if x.dim() == 3 else (x.unsqueeze(1), out.unsqueeze(1))
        if active.token_gate is not None:
            gates = active.token_gate(name, x3).to(x3.dtype)
            return add_dense(out3, x3, stack, gates).view(out.shape)
        gates = active.gates_for(x3.shape[0], x3)
        if _use_dense(active, stack, *x3.shape[:2]):
            return add_dense(out3, x3, stack, gates).view(out.shape)
        At, Bt = self._factors(active, name, stack, gates)
        return add_gathered(out3, x3, At, Bt).view(out.shape)

    def stack_for(self, name: str, span: int) -> ModuleStack:
        """A module's stack cut to adapters 0..span-1 (views: valid while the bank is)."""
        key = (name, span)
        if key not in self._heads:
            self._heads[key] = head(self.bank.modules[name], span)
        return self._heads[key]

    def _factors(
        self, active: Composition, name: str, stack: ModuleStack, gates: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-sample factors, made once per block and batch size (decode steps reuse them)."""
        key = (name, gates.shape[0])
        if key not in active.cache:
            keyed, inverse = active.distinct_rows(gates, active.fusion_for(gates.shape[0]))
            At, Bt = row_factors(stack, keyed[:, :-1], keyed[:, -1] > 0, active.k)
            active.cache[key] = (At[inverse], Bt[inverse]) if inverse is not None else (At, Bt)
        return active.cache[key]


def row_factors(s: ModuleStack, gates: Tensor, fusion: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row factors for rows that mix outputs (top-k adapters) or average parameters
    (`fusion`), zero-padded to one width K: gates (b, n), fusion (b,) bool ->
    At (b, d_in, K), Bt (b, K, d_out)."""
    if fusion.all():
        return gather_fusion(s, gates)
    _, idx = gates.abs().topk(k, dim=1)
    At, Bt = gather_mixture(s, idx, gates.gather(1, idx))
    if not fusion.any():
        return At, Bt
    fAt, fBt = gather_fusion(s, gates[fusion])
    width = max(At.shape[2], fAt.shape[2])
    At = torch.nn.functional.pad(At, (0, width - At.shape[2]))
    Bt = torch.nn.functional.pad(Bt, (0, 0, 0, width - Bt.shape[1]))
    At[fusion] = torch.nn.functional.pad(fAt, (0, width - fAt.shape[2]))
    Bt[fusion] = torch.nn.functional.pad(fBt, (0, 0, 0, width - fBt.shape[1]))
    return At, Bt


def _modes(mode: Mode | str | Sequence[Mode | str], batch: int) -> Tensor:
    """(batch,) bool: which rows use fusion; one mode for all rows or one per row."""
    if isinstance(mode, str):
        return torch.full((batch,), Mode(mode) == Mode.fusion)
    if len(mode) != batch:
        raise GateError(f"{len(mode)} modes for {batch} rows")
    return torch.tensor([Mode(m) == Mode.fusion for m in mode], dtype=torch.bool)


def _choose_path(path: ComputePath, gates: Tensor, fusion: Tensor, merge: bool) -> ComputePath:
    """`auto` merges when every row has the same gates and mode and gradients are off: the
    delta is folded into the weights outside autograd, so nothing in the block gets one."""
    same = bool((gates == gates[:1]).all()) and bool((fusion == fusion[0]).all())
    if path == ComputePath.dense and fusion.any():
        raise GateError("fusion rows need the gathered path")
    if path == ComputePath.merged and not same:
        raise GateError("the merged path needs the same gates and mode on every row")
    if path == ComputePath.merged and torch.is_grad_enabled():
        raise GateError("the merged path works with gradients off (torch.no_grad())")
    if path == ComputePath.auto and same and merge and not torch.is_grad_enabled():
        return ComputePath.merged
    return path


def _max_nonzero(gates: Tensor) -> int:
    return max(int((gates != 0).sum(1).max()), 1)


def _span(gates: Tensor) -> int:
    """1 + the last adapter any row gives a non-zero gate (at least 1)."""
    used = (gates != 0).any(0).nonzero()
    return int(used[-1]) + 1 if len(used) else 1


def _use_dense(active: Composition, stack: ModuleStack, rows: int, tokens: int) -> bool:
    """Dense multiplies all R rank rows of the stack (cut to the span) for each token;
    gathered builds per-row factors once (k * r rank rows a row) and reuses them. Reused,
    they are cheaper: gather when that at least halves the multiplies. A brief composition
    (the engine's decode steps while a lane's rows stay the same: one to a few steps) at one
    token a row goes dense while R <= rows * k * r instead, since building the factors costs
    more than they save (CPU, one module, 32 rows of 3 of 24 rank-8 adapters: a 1.9 ms build
    against 0.17 ms dense and 0.09 ms gathered a step)."""
    if active.path != ComputePath.auto:
        return active.path == ComputePath.dense
    if active.fuses:
        return False
    dense_rows, k_rank = stack.A_cat.shape[0], active.k * stack.A_pad.shape[1]
    if tokens == 1 and active.brief:
        return dense_rows <= rows * k_rank
    return 2 * k_rank > dense_rows


def _expand(gates: Tensor, batch: int) -> Tensor:
    """generate() repeats each row for beams / num_return_sequences (repeat_interleave)."""
    if gates.shape[0] == batch:
        return gates
    if batch % gates.shape[0]:
        raise GateError(f"gates are for {gates.shape[0]} rows but the batch has {batch}")
    return gates.repeat_interleave(batch // gates.shape[0], dim=0)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AdapterShapeError(f"{name}: no such module in {type(model).__name__}") from None


def set_layer(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)
