"""`Hub`: a base model + a registry + a router + the composer, behind one call.

    hub = Hub.open(registry="my-registry")
    answers = hub.generate(["What is 12 plus 30?", "Translate 'cat' to French."], k=3)
    for a in answers:
        print(a.text, a.routing.as_dict())

Every prompt is routed on its own; the adapters the batch needs are stacked once and the
whole mixed batch is answered in one batched `generate` (each row with its composition).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from torch import Tensor, nn

from composition import Composer, get_layer
from lorahub import inference
from lorahub.models import DEFAULT_MODEL, BaseModel, load_base_model, loraplex_home
from registry import AdapterCache, AdapterError, BaseModelMismatchError, Embedder, Registry
from router import Retriever, RetrieverConfig, Routing, SentenceEmbedder


class Compose(StrEnum):
    mixture = "mixture"  # top-k adapters, outputs mixed by the routing weights
    fusion = "fusion"  # top-k adapters, parameters averaged per prompt (LoraRetriever)
    selection = "selection"  # the top-1 adapter
    none = "none"  # the base model alone


@dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    routing: Routing


def _fits(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> bool:
    """Does every module of these shapes exist in `model` with the same (d_in, d_out)?"""
    for name, (d_in, d_out) in shapes.items():
        try:
            layer = get_layer(model, name)
        except AdapterError:
            return False
        weight = getattr(layer, "weight", None)
        if weight is None or weight.dim() != 2:
            return False
        # nn.Linear stores (d_out, d_in); GPT-2's Conv1D (d_in, d_out)
        if tuple(weight.shape) not in {(d_out, d_in), (d_in, d_out)}:
            return False
    return True


class Hub:
    def __init__(self, registry: Registry, base: BaseModel, retriever: Retriever) -> None:
        self.registry = registry
        self.base = base
        self.retriever = retriever
        self.adapters = AdapterCache(registry)
        self.base_models = self._compatible_base_models()
        all_bases = {r.base_model.name for r in registry.list()}
        self._only = None if set(self.base_models) == all_bases else self.base_models

    @classmethod
    def open(
        cls,
        registry: str | Path | Registry | None = None,
        base_model: str | BaseModel = DEFAULT_MODEL,
        embedder: Embedder | None = None,
        retriever: RetrieverConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Hub:
        if not isinstance(registry, Registry):
            registry = Registry(
                registry or loraplex_home() / "registry", embedder=embedder or SentenceEmbedder()
            )
        base = (
            base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, dtype)
        )
        return cls(registry, base, Retriever(registry, retriever))

    def _compatible_base_models(self) -> list[str]:
        """Base-model names in the registry whose adapters fit the loaded model (checked on
        module shapes, before any generation)."""
        names = {r.base_model.name for r in self.registry.list()}
        fit = sorted(n for n in names if _fits(self.base.model, self.registry.shapes(n)))
        if names and not fit:
            raise BaseModelMismatchError(
                f"none of the registry's adapters fit {self.base.name!r}: they were made for "
                f"{sorted(names)} (module names or shapes differ)"
            )
        if len(fit) < len(names):
            warnings.warn(
                f"adapters for {sorted(names - set(fit))} do not fit {self.base.name!r} "
                "and are never chosen",
                stacklevel=3,
            )
        return fit

    # -- routing ------------------------------------------------------------------------------
    def route(
        self,
        prompts: Sequence[str],
        k: int = 3,
        compose: Compose | str = Compose.mixture,
        exclude: Sequence[str] = (),
        exclude_each: Sequence[Sequence[str]] | None = None,
    ) -> list[Routing]:
        compose = Compose(compose)
        if compose == Compose.none or not self.base_models:
            return [Routing()] * len(prompts)
        k = 1 if compose == Compose.selection else k
        # only adapters that fit the loaded model may be chosen (no filter, and so the faiss
        # index, when every registered adapter fits)
        return self.retriever.route(
            prompts, k=k, exclude=exclude, exclude_each=exclude_each, base_model=self._only
        )

    @contextmanager
    def composed(
        self, routings: Sequence[Routing]
    ) -> Iterator[tuple[Composer | None, Tensor | None]]:
        """The routed adapters attached to the model (stacked once for the whole batch)
        and the per-row gates; detached again afterwards."""
        names = list(dict.fromkeys(n for r in routings for n in r.adapters))
        if not names:
            yield None, None
            return
        composer = Composer.attach(self.base.model, [self.adapters.get(n) for n in names], names)
        try:
            yield composer, composer.gates_for([r.as_dict() for r in routings])
        finally:
            composer.detach()

    # -- answering ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        k: int = 3,
        compose: Compose | str = Compose.mixture,
        exclude: Sequence[str] = (),
        exclude_each: Sequence[Sequence[str]] | None = None,
        routings: Sequence[Routing] | None = None,
        max_new_tokens: int = 32,
        batch_size: int | None = None,
    ) -> list[Answer]:
        """Route every prompt (or use `routings`), then answer the mixed batch in one
        batched generate (`batch_size` rows at a time; default all)."""
        if not prompts:
            raise ValueError("no prompts to answer")
        routings = self._routings(prompts, routings, k, compose, exclude, exclude_each)
        with self.composed(routings) as (composer, gates):
            texts = inference.generate(
                self.base,
                prompts,
                composer,
                gates,
                _mode(compose),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size or len(prompts),
            )
        return [Answer(p, t, r) for p, t, r in zip(prompts, texts, routings, strict=True)]

    def score(
        self,
        prompts: Sequence[str],
        options: Sequence[Sequence[str]],
        k: int = 3,
        compose: Compose | str = Compose.mixture,
        exclude: Sequence[str] = (),
        exclude_each: Sequence[Sequence[str]] | None = None,
        routings: Sequence[Routing] | None = None,
    ) -> list[list[float]]:
        """Log-likelihood of each option after its prompt (multiple choice)."""
        if len(prompts) != len(options):
            raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
        routings = self._routings(prompts, routings, k, compose, exclude, exclude_each)
        with self.composed(routings) as (composer, gates):
            return inference.option_logprobs(
                self.base, prompts, options, composer, gates, _mode(compose)
            )

    def _routings(
        self,
        prompts: Sequence[str],
        routings: Sequence[Routing] | None,
        k: int,
        compose: Compose | str,
        exclude: Sequence[str],
        exclude_each: Sequence[Sequence[str]] | None,
    ) -> list[Routing]:
        """The given routings, or the router's."""
        if routings is not None:
            if len(routings) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(routings)} routings")
            return list(routings)
        return self.route(prompts, k, compose, exclude, exclude_each)

    def close(self) -> None:
        self.registry.close()


def _mode(compose: Compose | str) -> str:
    """The composer's mode for a compose choice (fusion averages parameters per row)."""
    return "fusion" if Compose(compose) == Compose.fusion else "mixture"
