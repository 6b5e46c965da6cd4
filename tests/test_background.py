"""The background class's inputs ship with their embeddings by the default embedder, so a
fresh registry routes at once instead of embedding 1,936 texts first."""

from __future__ import annotations

import numpy as np

from registry.embedding import examples_key
from router.background import background_texts, shipped_vectors


def test_the_shipped_background_vectors_are_the_default_embedders(embedder) -> None:
    texts = background_texts()
    vectors = shipped_vectors(examples_key(embedder, list(texts)))
    assert vectors is not None and vectors.shape == (len(texts), 384)
    some = [0, len(texts) // 2, len(texts) - 1]
    fresh = embedder.encode([texts[i] for i in some])
    np.testing.assert_allclose(vectors[some].numpy(), fresh, atol=1e-5)
    assert shipped_vectors(examples_key(embedder, list(texts[:-1]))) is None  # other texts
