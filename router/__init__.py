"""router: which adapters (and how much of each) for this input."""

from router.arrow import ArrowConfig, ArrowGate, arrow_gate, prototypes, top_right_singular_vector
from router.classifier import ClassifierRouter
from router.embedder import DEFAULT_MODEL, LORARETRIEVER_PREFIX, SentenceEmbedder
from router.retriever import Retriever, RetrieverConfig, Weighting
from router.routing import Routing

__all__ = [
    "DEFAULT_MODEL",
    "LORARETRIEVER_PREFIX",
    "ArrowConfig",
    "ArrowGate",
    "ClassifierRouter",
    "Retriever",
    "RetrieverConfig",
    "Routing",
    "SentenceEmbedder",
    "Weighting",
    "arrow_gate",
    "prototypes",
    "top_right_singular_vector",
]
