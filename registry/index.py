"""A faiss inner-product index over unit vectors (= cosine), keyed by catalogue row id.

Exact (`IndexFlatIP`) while small, HNSW when large. It is a cache: the catalogue holds the
vectors, and the index is rebuilt from it whenever its stamp does not match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import faiss
import numpy as np

HNSW_FROM = 20_000  # below this, exact search is fast enough (< 1 ms / query at 384-d)
HNSW_M = 32  # graph degree; faiss' usual default for ~100k points
HNSW_EF_SEARCH = 128  # recall@10 > 0.99 on 100k x 384 in bench_registry


class IndexKind(StrEnum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"


def _make(kind: IndexKind, dim: int, n: int) -> faiss.Index:
    if kind == IndexKind.auto:
        kind = IndexKind.hnsw if n >= HNSW_FROM else IndexKind.flat
    if kind == IndexKind.flat:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efSearch = HNSW_EF_SEARCH
    return faiss.IndexIDMap2(inner)


@dataclass
class VectorIndex:
    """`stamp` identifies the catalogue state the index was built from."""

    index: faiss.Index
    stamp: str

    @classmethod
    def build(
        cls, ids: np.ndarray, vectors: np.ndarray, stamp: str, kind: IndexKind = IndexKind.auto
    ) -> VectorIndex:
        """ids: (n,) int64; vectors: (n, dim) float32 unit rows."""
        index = _make(IndexKind(kind), vectors.shape[1], len(ids))
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
        return cls(index, stamp)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids: (n,) int64; vectors: (n, dim) unit rows."""
        self.index.add_with_ids(
            np.ascontiguousarray(vectors, np.float32).reshape(len(ids), -1),
            np.asarray(ids, np.int64),
        )

    def remove(self, id_: int) -> bool:
        """Remove one id; False when the index kind cannot (HNSW), so rebuild instead."""
        if not isinstance(faiss.downcast_index(self.index.index), faiss.IndexFlat):
            return False
        self.index.remove_ids(np.array([id_], np.int64))
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (q, dim) -> scores (q, k) and ids (q, k); missing hits have id -1."""
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    def save(self, folder: Path) -> None:
        """One file named by the stamp, written atomically; older ones are removed."""
        path = folder / f"index.{self.stamp}.faiss"
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        for old in folder.glob("index.*.faiss"):
            if old != path:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, stamp: str) -> VectorIndex | None:
        """The saved index for `stamp`, or None if absent or unreadable (rebuild then)."""
        path = folder / f"index.{stamp}.faiss"
        try:
            return cls(faiss.read_index(str(path)), stamp) if path.exists() else None
        except RuntimeError:
            return None
