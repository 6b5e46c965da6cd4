"""A bounded in-memory cache of loaded adapters, keyed by content (sha256), never by name:
an adapter replaced under its name while a process runs is a cache miss, not stale
weights."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

from registry.adapter import LoraAdapter
from registry.store import Registry


class AdapterCache:
    """Loaded adapters, least recently used dropped first once their tensors take more
    than `max_bytes` (the most recent one always stays)."""

    def __init__(self, registry: Registry, max_bytes: int = 1 << 30) -> None:
        self.registry = registry
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()  # a server reads it from several threads

    def get(self, name: str) -> LoraAdapter:
        """The adapter registered as `name` now (one catalogue read when cached)."""
        rec = self.registry.get(name)
        with self._lock:
            cached = self._items.get(rec.sha256)
            if cached is not None:
                self._items.move_to_end(rec.sha256)
        if cached is not None:
            if (cached.base_model, cached.meta) == (rec.base_model, rec.meta):
                return cached
            # the same content registered under another name (or its metadata since changed)
            return replace(cached, base_model=rec.base_model, meta=rec.meta)
        adapter = self.registry.load(name, sha256=rec.sha256)
        with self._lock:
            self._items[rec.sha256] = adapter
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                self._items.popitem(last=False)
        return adapter

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())
