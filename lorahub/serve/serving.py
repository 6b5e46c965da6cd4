"""The serving layer between the routes and the engine: prepare (validate, resolve `model`,
route, format, tokenize, check the prompt) -> submit -> collect (one JSON body) or stream
(SSE). A client's mistake is an `APIError` 4xx here, before anything reaches the engine;
a client that leaves, streaming or not, cancels its row."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.types import Receive

from composition import Mode
from lorahub.hub import Compose, Hub
from lorahub.inference import Sampling
from lorahub.serve import protocol as p
from lorahub.serve import sse
from lorahub.serve.engine import (
    Engine,
    Event,
    GenerationRequest,
    Handle,
    QueueFullError,
    RequestError,
)
from lorahub.serve.grammar import Target, resolve
from lorahub.serve.metrics import Metrics
from lorahub.serve.validate import Limits, check, check_prompt
from router import DEFAULT_ROUTER, Routing

log = logging.getLogger("loraplex.serve")

Request = p.ChatRequest | p.CompletionRequest
T = TypeVar("T")


@dataclass(frozen=True)
class ServeConfig:
    """compose / k: what `auto` means; max_tokens: the default when a request names none;
    api_key: required as `Authorization: Bearer KEY` when set; limits: what one request
    may ask for (validate.Limits)."""

    compose: Compose = Compose.mixture
    k: int = 3
    max_tokens: int = 256
    api_key: str | None = None
    router: str = DEFAULT_ROUTER
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.compose == Compose.none or self.k <= 0 or self.max_tokens <= 0:
            raise ValueError(f"auto needs a composition and positive k, max_tokens: {self}")


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine, and what its answer reports."""

    request: GenerationRequest
    model: str
    report: dict
    chat: bool
    stream: bool
    include_usage: bool


class Timing:
    """Time to first token, inter-token gaps and request latency, into the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def seen(self, ev: Event) -> None:
        if ev.kind == "token":
            now = time.perf_counter()
            (self.metrics.ttft if self.first else self.metrics.itl).observe(now - self.last)
            self.first, self.last = False, now
        elif ev.kind == "done":
            self.metrics.latency.observe(time.perf_counter() - self.start)
            self.metrics.tokens.labels("prompt").inc(ev.usage.get("prompt_tokens", 0))
            self.metrics.tokens.labels("completion").inc(ev.usage.get("completion_tokens", 0))


# absolute paths (two components or more) in an error text meant for a client
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.~-]+){2,}[/\\]?")


def public_message(message: str) -> str:
    """An error text with the server's paths left out."""
    return _PATH.sub("<path>", message)


def event_error(ev: Event) -> p.APIError:
    """The answer to an engine's error event: the client's fault keeps its 4xx; our own
    faults are 5xx without server paths (the full text is in the server log)."""
    status = getattr(ev, "status", 500)
    code = getattr(ev, "code", "generation_failed")
    if status < 500:
        return p.APIError(status, ev.error, None, code)
    log.error("request failed in the engine: %s", ev.error)
    return p.APIError(status, public_message(ev.error), None, code)


