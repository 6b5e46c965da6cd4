"""`loraplex serve`: the engines by name, and running the app under uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lorahub.hub import Hub
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.serve.engine import Engine


@dataclass(frozen=True)
class EngineOptions:
    batching: BatchingConfig = field(default_factory=BatchingConfig)


ENGINES: dict[str, Callable[[Hub, EngineOptions], Engine]] = {
    "transformers": lambda hub, o: BatchingEngine(hub, o.batching),
}


def make_engine(name: str, hub: Hub, options: EngineOptions | None = None) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose from {sorted(ENGINES)}")
    return ENGINES[name](hub, options or EngineOptions())


def serve(
    hub: Hub,
    engine: Engine,
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve until SIGINT / SIGTERM: then stop accepting, finish what is in flight, exit."""
    import uvicorn

    uvicorn.run(create_app(hub, engine, config), host=host, port=port, log_level=log_level)
