"""The built-in engine's adapter pager: adapters in a bounded host cache (by bytes) and in
a fixed number of slots of one composer bank (S-LoRA's idea, at our scale). A miss loads
one adapter and writes it into one slot in place: no re-attach, nothing else moves. A slot
that a running row uses is never evicted: the engine admits no more distinct adapters
than there are slots.

Adapters are keyed by what they are (name and sha256), never by name alone, so an adapter
replaced while the server runs is a different entry and a request never gets weights
other than those it reports. A failure names the adapters at fault (`StackError.bad`), so
the engine fails only the requests that need them; every slot already filled keeps working.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from composition import AdapterBank, Composer
from registry import AdapterError, LoraAdapter


@dataclass(frozen=True, order=True)
class AdapterKey:
    """One version of a registered adapter."""

    name: str
    sha256: str


class StackError(Exception):
    """Paging in failed; `bad` maps each adapter at fault to what went wrong."""

    def __init__(self, bad: Mapping[AdapterKey, str]) -> None:
        super().__init__("; ".join(f"{k.name}: {why}" for k, why in bad.items()))
        self.bad = dict(bad)


Loader = Callable[[AdapterKey], LoraAdapter]
Fits = Callable[[nn.Module, LoraAdapter], str | None]  # None, or why it does not fit


@dataclass(frozen=True)
class PagerConfig:
    """slots: adapters on the model at once; rank: each slot's rank (adapters of a higher
    rank make the bank grow once); host_bytes: loaded adapters kept in memory for reuse."""

    slots: int = 64
    rank: int = 8  # the zoo's; a higher-rank adapter grows the bank once
    host_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if min(self.slots, self.rank, self.host_bytes) <= 0:
            raise ValueError(f"pager limits must be positive: {self}")


class AdapterPager:
    """See the module docstring. Engine thread only."""

    def __init__(self, model: nn.Module, load: Loader, fits: Fits, config: PagerConfig) -> None:
        self.model = model
        self.load = load
        self.fits = fits
        self.config = config
        self.composer: Composer | None = None
        self.slot_of: OrderedDict[AdapterKey, int] = OrderedDict()  # least recent first
        self._host: OrderedDict[AdapterKey, LoraAdapter] = OrderedDict()
        self._host_nbytes = 0  # kept as a sum: adding one up per miss is O(cache x modules)
        self.loads = 0  # adapters read from the registry (misses of the host cache)

    def __contains__(self, key: AdapterKey) -> bool:
        return key in self.slot_of

    def ensure(self, needed: Collection[AdapterKey]) -> None:
        """Every key in `needed` has a slot, or StackError naming the adapters at fault
        (the others were paged in)."""
        if len(set(needed)) > self.config.slots:
            raise ValueError(
                f"{len(set(needed))} adapters at once; the bank has {self.config.slots} slots"
            )
        for key in needed:
            if key in self.slot_of:
                self.slot_of.move_to_end(key)
        bad = {}
        for key in sorted(k for k in set(needed) if k not in self.slot_of):
            try:
                self._page_in(key, needed)
            except AdapterError as e:
                bad[key] = str(e)
        if bad:
            raise StackError(bad)

    def gates(self, rows: list[Mapping[AdapterKey, float]]) -> Tensor:
        """Per-row gates (rows, slots)."""
        g = torch.zeros(len(rows), self.config.slots)
        for i, row in enumerate(rows):
            for key, weight in row.items():
                g[i, self.slot_of[key]] = weight
        return g

    def close(self) -> None:
        if self.composer is not None:
            self.composer.detach()
            self.composer = None
        self.slot_of.clear()

    def _page_in(self, key: AdapterKey, needed: Collection[AdapterKey]) -> None:
        adapter = self._host_get(key)
        why = self.fits(self.model, adapter)
        if why is not None:
            raise AdapterError(why)
        bank = self.composer.bank if self.composer is not None else None
        if bank is None or bank.fits_slot(adapter) is not None:
            bank = self._grow(adapter)
        slot = self._free_slot(needed)
        bank.write_slot(slot, adapter)
        self.slot_of[key] = slot

    def _free_slot(self, needed: Collection[AdapterKey]) -> int:
        used = set(self.slot_of.values())
        free = next((i for i in range(self.config.slots) if i not in used), None)
        if free is not None:
            return free
        victim = next(k for k in self.slot_of if k not in needed)  # least recently used
        return self.slot_of.pop(victim)

    def _grow(self, adapter: LoraAdapter) -> AdapterBank:
        """A bank that also holds `adapter`'s modules and rank, the slots copied over;
        attached in place of the old one (restored if attaching fails)."""
        old = self.composer
        shapes = dict(old.bank.modules.items()) if old is not None else {}
        modules = {name: s.shape for name, s in shapes.items()}
        modules |= {name: (m.d_in, m.d_out) for name, m in adapter.modules.items()}
        rank = max(self.config.rank, adapter.rank, *(s.A_pad.shape[1] for s in shapes.values()))
        param = next(self.model.parameters())
        bank = AdapterBank.slots(self.config.slots, rank, modules, param.dtype, param.device)
        for name, s in shapes.items():  # the filled slots, as they were
            r = s.A_pad.shape[1]
            bank.modules[name].A_pad[:, :r] = s.A_pad
            bank.modules[name].B_pad[:, :, :r] = s.B_pad
        if old is not None:
            old.detach()
        try:
            self.composer = Composer(self.model, bank)
        except AdapterError:
            self.composer = Composer(self.model, old.bank) if old is not None else None
            raise
        return bank

    def _host_get(self, key: AdapterKey) -> LoraAdapter:
        if key in self._host:
            self._host.move_to_end(key)
            return self._host[key]
        adapter = self.load(key)
        self.loads += 1
        self._host[key] = adapter
        self._host_nbytes += adapter.nbytes
        while len(self._host) > 1 and self._host_nbytes > self.config.host_bytes:
            self._host_nbytes -= self._host.popitem(last=False)[1].nbytes
        return adapter

    @property
    def host_bytes(self) -> int:
        return self._host_nbytes
