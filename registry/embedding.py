"""The embedder interface the registry needs. The implementation (sentence-transformers)
belongs to `router`; anything with these members works."""

from __future__ import annotations

import hashlib
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


def meta_texts(meta: AdapterMeta) -> list[str]:
    """The texts that stand for an adapter: its example inputs, else its description."""
    texts = [t for t in meta.examples if t.strip()]
    if not texts and meta.description and meta.description.strip():
        texts = [meta.description]
    return texts


def examples_key(embedder: Embedder, texts: Sequence[str]) -> str:
    """A cache key naming the embedder and the texts it embedded."""
    digest = hashlib.sha256("\n\0".join([embedder.id, *texts]).encode()).hexdigest()
    return f"examples-{digest[:32]}"


def mean_embedding(vectors: np.ndarray) -> np.ndarray:
    """An adapter's embedding: the normalized mean of its texts' embeddings (LoraRetriever,
    Zhao et al. 2024)."""
    return normalize(vectors.mean(axis=0))
