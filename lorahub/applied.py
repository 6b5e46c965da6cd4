"""`Applied`: what a batch of rows gets from the composer — the one handle between a
routing (or a learned composition) and a composed forward pass.

    with hub.composed(routings, modes) as applied:       # adapters attached once
        with applied.rows(torch.tensor([0, 3])):         # rows 0 and 3 of the batch
            model.generate(...)                          # each row its own composition

Every caller (Hub.generate / score, evaluation, LoraHub scoring, the zoo, the server)
composes through `Applied.rows`, and so through `Composer.compose`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from torch import Tensor, nn

from composition import Composer, Composition, Mode, TokenGate
from registry import LoraAdapter


@dataclass(frozen=True)
class Applied:
    """Adapters attached to the model, and per row either gates (rows, n) with a mode each,
    or one per-token gate for all rows. The empty `Applied()` is the base model."""

    composer: Composer | None = None
    gates: Tensor | None = None  # (rows, n) over composer.bank.names
    modes: tuple[Mode, ...] = ()  # one per row of gates
    token_gate: TokenGate | None = None
    merge: bool = True  # may fold a batch-wide composition into the weights (see compose)

    def rows(self, idx: Tensor) -> AbstractContextManager:
        """The composition of rows `idx` (a 1-D long tensor) for one forward or generate."""
        return self.use(self.prepare(idx))

    def prepare(self, idx: Tensor) -> Composition | None:
        """The composition of rows `idx`, ready to `use` for any number of forwards (its
        per-sample factors are built once); None: the base model."""
        if self.composer is None:
            return None
        if self.token_gate is not None:
            return self.composer.prepare(token_gate=self.token_gate)
        modes = [self.modes[i] for i in idx.tolist()]
        return self.composer.prepare(self.gates[idx], mode=modes, merge=self.merge)

    def use(self, composition: Composition | None) -> AbstractContextManager:
        return nullcontext() if composition is None else self.composer.use(composition)


@contextmanager
def attached(
    model: nn.Module,
    adapters: Sequence[LoraAdapter],
    names: Sequence[str],
    gates: Tensor | None = None,
    modes: Sequence[Mode | str] | Mode | str = Mode.mixture,
    token_gate: TokenGate | None = None,
) -> Iterator[Applied]:
    """Attach `adapters` for the block; rows get `gates` (with `modes`, one or one per row)
    or the `token_gate`; the model is bit-identical afterwards."""
    composer = Composer.attach(model, adapters, names)
    if gates is None:
        modes = ()
    elif isinstance(modes, str):
        modes = [modes] * len(gates)
    try:
        yield Applied(composer, gates, tuple(Mode(m) for m in modes), token_gate)
    finally:
        composer.detach()


NOTHING = Applied()  # the base model alone
