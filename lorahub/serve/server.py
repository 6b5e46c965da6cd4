"""`loraplex serve`: the engines by name, and running the app under uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.hub import Hub
from lorahub.models import loraplex_home
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.serve.engine import Engine
from lorahub.serve.gateway import GatewayConfig, VllmGateway


@dataclass(frozen=True)
class EngineOptions:
    """batching: the built-in engine's limits. upstreams, max_lora_rank, folders: the vLLM
    gateway's replicas, their --max-lora-rank, and where composed adapters are written
    (a folder the replicas can read)."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    upstreams: tuple[str, ...] = ()
    max_lora_rank: int = 16
    folders: Path = field(default_factory=lambda: loraplex_home() / "gateway")


def _vllm(hub: Hub, o: EngineOptions) -> Engine:
    config = GatewayConfig(o.upstreams, o.folders, o.max_lora_rank, max_queue=o.batching.max_queue)
    return VllmGateway(hub, config)


ENGINES: dict[str, Callable[[Hub, EngineOptions], Engine]] = {
    "transformers": lambda hub, o: BatchingEngine(hub, o.batching),
    "vllm": _vllm,
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
