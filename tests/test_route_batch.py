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
    router: GatedRouter,
    batcher: RouteBatcher,
    requests: list[tuple[list[str], int]],
    cancel: int | None,
) -> list[list[Routing] | BaseException]:
    """The first request (prompts, k) starts a call that waits at the gate; the others
    queue behind it (request `cancel` is cancelled while it waits); then the gate opens."""
    first = asyncio.create_task(batcher.route(*requests[0], "mixture"))
    assert await asyncio.to_thread(router.entered.wait, DEADLINE)
    rest = [asyncio.create_task(batcher.route(*r, "mixture")) for r in requests[1:]]
    await asyncio.sleep(0)  # each task runs up to its wait: all are queued
    if cancel is not None:
        rest[cancel - 1].cancel()
    router.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def _run(router: GatedRouter, scenario: Callable, *args, **batcher_kw) -> list:
    """scenario(router, batcher, *args) on an event loop, the router on one thread."""
    pool = ThreadPoolExecutor(1)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main() -> list:
        return await scenario(router, RouteBatcher(router, off_loop, **batcher_kw), *args)

    try:
        return asyncio.run(asyncio.wait_for(main(), DEADLINE))
    finally:
        router.gate.set()
        pool.shutdown()


def _same(got: list[Routing], want: list[Routing]) -> None:
    assert [r.adapters for r in got] == [r.adapters for r in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.weights, w.weights, atol=1e-5)


def test_requests_queued_behind_a_call_are_routed_in_one_call_as_each_alone(retriever) -> None:
    q = list(QUERIES.values())
    requests = [([q[0]], 2), ([q[1], q[2]], 2), ([q[3]], 2), ([q[1]], 2)]
    router = GatedRouter(retriever.route)
    got = _run(router, _queued_behind_a_running_call, requests, None)
    assert router.calls == [[q[0]], [q[1], q[2], q[3], q[1]]]
    for (prompts, k), routings in zip(requests, got, strict=True):
        _same(routings, retriever.route(prompts, k=k))


def test_each_k_gets_its_own_call_and_a_call_takes_at_most_max_prompts(retriever) -> None:
    q = list(QUERIES.values())
    requests = [([q[0]], 2), ([q[1]], 1), ([q[2], q[3]], 2), ([q[0], q[1]], 1), ([q[2]], 2)]
    router = GatedRouter(retriever.route)
    got = _run(router, _queued_behind_a_running_call, requests, None, max_prompts=4)
    # waiting: 1 + 2 prompts fit in 4, a third request would not: those two, one call per k;
    # then the other two, one call per k
    assert router.calls == [[q[0]], [q[1]], [q[2], q[3]], [q[0], q[1]], [q[2]]]
    for (prompts, k), routings in zip(requests, got, strict=True):
        assert all(len(r.adapters) == k for r in routings)
        _same(routings, retriever.route(prompts, k=k))


def test_a_failing_request_fails_alone_and_a_cancelled_one_is_not_routed(retriever) -> None:
    q = list(QUERIES.values())
    requests = [([q[0]], 2), ([q[1]], 2), (["boom"], 2), ([q[2]], 2), ([q[3]], 2)]
    router = GatedRouter(retriever.route)
    got = _run(router, _queued_behind_a_running_call, requests, 4)
    assert isinstance(got[2], ValueError) and isinstance(got[4], asyncio.CancelledError)
    for i in (0, 1, 3):
        _same(got[i], retriever.route(requests[i][0], k=2))
    # joined (without the cancelled request), failed, then in halves
    assert router.calls == [[q[0]], [q[1], "boom", q[2]], [q[1]], ["boom", q[2]], ["boom"], [q[2]]]


async def _stopped_while_routing(router: GatedRouter, batcher: RouteBatcher) -> list:
    """The batcher's task is cancelled (as when the server's loop stops) while a call runs
    and a request waits: both end; a request after it is still routed."""
    running = asyncio.create_task(batcher.route([QUERIES["arithmetic"]], 1, "mixture"))
    assert await asyncio.to_thread(router.entered.wait, DEADLINE)
    waiting = asyncio.create_task(batcher.route([QUERIES["sentiment"]], 1, "mixture"))
    await asyncio.sleep(0)
    batcher._draining.cancel()  # the one task that routes; nothing public stops it
    ended = await asyncio.gather(running, waiting, return_exceptions=True)
    router.gate.set()
    return [*ended, await batcher.route([QUERIES["sentiment"]], 1, "mixture")]


def test_requests_end_when_the_batcher_is_stopped_and_later_ones_are_routed(retriever) -> None:
    running, waiting, later = _run(GatedRouter(retriever.route), _stopped_while_routing)
    assert isinstance(running, asyncio.CancelledError)
    assert isinstance(waiting, asyncio.CancelledError)
    assert later[0].adapters == ("sentiment",)
