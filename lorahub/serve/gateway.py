"""The vLLM gateway: loraplex routes and composes in front, vLLM replicas generate.

Every composition becomes ONE ordinary LoRA (lorahub.serve.materialize): selection is the
adapter itself, mixture the stacked adapter, fusion the averaged one. The gateway loads it
into the replica on first use (`POST /v1/load_lora_adapter`; vLLM needs
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), remembers what each replica holds, and sends the
prompt's token ids to `/v1/completions`, so formatting and tokenization are the built-in
engine's. Replicas are chosen by rendezvous hashing on the composed adapter's name (the one
that holds it), moving to the least-loaded replica when that one is busy. A replica that
fails is marked down and the request continues on another from the tokens it already has
(generation is idempotent); a down replica is probed again after `retry_after` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lorahub.hub import Hub
from lorahub.serve.engine import (
    Event,
    GenerationRequest,
    QueueFullError,
    UnsupportedCompositionError,
    check_capability,
)
from lorahub.serve.materialize import AdapterFolders, Materialized, RankLimitError

log = logging.getLogger("loraplex.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    """upstreams: vLLM OpenAI servers (http://host:port). max_lora_rank: the replicas'
    --max-lora-rank (compositions above it are compressed, or refused when exact). busy:
    in-flight requests past which a request leaves its adapter's replica for the
    least-loaded one. max_queue: requests in flight in all, past which 429."""

    upstreams: tuple[str, ...]
    folders: Path
    max_lora_rank: int = 16
    busy: int = 16
    max_queue: int = 1024
    retry_after: float = 5.0
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("the vLLM gateway needs at least one --upstream URL")
        for url in self.upstreams:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} is not an http(s) URL")


@dataclass
class Upstream:
    url: str
    model: str = ""  # the base model id it serves (from its /v1/models)
    named: set[str] = field(default_factory=set)  # adapters it serves by name (--lora-modules)
    in_flight: int = 0
    loaded: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)  # model names it was asked for
    down_since: float | None = None
    served: int = 0
    failures: int = 0

    def up(self, now: float, retry_after: float) -> bool:
        return self.down_since is None or now - self.down_since >= retry_after


class _Handle:
    def __init__(self, applied: dict) -> None:
        self.applied = applied
        self.future: Future | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.future is not None:
            self.future.cancel()


class VllmGateway:
    """The `Engine` protocol over vLLM replicas (see the module docstring)."""

    def __init__(self, hub: Hub, config: GatewayConfig) -> None:
        self.hub = hub
        self.config = config
        self.upstreams = [Upstream(u.rstrip("/")) for u in config.upstreams]
        self.folders = AdapterFolders(config.folders)
        self.on_step: Callable[[int, int], None] | None = None
        self.retries = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loraplex-gateway", daemon=True
        )
        self._client: httpx.AsyncClient | None = None
        self._in_flight = 0
        self._idle = threading.Condition()
        self._stopping = False

    # -- the Engine protocol ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result()

    def stop(self) -> None:
        with self._idle:
            self._stopping = True
            self._idle.wait_for(lambda: self._in_flight == 0)
        asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> _Handle:
        check_capability("vllm", request)
        materialized = self._materialize(request)  # may refuse (400) before anything is sent
        with self._idle:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if self._in_flight >= self.config.max_queue:
                raise QueueFullError(f"{self._in_flight} requests are already in flight")
            self._in_flight += 1
        handle = _Handle(_applied(materialized))
        handle.future = asyncio.run_coroutine_threadsafe(
            self._run(request, materialized, emit, handle), self._loop
        )
        handle.future.add_done_callback(lambda _: self._finished())
        return handle

    def stats(self) -> dict:
        return {
            "running": self._in_flight,
            "waiting": 0,
            "upstreams": [
                {
                    "url": u.url,
                    "up": u.down_since is None,
                    "in_flight": u.in_flight,
                    "loaded": len(u.loaded),
                    "served": u.served,
                    "failures": u.failures,
                }
                for u in self.upstreams
            ],
        }

    # -- internals -------------------------------------------------------------------------------
    def _finished(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()
        if self.on_step is not None:
            self.on_step(self._in_flight, 0)

    async def _connect(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout, connect=5.0))
        for u in self.upstreams:
            await self._describe(u)

    async def _describe(self, u: Upstream) -> None:
        """The replica's base model id; a replica that does not answer starts down."""
        try:
            r = await self._client.get(f"{u.url}/v1/models")
            r.raise_for_status()
            data = r.json()["data"]
            u.model = next(m["id"] for m in data if not m.get("parent"))
            u.named = {m["id"] for m in data if m.get("parent")}
            u.down_since = None
        except (httpx.HTTPError, KeyError, StopIteration, ValueError) as e:
            log.warning("upstream %s unavailable: %s", u.url, e)
            u.down_since = time.monotonic()

    def _materialize(self, request: GenerationRequest) -> Materialized | None:
        """The one adapter this request's composition becomes (None: the base model)."""
        routing = request.routing
        if not routing.adapters:
            return None
        adapters = [self.hub.adapters.get(n) for n in routing.adapters]
        try:
            made, evicted = self.folders.get(
                adapters, routing.weights, request.mode, self.config.max_lora_rank, request.exact
            )
        except RankLimitError as e:
            raise UnsupportedCompositionError(str(e)) from None
        for name in evicted:
            asyncio.run_coroutine_threadsafe(self._unload(name), self._loop)
        return made

    def choose(self, key: str, exclude: set[str]) -> Upstream | None:
        """Rendezvous hashing on `key` among the replicas that are up; the least-loaded one
        when the chosen one is busy."""
        now = time.monotonic()
        live = [
            u for u in self.upstreams if u.url not in exclude and u.up(now, self.config.retry_after)
        ]
        if not live:
            return None
        best = max(live, key=lambda u: hashlib.sha256(f"{key}|{u.url}".encode()).digest())
        if best.in_flight >= self.config.busy:
            return min(live, key=lambda u: u.in_flight)
        return best

    async def _run(
        self,
        request: GenerationRequest,
        made: Materialized | None,
        emit: Callable[[Event], None],
        handle: _Handle,
    ) -> None:
        generated: list[int] = []
        tried: set[str] = set()
        text_so_far = ""
        key = made.name if made else "base"
        while True:
            u = self.choose(key, tried)
            if u is None:
                emit(Event("error", error="no vLLM replica is available"))
                return
            try:
                u.in_flight += 1
                model = self._model_on(u, request, made)
                u.used.add(model)
                if made is not None and model == made.name and made.name not in u.loaded:
                    await self._load(u, made)
                finish, text_so_far = await self._stream(
                    u, request, model, generated, text_so_far, emit, handle
                )
                u.served += 1
                usage = {
                    "prompt_tokens": len(request.prompt_ids),
                    "completion_tokens": len(generated),
                }
                emit(Event("done", finish_reason=finish, usage=usage))
                return
            except (httpx.TransportError, httpx.HTTPStatusError, _UpstreamFailed) as e:
                if isinstance(e, httpx.HTTPStatusError) and e.response.status_code < 500:
                    emit(
                        Event(
                            "error", error=f"upstream refused the request: {e.response.text[:300]}"
                        )
                    )
                    return
                log.warning("upstream %s failed (%s); retrying elsewhere", u.url, e)
                u.failures += 1
                u.down_since = time.monotonic()
                u.loaded.clear()  # a restarted replica holds nothing
                tried.add(u.url)
                self.retries += 1
            finally:
                u.in_flight -= 1

    @staticmethod
    def _model_on(u: Upstream, request: GenerationRequest, made: Materialized | None) -> str:
        """The name `u` knows this composition by: its base model; an adapter it already
        serves under the registry's name (selection at weight 1: no second copy); or the
        composed adapter."""
        if made is None:
            return u.model
        routing = request.routing
        if made.weights == (1.0,) and routing.adapters[0] in u.named:
            return routing.adapters[0]
        return made.name

    async def _load(self, u: Upstream, made: Materialized) -> None:
        r = await self._client.post(
            f"{u.url}/v1/load_lora_adapter",
            json={"lora_name": made.name, "lora_path": str(made.path)},
        )
        if r.status_code >= 400 and "already" not in r.text:
            raise _UpstreamFailed(f"loading {made.name}: {r.status_code} {r.text[:200]}")
        u.loaded.add(made.name)

    async def _unload(self, name: str) -> None:
        for u in self.upstreams:
            if name in u.loaded:
                u.loaded.discard(name)
                with contextlib.suppress(httpx.HTTPError):  # a replica that is gone holds nothing
                    await self._client.post(
                        f"{u.url}/v1/unload_lora_adapter", json={"lora_name": name}
                    )

    async def _stream(
        self,
        u: Upstream,
        request: GenerationRequest,
        model: str,
        generated: list[int],
        text_so_far: str,
        emit: Callable[[Event], None],
        handle: _Handle,
    ) -> tuple[str, str]:
        """Stream the rest of the answer from `u`, continuing after `generated` (a retry);
        returns (finish reason, text so far)."""
        s = request.sampling
        body = {
            "model": model,
            "prompt": [*request.prompt_ids, *generated],
            "max_tokens": s.max_new_tokens - len(generated),
            "min_tokens": max(0, s.min_new_tokens - len(generated)),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stop": list(s.stop),
            "seed": s.seed,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if request.logprobs is not None:
            body["logprobs"] = request.logprobs
        finish = None
        async with self._client.stream("POST", f"{u.url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if handle.cancelled:
                    raise asyncio.CancelledError
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = _json(line.removeprefix("data: "))
                if "error" in chunk:
                    raise _UpstreamFailed(str(chunk["error"])[:300])
                for choice in chunk.get("choices", []):
                    ids = choice.get("token_ids") or []
                    generated.extend(ids)
                    text = choice.get("text", "")
                    text_so_far += text
                    emit(
                        Event("token", text=text, token_ids=tuple(ids), logprobs=_logprobs(choice))
                    )
                    finish = choice.get("finish_reason") or finish
        if finish is None:
            raise _UpstreamFailed("the stream ended without a finish reason")
        return finish, text_so_far


def _applied(made: Materialized | None) -> dict:
    """What the replicas apply: the one composed adapter, its weights after quantizing,
    its rank and the relative error of a compression (0: exact)."""
    if made is None:
        return {}
    return {
        "adapter": made.name,
        "weights": list(made.weights),
        "rank": made.rank,
        "rel_error": made.rel_error,
    }


class _UpstreamFailed(RuntimeError):
    pass


def _json(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _UpstreamFailed(f"malformed chunk: {e}") from None


def _logprobs(choice: dict) -> tuple[dict, ...]:
    """vLLM's completions logprobs, as the built-in engine's per-token dicts."""
    lp = choice.get("logprobs")
    if not lp or not lp.get("tokens"):
        return ()
    return tuple(
        {
            "token": token,
            "logprob": logprob,
            "top_logprobs": [{"token": t, "logprob": v} for t, v in (top or {}).items()],
        }
        for token, logprob, top in zip(
            lp["tokens"],
            lp["token_logprobs"],
            lp["top_logprobs"] or [None] * len(lp["tokens"]),
            strict=True,
        )
    )
