"""What the HTTP layer asks of an engine, whoever generates: the built-in continuous
batcher (`lorahub.serve.batching`) or, later, vLLM replicas behind a gateway.

A request is already resolved: prompt token ids, the routing to apply and its composer
mode, and how to sample. The engine answers through `emit`, called from its own thread
with `Event`s: any number of `token`s, then exactly one `done` or `error` — also when the
request is cancelled (an `error` with code "cancelled") or another request's fault breaks
a step. A failure never changes what any other request gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from composition import Mode
from lorahub.inference import Sampling
from router import Routing


class QueueFullError(RuntimeError):
    """The engine's queue is full; the client should retry later (HTTP 429)."""


class RequestError(ValueError):
    """The request cannot be served as asked: the client's to fix (HTTP `status`, `code`)."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class UnsupportedCompositionError(RequestError):
    """The engine cannot apply this composition (HTTP 400 unsupported_composition)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unsupported_composition")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    routing: Routing
    mode: Mode
    sampling: Sampling
    logprobs: int | None = None  # top alternatives to report per token (None: no logprobs)
    exact: bool = False  # refuse rather than approximate a composition the engine cannot hold
    # the prompt's own logprobs (echo), with this many alternatives, from the same forward
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class Event:
    kind: Literal["token", "done", "error"]
    text: str = ""  # token: the new text (stop strings and incomplete characters held back)
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[dict, ...] = ()  # per token: {"token", "logprob", "top_logprobs": [...]}
    # the first token only, when asked: an entry for each prompt token after the first
    prompt_logprobs: tuple[dict, ...] = ()
    finish_reason: str | None = None  # done: "stop" or "length"
    usage: dict[str, int] = field(default_factory=dict)  # done: prompt / completion tokens
    error: str = ""  # error: what went wrong (this request alone)
    status: int = 500  # error: 4xx when the request was at fault, 5xx when the server was
    code: str = "generation_failed"  # error: a machine-readable reason


# What each engine applies; anything else is refused (400 unsupported_composition), never
# silently downgraded. vLLM applies one ordinary LoRA per request, so per-token gating
# cannot run there; the built-in engine does not serve it yet.
CAPABILITIES: dict[str, frozenset[str]] = {
    "transformers": frozenset({"base", "selection", "mixture", "fusion"}),
    "vllm": frozenset({"base", "selection", "mixture", "fusion"}),
}


def composition_of(request: GenerationRequest) -> str:
    routing = request.routing
    if routing.per_token is not None:
        return "per_token"
    if not routing.adapters:
        return "base"
    if request.mode == Mode.fusion:
        return "fusion"
    return "selection" if len(routing.adapters) == 1 else "mixture"


def check_capability(engine: str, request: GenerationRequest) -> None:
    kind = composition_of(request)
    if kind not in CAPABILITIES[engine]:
        raise UnsupportedCompositionError(
            f"the {engine} engine cannot apply {kind} compositions; it applies "
            f"{', '.join(sorted(CAPABILITIES[engine]))}"
        )


class Handle(Protocol):
    applied: dict  # what the engine applied beyond the routing (reported to the client)

    def cancel(self) -> None:
        """The client went away: free the row at the next step."""


class Engine(Protocol):
    on_step: Callable[[int, int], None] | None  # (rows decoding, requests waiting) per step

    def start(self) -> None: ...

    def stop(self) -> None:
        """Finish what is queued and running, then stop."""

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Handle:
        """Queue a request; raises QueueFullError, or RequestError (the client's mistake,
        e.g. UnsupportedCompositionError). May block (a gateway composes an adapter on
        first use): call it off the event loop."""

    def stats(self) -> dict:
        """{"running", "waiting", ...}: requests being answered and queued (and, for a
        gateway, "upstreams")."""
