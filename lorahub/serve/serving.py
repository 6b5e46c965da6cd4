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
from lorahub.serve.route_batch import RouteBatcher
from lorahub.serve.validate import Limits, check, check_prompt, check_token_ids
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
        if self.router in PER_TOKEN_ROUTERS:
            raise ValueError(
                f"the {self.router} router gates per token, which no serving engine applies "
                "(every auto request would be refused); serve with --router task, retriever "
                f"or classifier ({self.router} routing works in `loraplex generate`)"
            )


# routers whose routings gate per token (Routing.per_token): engine.CAPABILITIES has none
PER_TOKEN_ROUTERS = frozenset({"arrow"})


@dataclass(frozen=True)
class Choice:
    """One prompt of a request: what the engine runs, what its answer reports, and the
    prompt's text to echo before the answer (None without echo)."""

    request: GenerationRequest
    report: dict
    echo: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine: a choice per prompt (chat: one).
    score_only: max_tokens 0, the prompt's logprobs without an answer."""

    choices: tuple[Choice, ...]
    model: str
    chat: bool
    stream: bool
    include_usage: bool
    score_only: bool = False

    @property
    def report(self) -> dict:
        """The first choice's routing (the header and the body's `loraplex`); each
        completion choice carries its own."""
        return self.choices[0].report

    @property
    def request(self) -> GenerationRequest:
        return self.choices[0].request


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


