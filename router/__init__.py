"""router: which adapters (and how much of each) for this input."""

from router.embedder import DEFAULT_MODEL, LORARETRIEVER_PREFIX, SentenceEmbedder

__all__ = ["DEFAULT_MODEL", "LORARETRIEVER_PREFIX", "SentenceEmbedder"]
