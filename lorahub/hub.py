"""`Hub`: a base model + a registry + a router + the composer, behind one call.

    hub = Hub.open(registry="my-registry")
    answers = hub.generate(["What is 12 plus 30?", "Translate 'cat' to French."], k=3)
    for a in answers:
        print(a.text, a.routing.as_dict())

Every prompt is routed on its own; the adapters the batch needs are stacked once and the
whole mixed batch is answered in one batched `generate` (each row with its composition).
The path, for every caller: routings -> `Hub.composed` -> `Applied` -> `Composer.compose`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

from composition import Mode, get_layer
from lorahub import inference
from lorahub.applied import NOTHING, Applied, attached
from lorahub.inference import Sampling
from lorahub.models import DEFAULT_MODEL, BaseModel, load_base_model, loraplex_home
from registry import (
    AdapterCache,
    AdapterError,
    AdapterNotFoundError,
    AdapterRecord,
    BaseModelMismatchError,
    Embedder,
    Registry,
)
from router import (
    DEFAULT_ROUTER,
    Router,
    RouterOptions,
    Routing,
    SentenceEmbedder,
    arrow_gate,
    make_router,
)

_ROUTE_ATTEMPTS = 3  # routings re-made when they name adapters not usable now


class Compose(StrEnum):
    """What the user asks for. Each maps (COMPOSE) to how many adapters the router picks
    and the composer's `Mode` (how the picked adapters act)."""

    mixture = "mixture"  # top-k adapters, outputs mixed by the routing weights
    fusion = "fusion"  # top-k adapters, parameters averaged per prompt (LoraRetriever)
    selection = "selection"  # the top-1 adapter
    none = "none"  # the base model alone


# compose -> (adapters per prompt: None = the caller's k, composer mode)
COMPOSE: dict[Compose, tuple[int | None, Mode | None]] = {
    Compose.mixture: (None, Mode.mixture),
    Compose.fusion: (None, Mode.fusion),
    Compose.selection: (1, Mode.mixture),
    Compose.none: (0, None),
}


def compose_choice(compose: Compose | str) -> Compose:
    try:
        return Compose(compose)
    except ValueError:
        raise ValueError(f"unknown composition {compose!r}; choose from {list(Compose)}") from None


@dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    routing: Routing


def _bases(records: dict[str, AdapterRecord]) -> list[str]:
    return sorted({r.base_model.name for r in records.values()})


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


@dataclass(frozen=True)
class Catalogue:
    """The registry as this hub's model sees it at one registry generation: `usable`
    holds the adapters whose every module fits the loaded model, `unfit` the rest."""

    generation: int
    usable: dict[str, AdapterRecord]
    unfit: dict[str, AdapterRecord]

    @property
    def base_models(self) -> list[str]:
        """Base-model names with at least one usable adapter."""
        return sorted({r.base_model.name for r in self.usable.values()})