def requested_max_tokens(req: Request) -> int | None:
    """The answer's length the client asked for (None: the server's default); max_tokens 0
    (score the prompt) samples one token and does not show it."""
    max_tokens = req.max_tokens
    if isinstance(req, p.ChatRequest):
        max_tokens = req.max_completion_tokens or max_tokens
    return 1 if max_tokens == 0 else max_tokens


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
        rows = hub.base.model.get_input_embeddings().num_embeddings
        self.vocab = min(len(hub.base.tokenizer), rows)
        # The router and the registry's reads run here, off the event loop, one at a time;
        # concurrent requests' prompts are routed together.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-route")
        self.routes = RouteBatcher(self._route_now, self.off_loop)
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
        c = self.config
        target = await self.off_loop(resolve, req.model, req.loraplex, self.hub, c.compose, c.k)
        sampling = self._sampling(req)
        default = requested_max_tokens(req) is None
        chat = isinstance(req, p.ChatRequest)
        if chat:
            (routing,) = await self._route(target, [_last_user_turn(req)])
            prompts = [await self.off_loop(_chat_prompt, self.hub, req, routing)]
        else:
            encoded = await self.off_loop(_raw_prompts, self.hub, req, self.vocab)
            routings = await self._route(target, [text for _, text in encoded])
            prompts = [(r, ids, text) for r, (ids, text) in zip(routings, encoded, strict=True)]
        mode = Mode.fusion if target.compose == Compose.fusion else Mode.mixture
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        echo = not chat and req.echo
        choices = []
        for i, (routing, ids, text) in enumerate(prompts):
            param = "messages" if chat else ("prompt" if len(prompts) == 1 else f"prompt.{i}")
            check_prompt(len(ids), sampling.max_new_tokens, self.context, param, default)
            report = {**routing.to_json(), "compose": str(target.compose), "mode": str(mode)}
            if target.routing is None:
                report["router"] = c.router
            request = GenerationRequest(
                tuple(ids),
                routing,
                mode,
                sampling,
                logprobs,
                req.loraplex.exact,
                logprobs if echo else None,
            )
            self._count_routing(target, routing)
            choices.append(Choice(request, report, text if echo else None))
        usage = bool(req.stream_options and req.stream_options.include_usage)
        score_only = not chat and req.max_tokens == 0
        return Prepared(tuple(choices), req.model, chat, req.stream, usage, score_only)

    def _route_now(self, prompts: list[str], k: int, compose: str) -> list[Routing]:
        routings = self.hub.route(prompts, k, compose)
        self.metrics.route_batch.observe(len(prompts))
        return routings

    async def _route(self, target: Target, texts: list[str]) -> list[Routing]:
        if target.routing is not None:
            return [target.routing] * len(texts)
        return await self.routes.route(texts, target.k, target.compose)

    def _sampling(self, req: Request) -> Sampling:
        max_tokens = requested_max_tokens(req)
        limit = max_tokens or self.config.max_tokens
        if req.min_tokens > limit:
            given = "" if max_tokens else " (the server's default)"
            raise p.APIError(
                400, f"min_tokens {req.min_tokens} is over max_tokens {limit}{given}", "min_tokens"
            )
        return Sampling(
            limit,
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
    async def submit(self, prepared: Prepared) -> list[tuple[Handle, asyncio.Queue[Event | None]]]:
        """Each choice queued in the engine, with the queue its events arrive on; if one is
        refused, those queued before it are cancelled. Off the event loop: an engine may
        block in submit (the gateway composes an adapter on first use; the built-in engine
        reads the registry)."""
        subs: list[tuple[Handle, asyncio.Queue[Event | None]]] = []
        try:
            for choice in prepared.choices:
                subs.append(await self._submit_one(choice))
        except BaseException:
            for handle, _ in subs:
                handle.cancel()
            raise
        return subs

    async def _submit_one(self, choice: Choice) -> tuple[Handle, asyncio.Queue[Event | None]]:
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            handle = await loop.run_in_executor(None, self.engine.submit, choice.request, emit)
        except QueueFullError as e:
            raise p.APIError(429, f"server busy: {e}; retry shortly", None, "queue_full") from None
        except RequestError as e:
            raise p.APIError(e.status, str(e), None, e.code) from None
        if handle.applied:
            choice.report["applied"] = handle.applied
        return handle, events

    # -- collect or stream --------------------------------------------------------------------
    async def collect(
        self, prepared: Prepared, subs: list[tuple[Handle, asyncio.Queue]], receive: Receive
    ) -> dict | None:
        """The whole answer as one body, or None when the client left (its rows
        cancelled). The body was read, so the next message on `receive` is the
        disconnect."""
        handles = [h for h, _ in subs]
        gone = asyncio.Event()
        watch = asyncio.create_task(_cancel_when_gone(receive, subs, gone))
        try:
            answers = await asyncio.gather(*(self._answer(q, handles) for _, q in subs))
        finally:
            watch.cancel()
            for handle in handles:
                handle.cancel()  # a no-op once finished
        if gone.is_set() or any(a is None for a in answers):
            return None
        errors = [a.end for a in answers if a.end.kind == "error"]
        # the failure itself, not the prompts cancelled because of it
        error = next((e for e in errors if e.code != "cancelled"), errors[0] if errors else None)
        if error is not None:
            raise event_error(error)
        usage = {
            "prompt_tokens": sum(len(c.request.prompt_ids) for c in prepared.choices),
            "completion_tokens": 0
            if prepared.score_only
            else sum(a.end.usage.get("completion_tokens", 0) for a in answers),
        }
        rid = p.new_id("chatcmpl" if prepared.chat else "cmpl")
        if prepared.chat:
            (a,) = answers
            lp = a.logprobs if prepared.request.logprobs is not None else None
            text, finish = "".join(a.text), a.end.finish_reason
            return p.chat_response(rid, prepared.model, text, finish, usage, prepared.report, lp)
        choices = [
            self._completion_choice(i, c, a, prepared.score_only)
            for i, (c, a) in enumerate(zip(prepared.choices, answers, strict=True))
        ]
        return p.completion_response(rid, prepared.model, choices, usage, prepared.report)

    async def _answer(self, events: asyncio.Queue, handles: list[Handle]) -> _Answer | None:
        """One choice's events until its end (None: the client left). A choice that fails
        cancels the request's other prompts: the answer is that error."""
        timing = Timing(self.metrics)
        answer = _Answer()
        while (ev := await events.get()) is not None:
            timing.seen(ev)
            if ev.kind != "token":
                answer.end = ev
                if ev.kind == "error":
                    for handle in handles:
                        handle.cancel()
                return answer
            answer.text.append(ev.text)
            answer.logprobs.extend(ev.logprobs)
            answer.prompt_logprobs.extend(ev.prompt_logprobs)
        return None

    def _completion_choice(self, index: int, choice: Choice, a: _Answer, score_only: bool) -> dict:
        text = "" if score_only else "".join(a.text)
        lp = None if choice.request.logprobs is None else ([] if score_only else a.logprobs)
        if choice.echo is not None:
            text = choice.echo + text
            if lp is not None:
                lp = self._echoed(choice.request.prompt_ids, a.prompt_logprobs) + lp
        finish = "length" if score_only else a.end.finish_reason
        return p.completion_choice(index, text, finish, lp, choice.report)

    def _echoed(self, ids: tuple[int, ...], entries: list[dict]) -> list[dict]:
        """The prompt's logprob entries: its first token (nothing predicts it), then the
        engine's entry for each later one."""
        if len(entries) != len(ids) - 1:
            raise p.APIError(
                400, "this engine does not give a prompt's logprobs (echo)", "echo", "unsupported"
            )
        first = {"token": self.hub.base.tokenizer.decode([ids[0]]), "logprob": None}
        return [{**first, "top_logprobs": None}, *entries]

    async def stream(
        self, prepared: Prepared, handle: Handle, events: asyncio.Queue
    ) -> AsyncIterator[str]:
        """The SSE chunks of the one prompt (validation refuses streaming several); a
        client that leaves frees its row."""
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

    # -- the tokenizer, as vLLM serves it -------------------------------------------------------
    def tokenize(self, req: p.TokenizeRequest) -> dict:
        """vLLM's /tokenize: a raw prompt (special tokens added unless told not to) or chat
        messages in the chat template (none added unless told). Every `model` here shares
        the base model's tokenizer."""
        if (req.prompt is None) == (req.messages is None):
            raise p.APIError(400, "give a prompt or messages, not both", "prompt")
        if len(req.messages or ()) > self.config.limits.max_messages:
            raise p.APIError(400, f"at most {self.config.limits.max_messages} messages", "messages")
        tok = self.hub.base.tokenizer
        if req.prompt is not None:
            text, special = req.prompt, req.add_special_tokens is not False
        else:
            messages = [{"role": m.role, "content": _text(m, "messages")} for m in req.messages]
            text, special = (
                _chat_text(self.hub, messages, req.add_generation_prompt),
                bool(req.add_special_tokens),
            )
        ids = tok(text, add_special_tokens=special)["input_ids"]
        return {
            "count": len(ids),
            "max_model_len": self.context,
            "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if req.return_token_strs else None,
        }

    def detokenize(self, req: p.DetokenizeRequest) -> dict:
        check_token_ids(req.tokens, self.vocab, "tokens")
        return {"prompt": self.hub.base.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        """What vLLM's /tokenizer_info gives a client that tokenizes on the server (the
        harness's remote tokenizer): the special tokens, the chat template, the context.
        No file paths."""
        tok = self.hub.base.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
            "model_max_length": self.context,
        }


@dataclass
class _Answer:
    """One choice's events: its texts, logprob entries, prompt logprob entries and end."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)
    end: Event | None = None


async def _cancel_when_gone(
    receive: Receive, subs: list[tuple[Handle, asyncio.Queue]], gone: asyncio.Event
) -> None:
    """Wait for the client's disconnect (uvicorn sends it when the connection closes), then
    cancel the rows and end the collection (None on every queue)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    for handle, events in subs:
        handle.cancel()
        events.put_nowait(None)


def _text(m: p.Message, param: str) -> str:
    try:
        return m.text()
    except ValueError as e:
        raise p.APIError(400, str(e), param) from None


def _chat_text(hub: Hub, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Messages as the chat endpoint formats them for the base model."""
    if add_generation_prompt or hub.base.prompt_format != "chat":
        return hub.base.format_chat(messages)
    return hub.base.tokenizer.apply_chat_template(messages, tokenize=False)


Prompt = tuple[Routing, list[int], str]  # a prompt's routing, token ids and text


def _last_user_turn(req: p.ChatRequest) -> str:
    """What a conversation is routed on."""
    return next((m.text() for m in reversed(req.messages) if m.role == "user"), "")


def _chat_prompt(hub: Hub, req: p.ChatRequest, routing: Routing) -> Prompt:
    """The conversation formatted the way the routed adapters were trained (the chat
    template, or plain text for adapters trained on it)."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = hub.format(messages, routing)
    return routing, hub.base.tokenizer(text, add_special_tokens=False)["input_ids"], text


def _raw_prompts(hub: Hub, req: p.CompletionRequest, vocab: int) -> list[tuple[list[int], str]]:
    """Each prompt as given (no chat template): a text tokenized, or token ids checked
    against the vocabulary and decoded (the text it is routed on)."""
    tok = hub.base.tokenizer
    encoded = []
    for i, prompt in enumerate(req.prompts()):
        if isinstance(prompt, str):
            encoded.append(
                (tok(prompt, add_special_tokens=req.add_special_tokens)["input_ids"], prompt)
            )
        else:
            check_token_ids(prompt, vocab, "prompt" if len(req.prompts()) == 1 else f"prompt.{i}")
            encoded.append((list(prompt), tok.decode(prompt)))
    return encoded
