"""The vLLM gateway's own bookkeeping, without vLLM: composed-adapter folders pinned while in
use and built once however many ask at once; a replica that answers 4xx ends the request
once with its message; a replica that is down at start is described once it answers.
(Against real vLLM replicas: tests/test_vllm.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import char_tokenizer, free_port, serving, tiny_llama
from replica_faults import refusing_replica, serving_at

from composition import Mode
from lorahub.decoding import Sampling
from lorahub.hub import Hub
from lorahub.models import load_base_model
from lorahub.serve import materialize
from lorahub.serve.app import create_app
from lorahub.serve.engine import Event, GenerationRequest, RequestError
from lorahub.serve.gateway import GatewayConfig, VllmGateway
from lorahub.serve.materialize import AdapterFolders
from registry import LoraAdapter, LoraModule, Registry
from router import Retriever, Routing

DEADLINE = 120.0  # seconds; answers here take milliseconds, a loaded machine gets slack


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("gateway")
    torch.manual_seed(0)
    model = tiny_llama(bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    reg = Registry(root / "registry", embedder=embedder)
    g = torch.Generator().manual_seed(1)
    for name in ("alpha", "beta", "gamma"):
        mods = {
            n: LoraModule(
                torch.randn(4, m.in_features, generator=g),
                torch.randn(m.out_features, 4, generator=g),
                8.0,
            )
            for n, m in model.named_modules()
            if n.endswith("q_proj")
        }
        reg.register(LoraAdapter(mods), name=name, examples=[f"{name} example"])
    yield Hub(reg, load_base_model(str(root / "model"), weights=False), Retriever(reg))
    reg.close()


def members(hub: Hub) -> list[LoraAdapter]:
    return [hub.adapters.get(n) for n in ("alpha", "beta", "gamma")]


def test_a_folder_in_use_is_never_evicted(hub: Hub, tmp_path: Path) -> None:
    folders = AdapterFolders(tmp_path, max_entries=1)
    used, _ = folders.get(members(hub), [0.5, 0.5, 0.0], Mode.mixture, 64, pin=True)
    _, evicted = folders.get(members(hub), [0.2, 0.8, 0.0], Mode.mixture, 64)
    assert evicted == [] and used.path.exists()  # over the bound while a request uses it
    folders.release(used.name)
    _, evicted = folders.get(members(hub), [0.3, 0.7, 0.0], Mode.mixture, 64)
    assert used.name in evicted and not used.path.exists()


def test_concurrent_identical_compositions_are_built_once(hub: Hub, tmp_path: Path) -> None:
    folders = AdapterFolders(tmp_path)
    start = threading.Barrier(8)

    def get(_: int) -> str:
        start.wait()
        return folders.get(members(hub), [0.4, 0.3, 0.3], Mode.mixture, 64)[0].name

    with ThreadPoolExecutor(8) as pool:
        names = set(pool.map(get, range(8)))
    assert len(names) == 1 and folders.builds == 1


class Collector:
    """An engine's `emit`: every event, and a flag set at the first terminal one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.kind != "token":
            self.ended.set()

    def terminal(self) -> list[Event]:
        assert self.ended.wait(DEADLINE), "the request never ended"
        return [e for e in self.events if e.kind != "token"]


def base_request(tokens: int = 8) -> GenerationRequest:
    return GenerationRequest((5, 6, 7), Routing(), Mode.mixture, Sampling(tokens))


@pytest.fixture
def refusing(hub: Hub) -> Iterator[str]:
    app = refusing_replica(hub.base.name, 400, "max_tokens is too large for this replica")
    with serving(app) as url:
        yield url


