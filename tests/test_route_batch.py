"""The server's router batching (lorahub/serve/route_batch.py): requests that arrive while
the router runs are routed in its next call, together, and each gets what it would alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_router import QUERIES, TASKS, tiny_adapter

from lorahub.serve.route_batch import RouteBatcher
from registry import Registry
from router import Retriever, Routing

DEADLINE = 120.0  # seconds: generous, the machine may be loaded


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory, embedder) -> Retriever:
    reg = Registry(tmp_path_factory.mktemp("route-batch"), embedder=embedder)
    for i, (task, examples) in enumerate(TASKS.items()):
        reg.register(tiny_adapter(i), name=task, examples=examples[:3])
    yield Retriever(reg)
    reg.close()


class GatedRouter:
    """The real router behind a gate: its first call waits until the test opens it, so
    the requests sent meanwhile are queued. Records each call's prompts; a prompt
    "boom" makes a call fail."""

    def __init__(self, route: Callable[..., list[Routing]]) -> None:
        self.route, self.calls = route, []
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, prompts: list[str], k: int, compose: str) -> list[Routing]:
        self.calls.append(list(prompts))
        self.entered.set()
        assert self.gate.wait(DEADLINE)
        if "boom" in prompts:
            raise ValueError("boom")
        return self.route(prompts, k=k)


async def _queued_behind_a_running_call(
    router: GatedRouter, batcher: RouteBatcher, requests: list[list[str]], cancel: int | None
) -> list[list[Routing] | BaseException]:
    """The first request starts a call that waits at the gate; the others queue behind it
    (request `cancel` is cancelled while it waits); then the gate opens."""
    first = asyncio.create_task(batcher.route(requests[0], 2, "mixture"))
    assert await asyncio.to_thread(router.entered.wait, DEADLINE)
    rest = [asyncio.create_task(batcher.route(r, 2, "mixture")) for r in requests[1:]]
    await asyncio.sleep(0)  # each task runs up to its wait: all are queued
    if cancel is not None:
        rest[cancel - 1].cancel()
    router.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def _run(router: GatedRouter, requests: list[list[str]], cancel: int | None = None) -> list:
    pool = ThreadPoolExecutor(1)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main() -> list:
        batcher = RouteBatcher(router, off_loop)
        return await _queued_behind_a_running_call(router, batcher, requests, cancel)

    try:
        return asyncio.run(asyncio.wait_for(main(), DEADLINE))
    finally:
        pool.shutdown()


def _same(got: list[Routing], want: list[Routing]) -> None:
    assert [r.adapters for r in got] == [r.adapters for r in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.weights, w.weights, atol=1e-5)


def test_requests_queued_behind_a_call_are_routed_in_one_call_as_each_alone(retriever) -> None:
    queries = list(QUERIES.values())
    requests = [[queries[0]], [queries[1], queries[2]], [queries[3]], [queries[1]]]
    router = GatedRouter(retriever.route)
    got = _run(router, requests)
    assert router.calls == [requests[0], [p for r in requests[1:] for p in r]]
    for request, routings in zip(requests, got, strict=True):
        _same(routings, retriever.route(request, k=2))


def test_a_failing_request_fails_alone_and_a_cancelled_one_is_not_routed(retriever) -> None:
    queries = list(QUERIES.values())
    requests = [[queries[0]], [queries[1]], ["boom"], [queries[2]], [queries[3]]]
    router = GatedRouter(retriever.route)
    got = _run(router, requests, cancel=4)
    assert isinstance(got[2], ValueError) and isinstance(got[4], asyncio.CancelledError)
    for i in (0, 1, 3):
        _same(got[i], retriever.route(requests[i], k=2))
    # joined (without the cancelled request), failed, then each alone
    together = [queries[1], "boom", queries[2]]
    assert router.calls == [requests[0], together, [queries[1]], ["boom"], [queries[2]]]
