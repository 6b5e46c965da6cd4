"""The `Router` protocol and the one table of routers, so the hub, CLI, evaluation and
server take any router by name: `make_router("arrow", registry)`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from registry import Registry
from router.arrow import ArrowConfig
from router.classifier import ClassifierRouter
from router.retriever import Retriever, RetrieverConfig
from router.routing import Routing
from router.task import TaskRouter, TaskRouterConfig


class Router(Protocol):
    """One `Routing` per prompt, at most `k` adapters each (the router's default when None;
    a router unsure of a prompt may mix its few likeliest equally);
    `exclude_each[i]` names adapters prompt i must not get (OOD evaluation, adapters that
    do not fit the loaded model)."""

    def route(
        self,
        prompts: Sequence[str],
        k: int | None = None,
        exclude_each: Sequence[Sequence[str]] | None = None,
    ) -> list[Routing]: ...


class ArrowRouter:
    """Arrow (Ostapenko et al. 2024) as a router: data-free, so every prompt gets the whole
    pool (less its exclusions) gated per token inside the pass, k adapters per token."""

    def __init__(self, registry: Registry, config: ArrowConfig | None = None) -> None:
        self.registry = registry
        self.config = config or ArrowConfig()

    def route(
        self,
        prompts: Sequence[str],
        k: int | None = None,
        exclude_each: Sequence[Sequence[str]] | None = None,
    ) -> list[Routing]:
        per_token = ArrowConfig(k or self.config.k, self.config.temperature)
        pool = self.registry.names()
        out = []
        for i in range(len(prompts)):
            banned = set(exclude_each[i]) if exclude_each is not None else set()
            names = tuple(n for n in pool if n not in banned)
            prior = tuple([1.0 / len(names)] * len(names))
            out.append(Routing(names, prior, per_token=per_token) if names else Routing())
        return out


@dataclass(frozen=True)
class RouterOptions:
    """What the routers of the table may need: the retriever's, the task router's and
    Arrow's configs, and the folder of a saved `ClassifierRouter` (`loraplex route --router
    classifier`)."""

    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    task: TaskRouterConfig = field(default_factory=TaskRouterConfig)
    arrow: ArrowConfig = field(default_factory=ArrowConfig)
    classifier: Path | None = None


def _classifier(registry: Registry, options: RouterOptions) -> Router:
    if options.classifier is None:
        raise ValueError("the classifier router needs the folder of a saved ClassifierRouter")
    if registry.embedder is None:
        raise ValueError("the classifier router needs a registry opened with an embedder")
    return ClassifierRouter.load(options.classifier, registry.embedder)


ROUTERS: dict[str, Callable[[Registry, RouterOptions], Router]] = {
    "retriever": lambda registry, o: Retriever(registry, o.retriever),  # LoraRetriever
    "task": lambda registry, o: TaskRouter(registry, o.task),  # LoRAuter-style, abstains
    "classifier": _classifier,
    "arrow": lambda registry, o: ArrowRouter(registry, o.arrow),
}


# The router `Hub`, the CLI and the server use unless told otherwise: the one the validation
# split chose (benchmarks/tune_router.py, results/tune_router.json).
DEFAULT_ROUTER = "task"


def make_router(name: str, registry: Registry, options: RouterOptions | None = None) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}")
    return ROUTERS[name](registry, options or RouterOptions())