@pytest.mark.parametrize("routing", [Routing(), Routing(("alpha",), (1.0,))])
def test_a_replica_answering_4xx_ends_the_request_once_with_its_message(
    hub: Hub, refusing: str, routing: Routing, tmp_path: Path
) -> None:
    """Base: the completion is refused; an adapter: loading it is refused."""
    gateway = VllmGateway(hub, GatewayConfig((refusing,), tmp_path))
    gateway.start()
    try:
        seen = Collector()
        request = GenerationRequest((5, 6, 7), routing, Mode.mixture, Sampling(8))
        gateway.submit(request, seen)
        (end,) = seen.terminal()
        assert end.kind == "error" and "refused" in end.error
        if routing.adapters:  # a composition the replica cannot load is our fault
            assert end.status == 502
        else:  # the replica judged the request's parameters: the client's to fix
            assert end.status == 400 and "max_tokens is too large" in end.error
        assert gateway.stats()["running"] == 0
    finally:
        gateway.stop()
    assert [e.kind for e in seen.events if e.kind != "token"] == ["error"]


def test_a_stream_client_sees_the_replicas_refusal_not_a_hang(
    hub: Hub, refusing: str, tmp_path
) -> None:
    gateway = VllmGateway(hub, GatewayConfig((refusing,), tmp_path))
    with serving(create_app(hub, gateway)) as url:
        body = {"model": hub.base.name, "prompt": "hi", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=DEADLINE) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "max_tokens is too large" in lines[-2] and lines[-1] == "data: [DONE]"


def test_a_replica_down_at_start_is_described_once_it_answers(hub: Hub, tmp_path: Path) -> None:
    port = free_port()
    config = GatewayConfig((f"http://127.0.0.1:{port}",), tmp_path, retry_after=0.05)
    gateway = VllmGateway(hub, config)
    gateway.start()
    try:
        assert gateway.stats()["upstreams"][0]["up"] is False
        seen = Collector()
        gateway.submit(base_request(), seen)  # nothing is up: refused at once, never hangs
        assert [e.status for e in seen.terminal()] == [503]
        with serving_at(refusing_replica(hub.base.name, 400, "later", max_model_len=64), port):
            deadline = time.monotonic() + DEADLINE
            while not gateway.stats()["upstreams"][0]["up"]:
                assert time.monotonic() < deadline, "the replica was never probed again"
                time.sleep(0.02)
            up = gateway.upstreams[0]
            assert up.model == hub.base.name and up.max_model_len == 64
            seen = Collector()
            gateway.submit(base_request(), seen)
            (end,) = seen.terminal()
            assert "later" in end.error and hub.base.name in up.used and "" not in up.used
    finally:
        gateway.stop()


def test_composing_never_runs_on_the_servers_event_loop(
    hub: Hub, refusing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge, svd and disk write of a new composition must not stall every other
    client: they run in a thread, whoever calls `submit`."""
    on_loop = []

    def compose_one(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    real = materialize.compose_one
    monkeypatch.setattr(materialize, "compose_one", compose_one)
    gateway = VllmGateway(hub, GatewayConfig((refusing,), tmp_path))
    with serving(create_app(hub, gateway)) as url:
        body = {"model": "auto:mixture", "prompt": "hi", "max_tokens": 4}
        body["loraplex"] = {"adapters": {"alpha": 0.5, "gamma": 0.5}}
        httpx.post(f"{url}/v1/completions", json=body, timeout=DEADLINE)
    assert on_loop and not any(on_loop)  # the base model's zero adapter, and the mixture


def test_echo_with_logprobs_is_refused_by_name(hub: Hub, refusing: str, tmp_path: Path) -> None:
    """vLLM replicas would need a second, unstreamed pass for the prompt's logprobs: the
    gateway says so rather than answering without them."""
    gateway = VllmGateway(hub, GatewayConfig((refusing,), tmp_path))
    gateway.start()
    try:
        request = dataclasses.replace(base_request(), prompt_logprobs=1)
        with pytest.raises(RequestError, match="built-in engine only"):
            gateway.submit(request, Collector())
        assert gateway.stats()["running"] == 0
    finally:
        gateway.stop()
