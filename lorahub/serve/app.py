"""The OpenAI-compatible HTTP app: routes, auth, metrics, streaming.

A request's path: parse and validate -> resolve `model` to a target (grammar.py) -> route
the prompt when the target asks for it -> format it the way the routed adapters were
trained -> the engine, with that row's composition -> chunks (SSE) or one JSON body. A
client's mistake is a 4xx in the OpenAI error envelope; only our own faults are 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from composition import Mode
from lorahub.hub import Compose, Hub
from lorahub.inference import Sampling
from lorahub.serve import protocol as p
from lorahub.serve.engine import (
    Engine,
    Event,
    GenerationRequest,
    QueueFullError,
    UnsupportedCompositionError,
)
from lorahub.serve.grammar import Target, model_ids, resolve, servable
from lorahub.serve.metrics import Metrics
from router import DEFAULT_ROUTER, Routing


@dataclass(frozen=True)
class ServeConfig:
    """compose / k: what `auto` means; max_tokens: the default when a request names none;
    api_key: required as `Authorization: Bearer KEY` when set."""

    compose: Compose = Compose.mixture
    k: int = 3
    max_tokens: int = 256
    api_key: str | None = None
    router: str = DEFAULT_ROUTER

    def __post_init__(self) -> None:
        if self.compose == Compose.none or self.k <= 0 or self.max_tokens <= 0:
            raise ValueError(f"auto needs a composition and positive k, max_tokens: {self}")


@dataclass
class _Prepared:
    """A validated request, ready for the engine."""

    request: GenerationRequest
    target: Target
    model: str
    report: dict


def create_app(hub: Hub, engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    metrics = Metrics()
    engine.on_step = metrics.on_step
    # The router and the registry's reads run here, off the event loop, one at a time.
    routing_pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-route")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        routing_pool.shutdown()

    app = FastAPI(title="loraplex", lifespan=lifespan)
    context = getattr(hub.base.model.config, "max_position_embeddings", None) or 1 << 30

    # -- errors and auth ----------------------------------------------------------------------
    @app.exception_handler(p.APIError)
    async def _api_error(request: Request, e: p.APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(
            p.APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(p.APIError(500, f"internal error: {e}").body(), status_code=500)

    @app.middleware("http")
    async def _count_and_guard(request: Request, call_next: Callable) -> Response:
        path = request.url.path
        if config.api_key and path.startswith("/v1/") and not _authorized(request, config.api_key):
            response: Response = JSONResponse(
                p.APIError(401, "missing or wrong API key (Authorization: Bearer KEY)").body(),
                status_code=401,
            )
        else:
            response = await call_next(request)
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    # -- plain routes -------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": hub.base.name, "router": config.router, **engine.stats()}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(routing_pool, model_ids, hub)
        adapters = set(await loop.run_in_executor(routing_pool, servable, hub))
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "loraplex",
                **({"parent": hub.base.name} if m in adapters else {}),
            }
            for m in ids
        ]
        return {"object": "list", "data": data}

    # -- generation ---------------------------------------------------------------------------
    async def prepare(req: p.ChatRequest | p.CompletionRequest) -> _Prepared:
        try:
            p.refuse_unsupported(req)
            if isinstance(req, p.ChatRequest):
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
                max_tokens = req.max_completion_tokens or req.max_tokens
                logprobs = (req.top_logprobs or 0) if req.logprobs else None
            else:
                messages = [{"role": "user", "content": req.text()}]
                query, max_tokens, logprobs = messages[0]["content"], req.max_tokens, req.logprobs
            sampling = Sampling(
                max_tokens or config.max_tokens,
                1.0 if req.temperature is None else req.temperature,  # OpenAI's default
                1.0 if req.top_p is None else req.top_p,
                tuple(req.stop or ()),
                req.seed,
                req.min_tokens,
            )
        except ValueError as e:
            raise p.APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        target = await loop.run_in_executor(
            routing_pool, resolve, req.model, req.loraplex, hub, config.compose, config.k
        )
        routing, ids = await loop.run_in_executor(
            routing_pool, _route_and_encode, hub, target, query, messages
        )
        if len(ids) >= context:
            raise p.APIError(
                400,
                f"the prompt is {len(ids)} tokens; this model's context is {context}",
                "messages" if isinstance(req, p.ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        if len(ids) + sampling.max_new_tokens > context:
            raise p.APIError(
                400,
                f"max_tokens {sampling.max_new_tokens} + the prompt's {len(ids)} tokens "
                f"exceed the context of {context}",
                "max_tokens",
                "context_length_exceeded",
            )
        mode = Mode.fusion if target.compose == Compose.fusion else Mode.mixture
        report = {**routing.to_json(), "compose": str(target.compose), "mode": str(mode)}
        if target.routing is None:
            report["router"] = config.router
        request = GenerationRequest(
            tuple(ids), routing, mode, sampling, logprobs, req.loraplex.exact
        )
        for name in routing.adapters:
            metrics.routed.labels(name).inc()
        if target.routing is None and not routing.adapters:
            metrics.base_only.inc()
        return _Prepared(request, target, req.model, report)

    async def generate(http: Request, kind: type[p.ChatRequest] | type[p.CompletionRequest]):
        req = await _parse(http, kind)
        prepared = await prepare(req)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            handle = engine.submit(
                prepared.request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            )
        except QueueFullError as e:
            raise p.APIError(429, f"server busy: {e}; retry shortly", None, "queue_full") from None
        except UnsupportedCompositionError as e:
            raise p.APIError(400, str(e), "model", "unsupported_composition") from None
        if handle.applied:
            prepared.report["applied"] = handle.applied
        headers = {"x-loraplex-routing": json.dumps(prepared.report, separators=(",", ":"))}
        chat = kind is p.ChatRequest
        timing = _Timing(metrics)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = _stream(prepared, events, handle, chat, include_usage, timing)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        text, logprobs, done = [], [], None
        try:
            while done is None:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
                timing.seen(ev)
                if ev.kind == "token":
                    text.append(ev.text)
                    logprobs.extend(ev.logprobs)
                else:
                    done = ev
        finally:
            handle.cancel()  # a no-op once finished; frees the row if the client left
        if done.kind == "error":
            raise p.APIError(500, done.error, None, "generation_failed")
        timing.finish(done)
        build = p.chat_response if chat else p.completion_response
        lp = logprobs if prepared.request.logprobs is not None else None
        body = build(
            p.new_id("chatcmpl" if chat else "cmpl"),
            prepared.model,
            "".join(text),
            done.finish_reason,
            done.usage,
            prepared.report,
            lp,
        )
        return JSONResponse(body, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await generate(http, p.ChatRequest)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await generate(http, p.CompletionRequest)

    app.state.metrics = metrics
    return app


async def _parse(http: Request, kind: type) -> Any:
    """The JSON body as `kind`, or a 400 naming the first wrong field."""
    try:
        data = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise p.APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise p.APIError(400, "the body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"])
        raise p.APIError(400, f"{param}: {first['msg']}", param) from None


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


def _authorized(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


class _Timing:
    """Time to first token, inter-token gaps and request latency, into the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def seen(self, ev: Event) -> None:
        if ev.kind != "token":
            return
        now = time.perf_counter()
        (self.metrics.ttft if self.first else self.metrics.itl).observe(now - self.last)
        self.first, self.last = False, now

    def finish(self, done: Event) -> None:
        self.metrics.latency.observe(time.perf_counter() - self.start)
        self.metrics.tokens.labels("prompt").inc(done.usage.get("prompt_tokens", 0))
        self.metrics.tokens.labels("completion").inc(done.usage.get("completion_tokens", 0))


