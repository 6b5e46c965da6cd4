"""The validation stage: everything about a request that can be checked before routing and
the engine, in one place (as text-generation-inference validates before its router). A
failure is a 4xx in the OpenAI envelope naming the field; what passes is typed (no
coercion), bounded and finite, and its prompt is at least one token that fits the context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from lorahub.serve import protocol as p

R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past a limit is a 400 naming the field (413 for the
    body)."""

    # ~250k tokens of text: past every context here, small enough to hold in memory at once
    max_body_bytes: int = 1 << 20
    # OpenAI takes 4, vLLM any number; lm-evaluation-harness sends a task's stops and the
    # end-of-sequence text
    max_stops: int = 16
    # every stop string is searched for in the new text after each token, on the engine's
    # thread (four of 200k characters cost seconds per token)
    max_stop_chars: int = 256
    max_messages: int = 512
    max_content_parts: int = 64  # per message
    # prompts in one completion request (a list: one choice each, one engine row each;
    # lm-evaluation-harness sends its batch_size)
    max_prompts: int = 128
    max_adapters: int = 16  # loraplex.adapters entries (the engine stacks at most 64 in all)
    # explicit mixture weights: a little negation (task arithmetic) up to a strong boost;
    # beyond it an adapter only breaks the model
    min_weight: float = -0.5
    max_weight: float = 50.0

    def __post_init__(self) -> None:
        if any(getattr(self, f.name) <= 0 for f in fields(self) if f.name != "min_weight"):
            raise ValueError(f"limits must be positive: {self}")
        if not self.min_weight < self.max_weight:
            raise ValueError(f"min_weight must be below max_weight: {self}")


JSON_TYPES = ("application/json",)


async def read_body(http: Request, limits: Limits) -> bytes:
    """The body, read a chunk at a time and refused (413) as soon as it passes the limit;
    415 unless it says it is JSON."""
    kind = http.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind not in JSON_TYPES:
        raise p.APIError(
            415,
            f"Content-Type must be application/json, not {kind or 'missing'!r}",
            None,
            "unsupported_media_type",
        )
    too_big = p.APIError(
        413, f"the body is over {limits.max_body_bytes} bytes", None, "request_too_large"
    )
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_big
    return bytes(body)


def parse(body: bytes, kind: type[R]) -> R:
    """The body as `kind` (strict: no coercion, no NaN or Infinity, valid Unicode), or a 400
    naming the first wrong field."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            message = f"the body is not valid JSON (UTF-8, no lone surrogates): {first['msg']}"
            raise p.APIError(400, message) from None
        if not first["loc"]:
            raise p.APIError(400, "the body must be a JSON object") from None
        param, message = _first_wrong_field(e.errors(include_url=False))
        raise p.APIError(400, message, param) from None


# how pydantic names the forms of a union field in an error's location (`stop`: str, list[str])
_FORM = re.compile(r"(str|int|float|bool|list|dict)(\[.*\])?")


def _first_wrong_field(errors: list) -> tuple[str, str]:
    """(param, message) of the first error. A field that takes several forms (`stop`, a
    string or a list of strings) fails once per form, each under the form's name: the
    param is the field, and the message lists the forms."""
    loc = errors[0]["loc"]
    for i, part in enumerate(loc):
        same = [e["loc"] for e in errors if e["loc"][:i] == loc[:i] and len(e["loc"]) > i]
        if isinstance(part, str) and _FORM.fullmatch(part) and len(same) > 1:
            param = ".".join(str(x) for x in loc[:i])
            forms = dict.fromkeys(str(where[i]) for where in same)
            return param, f"{param}: should be {' or '.join(forms)}"
    param = ".".join(str(x) for x in loc)
    return param, f"{param}: {errors[0]['msg']}"


def _stops(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    stops = req.stops()
    if len(stops) > limits.max_stops:
        raise p.APIError(400, f"stop takes at most {limits.max_stops} strings", "stop")
    if any(not 0 < len(s) <= limits.max_stop_chars for s in stops):
        raise p.APIError(
            400, f"each stop string takes 1 to {limits.max_stop_chars} characters", "stop"
        )


def _messages(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    if not isinstance(req, p.ChatRequest):
        return
    if len(req.messages) > limits.max_messages:
        raise p.APIError(400, f"at most {limits.max_messages} messages", "messages")
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list) and len(m.content) > limits.max_content_parts:
            raise p.APIError(
                400,
                f"at most {limits.max_content_parts} content parts a message",
                f"messages.{i}.content",
            )


def _top_logprobs(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    if isinstance(req, p.ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise p.APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")


def _texts(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    try:
        req.texts()
    except ValueError as e:
        param = "messages" if isinstance(req, p.ChatRequest) else "prompt"
        raise p.APIError(400, str(e), param) from None


def _prompts(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    if isinstance(req, p.ChatRequest):
        return
    n = len(req.prompts())
    if not 0 < n <= limits.max_prompts:
        raise p.APIError(
            400, f"prompt: a text, token ids, or a list of 1 to {limits.max_prompts}", "prompt"
        )
    if req.stream and (n > 1 or req.echo):
        raise p.APIError(
            400,
            "a stream answers one prompt without echo; send the list (or echo) unstreamed",
            "stream",
        )
    if req.max_tokens == 0 and not req.echo:
        raise p.APIError(400, "max_tokens 0 (score the prompt) needs echo", "max_tokens")


def _adapters(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    weights = req.loraplex.adapters or {}
    if len(weights) > limits.max_adapters:
        raise p.APIError(
            400, f"at most {limits.max_adapters} adapters in a mixture", "loraplex.adapters"
        )
    for name, w in weights.items():
        if not (math.isfinite(w) and limits.min_weight <= w <= limits.max_weight):
            raise p.APIError(
                400,
                f"the weight of {name!r} is {w}; weights lie in "
                f"[{limits.min_weight}, {limits.max_weight}]",
                "loraplex.adapters",
            )


def _unsupported(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    p.refuse_unsupported(req)


CHECKS: tuple[Callable[[p.ChatRequest | p.CompletionRequest, Limits], None], ...] = (
    _unsupported,
    _messages,
    _top_logprobs,
    _texts,
    _prompts,
    _stops,
    _adapters,
)


def check(req: p.ChatRequest | p.CompletionRequest, limits: Limits) -> None:
    """Every check of the table, in order: the first failure is the answer."""
    for one in CHECKS:
        one(req, limits)


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    """Token ids a prompt gives are ids of this model's vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise p.APIError(
            400,
            f"token id {bad} is not in this model's vocabulary (0 to {vocab - 1})",
            param,
            "invalid_token_id",
        )


def check_prompt(
    n_tokens: int, max_new_tokens: int, context: int, param: str, default: bool = False
) -> None:
    """The encoded prompt is at least one token, and it and the answer fit the context.
    `default`: max_new_tokens is the server's default, not the client's max_tokens."""
    if n_tokens == 0:
        raise p.APIError(400, "the prompt is empty after tokenization", param, "empty_prompt")
    if n_tokens >= context:
        raise p.APIError(
            400,
            f"the prompt is {n_tokens} tokens; this model's context is {context}",
            param,
            "context_length_exceeded",
        )
    if n_tokens + max_new_tokens > context:
        raise p.APIError(
            400,
            f"max_tokens {max_new_tokens}{' (the server default: send a smaller one)' if default else ''}"
            f" + the prompt's {n_tokens} tokens exceed the context of {context}",
            "max_tokens",
            "context_length_exceeded",
        )
