"""Concurrent requests routed together: while one call to the router runs, the prompts of
the requests that arrive meanwhile gather, and the next call routes all of them at once.

Embedding a batch of prompts costs little more than embedding one (one prompt at a time
took 5x the per-prompt time of a batch of 32 on 2 cores), and routing runs on one thread,
so under load requests queued one routing each behind each other. No timer: a request
that finds the router idle is routed at once, so a lone request waits for nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from router import Routing

RouteFn = Callable[[list[str], int, str], list[Routing]]  # (prompts, k, compose) -> routings
OffLoop = Callable[..., Awaitable[list[Routing]]]  # runs RouteFn off the event loop


@dataclass
class _Waiting:
    prompts: list[str]
    k: int
    compose: str
    done: asyncio.Future[list[Routing]]


class RouteBatcher:
    """`await route(prompts, k, compose)`: the same routings as `route_fn(prompts, k,
    compose)`, routed in one call with whatever other requests wait (one call per (k,
    compose)). If a joined call fails, each request in it is routed alone, so a failure
    reaches only the request that causes it."""

    def __init__(self, route_fn: RouteFn, off_loop: OffLoop) -> None:
        self._route_fn, self._off_loop = route_fn, off_loop
        self._waiting: list[_Waiting] = []
        self._draining: asyncio.Task | None = None

    async def route(self, prompts: Sequence[str], k: int, compose: str) -> list[Routing]:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(list(prompts), k, str(compose), done))
        if self._draining is None:  # held: a task nothing references may be collected
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                for key in dict.fromkeys((w.k, w.compose) for w in batch):
                    await self._route_together([w for w in batch if (w.k, w.compose) == key])
        finally:  # cancelled (the server stops): no waiter is left waiting
            for w in [*batch, *self._waiting]:
                if not w.done.done():
                    w.done.cancel()
            self._draining = None

    async def _route_together(self, group: list[_Waiting]) -> None:
        group = [w for w in group if not w.done.done()]  # cancelled: the client left
        if not group:
            return
        prompts = [p for w in group for p in w.prompts]
        try:
            routings = await self._off_loop(self._route_fn, prompts, group[0].k, group[0].compose)
        except Exception as e:
            if len(group) > 1:  # alone, so that the failure reaches only its cause
                for w in group:
                    await self._route_together([w])
            elif not group[0].done.done():
                group[0].done.set_exception(e)
            return
        start = 0
        for w in group:
            if not w.done.done():
                w.done.set_result(routings[start : start + len(w.prompts)])
            start += len(w.prompts)