async def _stream(
    prepared: _Prepared,
    events: asyncio.Queue[Event],
    handle: Any,
    chat: bool,
    include_usage: bool,
    timing: _Timing,
) -> AsyncIterator[str]:
    """SSE: (chat) the role first, a chunk per visible text, finish_reason last, the usage
    chunk when asked for, then [DONE]. A client that leaves frees its row."""
    rid = p.new_id("chatcmpl" if chat else "cmpl")
    model = prepared.model
    obj = "chat.completion.chunk" if chat else "text_completion"
    want_lp = prepared.request.logprobs is not None

    def chunk(text: str, finish: str | None, logprobs: list | None) -> str:
        if chat:
            delta = {"content": text} if text or not finish else {}
            body = p.chat_chunk(rid, model, delta, finish, logprobs)
        else:
            body = p.completion_chunk(rid, model, text, finish, logprobs)
        return _sse(body)

    try:
        if chat:
            first = p.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, None)
            yield _sse({**first, "loraplex": prepared.report})
        while True:
            ev = await events.get()
            timing.seen(ev)
            if ev.kind == "error":
                yield _sse(p.APIError(500, ev.error, None, "generation_failed").body())
                break
            if ev.kind == "token" and (ev.text or (ev.logprobs and want_lp)):
                yield chunk(ev.text, None, list(ev.logprobs) if want_lp else None)
            if ev.kind == "done":
                timing.finish(ev)
                yield chunk("", ev.finish_reason, None)
                if include_usage:
                    yield _sse(p.usage_chunk(rid, obj, model, ev.usage))
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
