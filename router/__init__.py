"""router: which adapters (and how much of each) for this input."""

from router.arrow import ArrowConfig, ArrowGate, arrow_gate, prototypes, top_right_singular_vector
from router.classifier import ClassifierRouter
from router.embedder import DEFAULT_MODEL, LORARETRIEVER_PREFIX, SentenceEmbedder
from router.retriever import Retriever, RetrieverConfig, Weighting
from router.routers import DEFAULT_ROUTER, ROUTERS, ArrowRouter, Router, RouterOptions, make_router
from router.routing import Decision, Routing
from router.task import EXAMPLES_ADVISED, TaskRouter, TaskRouterConfig

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_ROUTER",
    "EXAMPLES_ADVISED",
    "LORARETRIEVER_PREFIX",
    "ROUTERS",
    "ArrowConfig",
    "ArrowGate",
    "ArrowRouter",
    "ClassifierRouter",
    "Decision",
    "Retriever",
    "RetrieverConfig",
    "Router",
    "RouterOptions",
    "Routing",
    "SentenceEmbedder",
    "TaskRouter",
    "TaskRouterConfig",
    "Weighting",
    "arrow_gate",
    "make_router",
    "prototypes",
    "top_right_singular_vector",
]
