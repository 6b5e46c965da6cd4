"""A bounded in-memory cache of loaded adapters."""

from __future__ import annotations

from collections import OrderedDict

from registry.adapter import LoraAdapter
from registry.store import Registry


class AdapterCache:
    """Loaded adapters, least recently used dropped first once their tensors take more
    than `max_bytes` (the most recent one always stays)."""

    def __init__(self, registry: Registry, max_bytes: int = 1 << 30) -> None:
        self.registry = registry
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LoraAdapter] = OrderedDict()

    def get(self, name: str) -> LoraAdapter:
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        adapter = self.registry.load(name)
        self._items[name] = adapter
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            self._items.popitem(last=False)
        return adapter

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())
