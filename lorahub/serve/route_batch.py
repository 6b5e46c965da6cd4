"""Concurrent requests routed together: while one call to the router runs, the prompts of
the requests that arrive meanwhile gather, and the next call routes all of them at once.

Embedding a batch of prompts costs little more than embedding one (the task router over
the zoo took 5-8x the time per prompt one at a time as in a batch of 32, on a loaded 2-core
machine), and routing runs on one thread, so under load requests queued one routing each
behind each other. No timer: a request that finds the router idle is routed at once, so a
lone request waits for nothing. A call takes at most `max_prompts` prompts (whole
requests, at least one), so a burst never builds a batch no single request could."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from router import Routing

RouteFn = Callable[[list[str], int, str], list[Routing]]  # (prompts, k, compose) -> routings
OffLoop = Callable[..., Awaitable[list[Routing]]]  # runs RouteFn off the event loop
MAX_PROMPTS = 256  # per call: twice a completion request's most (validate.Limits)

log = logging.getLogger("loraplex.serve")


@dataclass
class _Waiting:
    prompts: list[str]
    k: int
    compose: str
    done: asyncio.Future[list[Routing]]


class RouteBatcher:
    """`await route(prompts, k, compose)`: the same routings as `route_fn(prompts, k,
    compose)`, routed in one call with whatever other requests wait (one call per (k,
    compose)). If a joined call fails, its requests are routed again in halves, down to
    one, so a failure reaches only the request that causes it."""

    def __init__(self, route_fn: RouteFn, off_loop: OffLoop, max_prompts: int = MAX_PROMPTS):
        self._route_fn, self._off_loop, self.max_prompts = route_fn, off_loop, max_prompts
        self._waiting: list[_Waiting] = []
        self._draining: asyncio.Task | None = None

    async def route(self, prompts: Sequence[str], k: int, compose: str) -> list[Routing]:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(list(prompts), k, str(compose), done))
        # held: a task nothing references may be collected; done: cancelled before it ran
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch, self._waiting = self._next_batch()
                for key in dict.fromkeys((w.k, w.compose) for w in batch):
                    await self._route_together([w for w in batch if (w.k, w.compose) == key])
        finally:  # cancelled (the server stops): no waiter is left waiting
            for w in [*batch, *self._waiting]:
                if not w.done.done():
                    w.done.cancel()
            self._draining = None

    def _next_batch(self) -> tuple[list[_Waiting], list[_Waiting]]:
        """The first waiting requests up to max_prompts (at least one), and the rest."""
        taken, prompts = 1, len(self._waiting[0].prompts)
        while taken < len(self._waiting):
            prompts += len(self._waiting[taken].prompts)
            if prompts > self.max_prompts:
                break
            taken += 1
        return self._waiting[:taken], self._waiting[taken:]

    async def _route_together(self, group: list[_Waiting]) -> None:
        group = [w for w in group if not w.done.done()]  # cancelled: the client left
        if not group:
            return
        prompts = [p for w in group for p in w.prompts]
        try:
            routings = await self._off_loop(self._route_fn, prompts, group[0].k, group[0].compose)
        except Exception as e:
            if len(group) == 1:
                if not group[0].done.done():
                    group[0].done.set_exception(e)
                return
            log.warning(
                "routing %d requests together failed (%r): routing them in halves", len(group), e
            )
            half = len(group) // 2
            await self._route_together(group[:half])
            await self._route_together(group[half:])
            return
        start = 0
        for w in group:
            if not w.done.done():
                w.done.set_result(routings[start : start + len(w.prompts)])
            start += len(w.prompts)