class Serving:
    """One server's serving layer: the hub, the engine, the config and the metrics."""

    def __init__(self, hub: Hub, engine: Engine, config: ServeConfig, metrics: Metrics) -> None:
        self.hub, self.engine, self.config, self.metrics = hub, engine, config, metrics
        self.context = getattr(hub.base.model.config, "max_position_embeddings", None) or 1 << 30
        # The router and the registry's reads run here, off the event loop, one at a time.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-route")
        self.ready = False

    async def off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def warm(self) -> None:
        """Load or fit the router and the embedder before readiness, so the first `auto`
        request does not wait for them."""
        self.hub.route(["warm up"], self.config.k, self.config.compose)
        self.ready = True

    # -- prepare ------------------------------------------------------------------------------
    async def prepare(self, req: Request) -> Prepared:
        check(req, self.config.limits)
        chat = isinstance(req, p.ChatRequest)
        messages = (
            [{"role": m.role, "content": m.text()} for m in req.messages]
            if chat
            else [{"role": "user", "content": req.text()}]
        )
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        sampling = self._sampling(req)
        c = self.config
        target = await self.off_loop(resolve, req.model, req.loraplex, self.hub, c.compose, c.k)
        routing, ids = await self.off_loop(_route_and_encode, self.hub, target, query, messages)
        check_prompt(
            len(ids), sampling.max_new_tokens, self.context, "messages" if chat else "prompt"
        )
        mode = Mode.fusion if target.compose == Compose.fusion else Mode.mixture
        report = {**routing.to_json(), "compose": str(target.compose), "mode": str(mode)}
        if target.routing is None:
            report["router"] = c.router
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        request = GenerationRequest(
            tuple(ids), routing, mode, sampling, logprobs, req.loraplex.exact
        )
        self._count_routing(target, routing)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(request, req.model, report, chat, req.stream, usage)

    def _sampling(self, req: Request) -> Sampling:
        max_tokens = req.max_tokens
        if isinstance(req, p.ChatRequest):
            max_tokens = req.max_completion_tokens or max_tokens
        return Sampling(
            max_tokens or self.config.max_tokens,
            1.0 if req.temperature is None else req.temperature,  # OpenAI's default
            1.0 if req.top_p is None else req.top_p,
            tuple(req.stops()),
            req.seed,
            req.min_tokens,
        )

    def _count_routing(self, target: Target, routing: Routing) -> None:
        for name in routing.adapters:
            self.metrics.routed.labels(name).inc()
        if target.routing is None and not routing.adapters:
            self.metrics.base_only.inc()

    # -- submit -------------------------------------------------------------------------------
    async def submit(self, prepared: Prepared) -> tuple[Handle, asyncio.Queue[Event | None]]:
        """The request queued in the engine, and the queue its events arrive on. Off the
        event loop: an engine may block in submit (the gateway composes an adapter on
        first use; the built-in engine reads the registry)."""
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            handle = await loop.run_in_executor(None, self.engine.submit, prepared.request, emit)
        except QueueFullError as e:
            raise p.APIError(429, f"server busy: {e}; retry shortly", None, "queue_full") from None
        except RequestError as e:
            raise p.APIError(e.status, str(e), None, e.code) from None
        if handle.applied:
            prepared.report["applied"] = handle.applied
        return handle, events

    # -- collect or stream --------------------------------------------------------------------
    async def collect(
        self, prepared: Prepared, handle: Handle, events: asyncio.Queue, receive: Receive
    ) -> dict | None:
        """The whole answer as one body, or None when the client left (its row cancelled).
        The body was read, so the next message on `receive` is the disconnect."""
        timing = Timing(self.metrics)
        watch = asyncio.create_task(_cancel_when_gone(receive, handle, events))
        text, logprobs = [], []
        try:
            while (ev := await events.get()) is not None and ev.kind == "token":
                timing.seen(ev)
                text.append(ev.text)
                logprobs.extend(ev.logprobs)
        finally:
            watch.cancel()
            handle.cancel()  # a no-op once finished
        if ev is None:
            return None
        if ev.kind == "error":
            raise event_error(ev)
        timing.seen(ev)
        build = p.chat_response if prepared.chat else p.completion_response
        lp = logprobs if prepared.request.logprobs is not None else None
        rid = p.new_id("chatcmpl" if prepared.chat else "cmpl")
        return build(
            rid, prepared.model, "".join(text), ev.finish_reason, ev.usage, prepared.report, lp
        )

    async def stream(
        self, prepared: Prepared, handle: Handle, events: asyncio.Queue
    ) -> AsyncIterator[str]:
        """The SSE chunks; a client that leaves frees its row."""
        shape = sse.StreamShape(
            prepared.chat,
            p.new_id("chatcmpl" if prepared.chat else "cmpl"),
            prepared.model,
            prepared.report,
            prepared.request.logprobs is not None,
            prepared.include_usage,
        )
        try:
            chunks = sse.encode(
                shape, events, Timing(self.metrics).seen, lambda ev: event_error(ev).body()
            )
            async for chunk in chunks:
                yield chunk
        finally:
            handle.cancel()


async def _cancel_when_gone(receive: Receive, handle: Handle, events: asyncio.Queue) -> None:
    """Wait for the client's disconnect (uvicorn sends it when the connection closes), then
    cancel the row and end the collection (None)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    handle.cancel()
    events.put_nowait(None)


def _route_and_encode(
    hub: Hub, target: Target, query: str, messages: list[dict[str, str]]
) -> tuple[Routing, list[int]]:
    """The routing (the fixed one, or the router's for the prompt) and the prompt's token
    ids, formatted the way the routed adapters were trained."""
    routing = target.routing
    if routing is None:
        routing = hub.route([query], target.k, target.compose)[0]
    text = hub.format(messages, routing)
    return routing, hub.base.tokenizer(text, add_special_tokens=False)["input_ids"]
