"""Replicas that misbehave on demand, for the vLLM gateway's fault tests and soak: faults a
real vLLM cannot be made to produce when asked (a 4xx to a well-formed request, a stream
broken after exactly N tokens). Both speak HTTP on 127.0.0.1 only."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def refusing_replica(model: str, status: int, message: str, max_model_len: int = 256) -> Starlette:
    """A replica that describes itself like vLLM and answers every generation `status`
    with `message` in OpenAI's error envelope."""

    async def models(request: Request) -> JSONResponse:
        card = {"id": model, "object": "model", "max_model_len": max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def refuse(request: Request) -> JSONResponse:
        await request.body()
        error = {"message": message, "type": "BadRequestError", "param": None, "code": status}
        return JSONResponse({"error": error}, status_code=status)

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/completions", refuse, methods=["POST"]),
            Route("/v1/load_lora_adapter", refuse, methods=["POST"]),
        ]
    )


class FaultyProxy:
    """Forwards everything to a real replica; once `arm(n)`ed, the next completion stream
    (through any proxy sharing this `cut` budget) is broken off after its first n tokens,
    as a replica that dies mid-answer breaks it; while `refusing`, completions are answered
    400 (a replica that judges well-formed requests wrong)."""

    def __init__(self, target: str, cut: dict | None = None) -> None:
        self.target = target.rstrip("/")
        self.cut = cut if cut is not None else {"after": None, "done": threading.Event()}
        self.refusing = False
        self.refused = 0
        self.app = Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])])

    def arm(self, after_tokens: int) -> None:
        self.cut["done"].clear()
        self.cut["after"] = after_tokens

    async def _forward(self, request: Request) -> Response:
        if self.refusing and request.url.path == "/v1/completions":
            self.refused += 1
            error = {"message": "refused by the test", "type": "BadRequestError", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        client = httpx.AsyncClient(timeout=600)
        upstream = client.build_request(
            request.method,
            f"{self.target}{request.url.path}",
            content=await request.body(),
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )
        r = await client.send(upstream, stream=True)
        if "text/event-stream" not in r.headers.get("content-type", ""):
            body = await r.aread()
            await r.aclose()
            await client.aclose()
            return Response(body, r.status_code, media_type=r.headers.get("content-type"))
        after, self.cut["after"] = self.cut["after"], None  # this stream takes the cut

        async def lines() -> AsyncIterator[bytes]:
            tokens = 0
            try:
                async for line in r.aiter_lines():
                    yield f"{line}\n".encode()
                    if line.startswith("data: {"):
                        tokens += _count_ids(line)
                    if after is not None and tokens >= after:
                        self.cut["done"].set()
                        raise ConnectionAbortedError("cut by the test")  # uvicorn drops it
            finally:
                await r.aclose()
                await client.aclose()

        return StreamingResponse(lines(), r.status_code, media_type="text/event-stream")


def _count_ids(line: str) -> int:
    body = json.loads(line.removeprefix("data: "))
    return sum(len(c.get("token_ids") or ()) for c in body.get("choices", []))


@contextmanager
def serving_at(app, port: int) -> Iterator[str]:
    """`app` under uvicorn on 127.0.0.1:`port` in a thread, for the block; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
