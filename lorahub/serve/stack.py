"""The built-in engine's adapter stack: which adapters the composer holds, keyed by what
they are (name and sha256), never by name alone, so an adapter replaced while the server
runs is a different entry and a request never gets weights other than those it reports.

Changes are transactional: adapters are loaded and checked against the model before the
composer is touched, and a failed attach puts the previous composer back. A failure
names the adapters at fault (`StackError.bad`), so the engine fails only the requests
that need them; everything already stacked keeps working.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from composition import Composer
from registry import AdapterError, LoraAdapter


@dataclass(frozen=True, order=True)
class AdapterKey:
    """One version of a registered adapter."""

    name: str
    sha256: str

    @property
    def slot(self) -> str:
        """Its name inside the composer's bank (two versions of a name may coexist)."""
        return f"{self.name}@{self.sha256[:16]}"


class StackError(Exception):
    """Stacking failed; `bad` maps each adapter at fault to what went wrong."""

    def __init__(self, bad: Mapping[AdapterKey, str]) -> None:
        super().__init__("; ".join(f"{k.name}: {why}" for k, why in bad.items()))
        self.bad = dict(bad)


Loader = Callable[[AdapterKey], LoraAdapter]
Fits = Callable[[nn.Module, LoraAdapter], str | None]  # None, or why it does not fit


class AdapterStack:
    """Up to `capacity` adapters attached to `model` through one Composer, least recently
    used dropped first (never one that is `needed` now)."""

    def __init__(self, model: nn.Module, load: Loader, fits: Fits, capacity: int) -> None:
        self.model = model
        self.load = load
        self.fits = fits
        self.capacity = capacity
        self.composer: Composer | None = None
        self._held: OrderedDict[AdapterKey, LoraAdapter] = OrderedDict()

    def __contains__(self, key: AdapterKey) -> bool:
        return key in self._held

    def ensure(self, needed: Collection[AdapterKey]) -> None:
        """The composer holds every key in `needed`, or StackError and nothing changed."""
        for key in needed:
            if key in self._held:
                self._held.move_to_end(key)
        missing = sorted(k for k in set(needed) if k not in self._held)
        if not missing:
            return
        loaded, bad = {}, {}
        for key in missing:
            try:
                adapter = self.load(key)
                why = self.fits(self.model, adapter)
            except AdapterError as e:
                why = str(e)
            if why is None:
                loaded[key] = adapter
            else:
                bad[key] = why
        if bad:
            raise StackError(bad)
        held = OrderedDict(self._held)
        held.update(loaded)
        for key in [k for k in held if k not in needed]:
            if len(held) <= max(self.capacity, len(needed)):
                break
            del held[key]
        self._attach(held)

    def _attach(self, held: OrderedDict[AdapterKey, LoraAdapter]) -> None:
        old = self.composer
        if old is not None:
            old.detach()
        try:
            self.composer = Composer.attach(self.model, list(held.values()), [k.slot for k in held])
        except AdapterError as e:  # the adapters do not stack together: keep what worked
            self.composer = Composer(self.model, old.bank) if old is not None else None
            raise StackError({k: str(e) for k in held if k not in self._held}) from e
        self._held = held

    def gates(self, rows: list[Mapping[AdapterKey, float]]) -> Tensor:
        """Per-row gates (rows, n) over the composer's bank."""
        return self.composer.gates_for([{k.slot: w for k, w in r.items()} for r in rows])

    def close(self) -> None:
        if self.composer is not None:
            self.composer.detach()
            self.composer = None
        self._held.clear()