class Hub:
    """A base model, a registry of adapters for it, and a router (any `Router`). What it
    routes to and serves is read from the registry as it is now (`catalogue()`), so
    adapters registered, replaced or removed while it runs count at once."""

    def __init__(self, registry: Registry, base: BaseModel, router: Router) -> None:
        self.registry = registry
        self.base = base
        self.router = router
        self.adapters = AdapterCache(registry)
        self._fits: dict[str, bool] = {}  # sha256 -> fits the loaded model (content decides)
        self._catalogue: Catalogue | None = None
        view = self.catalogue()
        if view.unfit and not view.usable:
            raise BaseModelMismatchError(
                f"none of the registry's adapters fit {self.base.name!r}: they were made for "
                f"{_bases(view.unfit)} (module names or shapes differ)"
            )
        if view.unfit:
            warnings.warn(
                f"adapters for {_bases(view.unfit)} do not fit {self.base.name!r} "
                "and are never chosen",
                stacklevel=2,
            )

    def catalogue(self) -> Catalogue:
        """The current catalogue split into usable and unfit adapters: one indexed read
        while nothing changed, a re-read after any write by any process."""
        view, generation = self._catalogue, self.registry.generation()
        if view is not None and view.generation == generation:
            return view
        usable, unfit = {}, {}
        for rec in self.registry.list():  # may be newer than `generation`: re-read next call
            if rec.sha256 not in self._fits:
                shapes = self.registry.adapter_shapes(rec.name)
                self._fits[rec.sha256] = bool(shapes) and _fits(self.base.model, shapes)
            (usable if self._fits[rec.sha256] else unfit)[rec.name] = rec
        self._catalogue = view = Catalogue(generation, usable, unfit)
        return view

    @property
    def base_models(self) -> list[str]:
        """Base-model names with at least one adapter that fits the loaded model, now."""
        return self.catalogue().base_models

    def usable(self, name: str) -> AdapterRecord:
        """The record of adapter `name` as registered now (its sha256 says which weights),
        if it fits the loaded model; else AdapterNotFoundError or BaseModelMismatchError."""
        view = self.catalogue()
        if name in view.usable:
            return view.usable[name]
        if name in view.unfit:
            rec = view.unfit[name]
            raise BaseModelMismatchError(
                f"the adapter {name!r} was made for {rec.base_model.name!r}; its modules do "
                f"not fit {self.base.name!r}"
            )
        raise AdapterNotFoundError(f"no adapter named {name!r} in {self.registry.root}")

    @classmethod
    def open(
        cls,
        registry: str | Path | Registry | None = None,
        base_model: str | BaseModel = DEFAULT_MODEL,
        embedder: Embedder | None = None,
        router: str = DEFAULT_ROUTER,
        router_options: RouterOptions | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Hub:
        """`router`: a name from `router.ROUTERS` (task, retriever, classifier, arrow)."""
        if not isinstance(registry, Registry):
            registry = Registry(
                registry or loraplex_home() / "registry", embedder=embedder or SentenceEmbedder()
            )
        base = (
            base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, dtype)
        )
        return cls(registry, base, make_router(router, registry, router_options))

    # -- routing ------------------------------------------------------------------------------
    def route(
        self,
        prompts: Sequence[str],
        k: int = 3,
        compose: Compose | str = Compose.mixture,
        exclude: Sequence[str] = (),
        exclude_each: Sequence[Sequence[str]] | None = None,
    ) -> list[Routing]:
        """One Routing per prompt from the hub's router; `exclude` drops adapters for every
        prompt, `exclude_each[i]` for prompt i only."""
        n_adapters, _ = COMPOSE[compose_choice(compose)]
        if exclude_each is not None and len(exclude_each) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(exclude_each)} exclusion lists")
        view = self.catalogue()
        banned = {*exclude, *view.unfit}
        for _ in range(_ROUTE_ATTEMPTS):
            if n_adapters == 0:
                return [Routing()] * len(prompts)
            if not view.usable:
                return [Routing(note="no adapter to route to")] * len(prompts)
            each = [
                (*sorted(banned), *(exclude_each[i] if exclude_each else ()))
                for i in range(len(prompts))
            ]
            routings = self.router.route(prompts, n_adapters or k, exclude_each=each)
            if Compose(compose) == Compose.fusion and any(r.per_token for r in routings):
                raise ValueError("fusion averages parameters per prompt; a per-token router cannot")
            # The router reads the registry (or its own trained classes) itself: a name it
            # chose may have been removed, or registered unfit, since `view`. Those are
            # banned and the prompts routed again.
            view = self.catalogue()
            stray = {n for r in routings for n in r.adapters if n not in view.usable}
            if not stray:
                return routings
            banned |= {*stray, *view.unfit}
        raise AdapterError("the registry kept changing while routing; try again")

    @contextmanager
    def composed(
        self, routings: Sequence[Routing], modes: Sequence[Mode] | Mode = Mode.mixture
    ) -> Iterator[Applied]:
        """The routed adapters attached to the model (stacked once for the whole batch)
        and what each row gets; detached again afterwards. Per-token routings (Arrow) must
        all be alike: `groups()` splits a mixed batch."""
        names = list(dict.fromkeys(n for r in routings for n in r.adapters))
        if not names:
            yield NOTHING
            return
        adapters = [self.adapters.get(n) for n in names]
        per_token = {(r.per_token, r.adapters) for r in routings if r.per_token}
        if per_token:
            if len(per_token) > 1 or any(not r.per_token for r in routings):
                raise ValueError("per-token routings in one composition must all be alike")
            gate = arrow_gate(adapters, routings[0].per_token, self.registry)
            with attached(self.base.model, adapters, names, token_gate=gate) as applied:
                yield applied
            return
        gates = torch.zeros(len(routings), len(names))
        for row, r in enumerate(routings):
            for name, weight in r.as_dict().items():
                gates[row, names.index(name)] = weight
        with attached(self.base.model, adapters, names, gates, modes) as applied:
            yield applied

    # -- answering ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        k: int = 3,
        compose: Compose | str = Compose.mixture,
        exclude: Sequence[str] = (),
        exclude_each: Sequence[Sequence[str]] | None = None,
        routings: Sequence[Routing] | None = None,
        applied: Applied | None = None,
        batch_size: int | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Answer]:
        """Route every prompt (or use `routings`, or a composition already `applied`, such
        as a LoraHub adapter), then answer the mixed batch in batched generates
        (`batch_size` rows at a time; default all). Greedy unless temperature > 0."""
        if not prompts:
            raise ValueError("no prompts to answer")
        sampling = Sampling(max_new_tokens, temperature, top_p, tuple(stop), seed)
        routings = self._routings(prompts, routings, k, compose, exclude, exclude_each, applied)
        texts = self._per_group(
            routings,
            compose,
            applied,
            lambda rows, applied: inference.generate(
                self.base,
                [self.format(prompts[i], routings[i]) for i in rows],
                applied,
                sampling,
                batch_size=batch_size or len(rows),
                formatted=True,
            ),
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
        applied: Applied | None = None,
        batch_size: int = 16,
    ) -> list[list[float]]:
        """Log-likelihood of each option after its prompt (multiple choice)."""
        if len(prompts) != len(options):
            raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
        if any(not opts for opts in options):
            raise ValueError("every prompt needs at least one option to score")
        routings = self._routings(prompts, routings, k, compose, exclude, exclude_each, applied)
        return self._per_group(
            routings,
            compose,
            applied,
            lambda rows, applied: inference.option_logprobs(
                self.base,
                [self.format(prompts[i], routings[i]) for i in rows],
                [options[i] for i in rows],
                applied,
                batch_size,
                formatted=True,
            ),
        )

    def format(self, prompt: str | Sequence[dict[str, str]], routing: Routing) -> str:
        """A prompt (one user turn) or chat messages, as the routed adapters were trained
        to read them: raw text when every one records the `plain` format, else the base
        model's chat template (also for the base model alone and unrecorded adapters)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        formats = {self.registry.get(n).meta.prompt_format for n in routing.adapters}
        return self.base.format_chat(list(messages), "plain" if formats == {"plain"} else "chat")

    def _per_group(self, routings, compose, applied, run) -> list:
        """`run(rows, applied)` for each group of rows that can share one composition."""
        if applied is not None:
            return run(list(range(len(routings))), applied)
        _, mode = COMPOSE[compose_choice(compose)]
        out: list = [None] * len(routings)
        for rows in groups(routings):
            with self.composed([routings[i] for i in rows], mode or Mode.mixture) as applied:
                for i, value in zip(rows, run(rows, applied), strict=True):
                    out[i] = value
        return out

    def _routings(
        self,
        prompts: Sequence[str],
        routings: Sequence[Routing] | None,
        k: int,
        compose: Compose | str,
        exclude: Sequence[str],
        exclude_each: Sequence[Sequence[str]] | None,
        applied: Applied | None,
    ) -> list[Routing]:
        """The given routings, or the router's (none when a composition is `applied`)."""
        compose = compose_choice(compose)
        if applied is not None:
            if routings is not None:
                raise ValueError("give routings or an applied composition, not both")
            return [Routing()] * len(prompts)
        if routings is None:
            return self.route(prompts, k, compose, exclude, exclude_each)
        if len(routings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(routings)} routings")
        if compose == Compose.none and any(r.adapters for r in routings):
            raise ValueError("compose='none' means no adapter, but routings name adapters")
        return list(routings)

    def close(self) -> None:
        self.registry.close()


def groups(routings: Sequence[Routing]) -> list[list[int]]:
    """Row indices that can share one composition: all per-sample routings together (each
    row its own gates), and per-token routings by their (config, adapters)."""
    keyed: dict[object, list[int]] = {}
    for i, r in enumerate(routings):
        keyed.setdefault((r.per_token, r.adapters) if r.per_token else None, []).append(i)
    return list(keyed.values())
