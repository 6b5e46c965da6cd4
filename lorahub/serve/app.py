"""The OpenAI-compatible HTTP app: routes, auth, request metrics, readiness.

A request's path: read and validate the body (validate.py) -> the serving layer
(serving.py: resolve `model`, route, format, tokenize, submit) -> one JSON body, or SSE
chunks (sse.py). A client's mistake is a 4xx in the OpenAI error envelope; only our own
faults are 5xx, and those never show the client server paths or exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorahub.hub import Hub
from lorahub.serve import protocol as p
from lorahub.serve.engine import Engine
from lorahub.serve.grammar import model_ids, servable
from lorahub.serve.metrics import UNMATCHED, Metrics
from lorahub.serve.serving import ServeConfig, Serving
from lorahub.serve.validate import parse, read_body

__all__ = ["ServeConfig", "create_app"]

log = logging.getLogger("loraplex.serve")

# paths a probe or a scraper reaches without the API key
OPEN_PATHS = frozenset({"/health", "/metrics"})


def create_app(hub: Hub, engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    metrics = Metrics(engine)
    engine.on_step = metrics.on_step
    serving = Serving(hub, engine, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        warm = asyncio.ensure_future(serving.off_loop(serving.warm))
        warm.add_done_callback(_log_failure)
        yield
        warm.cancel()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        serving.pool.shutdown()

    app = FastAPI(title="loraplex", lifespan=lifespan)
    _errors(app)
    _plain_routes(app, serving)
    _generation_routes(app, serving)
    _tokenizer_routes(app, serving)
    app.add_middleware(_Guard, api_key=config.api_key, metrics=metrics)
    app.state.metrics = metrics
    return app


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warming the router failed; /health stays 503", exc_info=task.exception())


def _errors(app: FastAPI) -> None:
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
        rid = p.new_id("req")
        log.error("internal error in %s %s (%s)", request.method, request.url.path, rid, exc_info=e)
        message = f"internal error (request {rid}); the server log has the details"
        return JSONResponse(p.APIError(500, message).body(), status_code=500)


def _plain_routes(app: FastAPI, serving: Serving) -> None:
    hub, engine = serving.hub, serving.engine

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the router is warm (the first `auto` request waits for nothing);
        503 before."""
        ready = serving.ready
        body = {
            "status": "ok" if ready else "starting",
            "model": hub.base.name,
            "router": serving.config.router,
            **engine.stats(),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(serving.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        ids = await serving.off_loop(model_ids, hub)
        if "base" not in ids:  # `model: base` is answered as the base model's name is
            ids.insert(1, "base")
        adapters = set(await serving.off_loop(servable, hub))
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


def _generation_routes(app: FastAPI, serving: Serving) -> None:
    async def generate(http: Request, kind: type[p.ChatRequest] | type[p.CompletionRequest]):
        req = parse(await read_body(http, serving.config.limits), kind)
        prepared = await serving.prepare(req)
        subs = await serving.submit(prepared)
        headers = {"x-loraplex-routing": json.dumps(prepared.report, separators=(",", ":"))}
        if prepared.stream:
            chunks = serving.stream(prepared, *subs[0])
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        body = await serving.collect(prepared, subs, http.receive)
        if body is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(body, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await generate(http, p.ChatRequest)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await generate(http, p.CompletionRequest)


def _tokenizer_routes(app: FastAPI, serving: Serving) -> None:
    """vLLM's tokenizer endpoints (what lm-evaluation-harness's remote tokenizer asks)."""
    limits = serving.config.limits

    @app.post("/tokenize")
    async def tokenize(http: Request) -> dict:
        req = parse(await read_body(http, limits), p.TokenizeRequest)
        return await serving.off_loop(serving.tokenize, req)

    @app.post("/detokenize")
    async def detokenize(http: Request) -> dict:
        req = parse(await read_body(http, limits), p.DetokenizeRequest)
        return await serving.off_loop(serving.detokenize, req)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return serving.tokenizer_info()


class _Guard:
    """ASGI middleware: the API key (every path but the probes', the docs included), and
    the request counter by route template and status, 500s from the catch-all handler
    included, a response the client left before its end as 499. Plain
    ASGI rather than `BaseHTTPMiddleware`, whose receive wrapper swallows the disconnect a
    handler waits for."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception on its way to the catch-all
        ended = left = False  # the body's last part sent; the client gone

        async def counted(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
            ended |= message["type"] == "http.response.body" and not message.get("more_body")
            await send(message)

        async def listened() -> Message:
            nonlocal left
            message = await receive()
            left |= message["type"] == "http.disconnect"
            return message

        try:
            if (
                self.api_key
                and scope["path"] not in OPEN_PATHS
                and not _authorized(scope, self.api_key)
            ):
                await _unauthorized(counted)
            else:
                await self.app(scope, listened, counted)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or UNMATCHED
            # a stream the client closed began as a 200: counted as the 499 it ended as
            self.metrics.requests.labels(
                endpoint, "499" if left and not ended else str(status)
            ).inc()


async def _unauthorized(send: Send) -> None:
    body = json.dumps(
        p.APIError(401, "missing or wrong API key (Authorization: Bearer KEY)").body()
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _authorized(scope: Scope, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())
