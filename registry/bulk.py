"""Registration in bulk (`Registry.register_many`): what goes in, what comes out, and the
batched embedding that lets thousands of adapters share a few `encode` calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry.adapter import LoraAdapter
from registry.catalogue import AdapterRecord
from registry.embedding import Embedder
from registry.errors import AdapterError

# (stage, done, total): "read" once per source, "embed" once per batch of texts.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Submission:
    """One source for `register_many` and what to say about it; None keeps the
    adapter's own metadata (as `Registry.register`'s arguments do)."""

    source: str | Path | LoraAdapter
    name: str | None = None
    examples: tuple[str, ...] | None = None
    description: str | None = None
    tags: tuple[str, ...] | None = None
    task: str | None = None

    def meta_changes(self) -> dict[str, object]:
        changes = dict(
            examples=self.examples, description=self.description, tags=self.tags, task=self.task
        )
        return {k: v for k, v in changes.items() if v is not None}

    def label(self) -> str:
        """How a report names the source before its name is known."""
        if isinstance(self.source, LoraAdapter):
            return self.name or "<in-memory adapter>"
        return str(self.source)


@dataclass(frozen=True)
class Registration:
    """One source's outcome: its record, or the error that kept it out (the registry
    holds nothing of a failed source)."""

    source: str
    name: str | None
    record: AdapterRecord | None = None
    error: AdapterError | OSError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        if self.record is not None:
            return {"source": self.source, "name": self.name, "sha256": self.record.sha256}
        return {"source": self.source, "name": self.name, "error": _one_line(self.error)}


def _one_line(error: BaseException | None) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def encode_in_batches(
    embedder: Embedder,
    texts: Sequence[str],
    batch_size: int,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Each distinct text's vector (dim,), from one `encode` call per `batch_size` texts."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    unique = list(dict.fromkeys(texts))
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        vectors = np.asarray(embedder.encode(batch), np.float32)
        out.update(zip(batch, vectors, strict=True))
        if progress is not None:
            progress("embed", min(start + batch_size, len(unique)), len(unique))
    return out
