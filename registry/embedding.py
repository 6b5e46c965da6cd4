"""The embedder interface the registry needs. The implementation (sentence-transformers)
belongs to `router`; anything with these members works."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from registry.adapter import AdapterMeta


class Embedder(Protocol):
    """Maps texts to L2-normalized float32 vectors of size `dim`.

    `id` names the model (and instruction prefix) so that vectors from different
    embedders are never compared.
    """

    id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (len(texts), dim) float32, rows of unit norm."""
        ...


def normalize(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


def embed_meta(meta: AdapterMeta, embedder: Embedder) -> tuple[np.ndarray, int] | None:
    """An adapter's embedding and how many texts made it: the normalized mean of its
    example inputs' embeddings (LoraRetriever, Zhao et al. 2024), else its description's."""
    texts = [t for t in meta.examples if t.strip()]
    if not texts and meta.description and meta.description.strip():
        texts = [meta.description]
    if not texts:
        return None
    vectors = embedder.encode(texts)
    return normalize(vectors.mean(axis=0)), len(texts)
