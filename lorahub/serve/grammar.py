"""The `model` field, which says what composition a request gets:

    <adapter name>              that adapter alone
    <base model name> | base    no adapter
    auto                        the server's router and default composition
    auto:selection | auto:mixture | auto:fusion
plus `extra_body={"loraplex": {"k": 2}}` (auto only) or an explicit weighted mixture
`{"loraplex": {"adapters": {"a": 0.7, "b": 0.3}}}` (with auto or auto:<composition>).
Names are looked up in the registry, never used as paths."""

from __future__ import annotations

from dataclasses import dataclass

from lorahub.hub import Compose, Hub
from lorahub.serve.protocol import APIError, LoraplexOptions
from router import Routing

AUTO = "auto"
AUTO_COMPOSE = (Compose.selection, Compose.mixture, Compose.fusion)


@dataclass(frozen=True)
class Target:
    """What to apply: a fixed `routing`, or (routing None) the router's top `k` for the
    prompt; `compose` says how (the composer mode and, for selection, k = 1)."""

    compose: Compose
    k: int
    routing: Routing | None


def model_ids(hub: Hub) -> list[str]:
    """Every `model` value this hub answers, base and auto entries first."""
    return [hub.base.name, AUTO, *(f"{AUTO}:{c}" for c in AUTO_COMPOSE), *servable(hub)]


def servable(hub: Hub) -> list[str]:
    """Adapters registered now whose modules fit the loaded base model."""
    return sorted(hub.catalogue().usable)


def resolve(model: str, options: LoraplexOptions, hub: Hub, default: Compose, k: int) -> Target:
    """The request's target, or an APIError (404 for names that do not exist here)."""
    if model == AUTO or model.startswith(f"{AUTO}:"):
        compose = default if model == AUTO else _auto_compose(model)
        if options.adapters is None:
            return Target(compose, 1 if compose == Compose.selection else options.k or k, None)
        if options.k is not None:
            raise APIError(400, "give loraplex.k or loraplex.adapters, not both", "loraplex.k")
        return Target(compose, len(options.adapters), _explicit(options.adapters, hub))
    if options.adapters is not None or options.k is not None:
        raise APIError(
            400, "loraplex.k and loraplex.adapters go with model 'auto'", "loraplex", None
        )
    if model in (hub.base.name, "base"):
        return Target(Compose.none, 0, Routing())
    if model in servable(hub):
        return Target(Compose.selection, 1, Routing((model,), (1.0,)))
    raise APIError(
        404,
        f"the model {model!r} does not exist here; GET /v1/models lists the base model, "
        "'auto', 'auto:<selection|mixture|fusion>' and the adapters",
        "model",
        "model_not_found",
    )


def _auto_compose(model: str) -> Compose:
    name = model.removeprefix(f"{AUTO}:")
    if name not in AUTO_COMPOSE:
        raise APIError(
            404,
            f"unknown composition {name!r} in {model!r}; use auto:selection, auto:mixture "
            "or auto:fusion",
            "model",
            "model_not_found",
        )
    return Compose(name)


def _explicit(weights: dict[str, float], hub: Hub) -> Routing:
    known = set(servable(hub))
    missing = sorted(set(weights) - known)
    if missing:
        raise APIError(
            404, f"no adapters named {missing} here", "loraplex.adapters", "model_not_found"
        )
    return Routing(tuple(weights), tuple(float(w) for w in weights.values()))
