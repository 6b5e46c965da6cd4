"""The OpenAI wire protocol as loraplex serves it: request models (validated by pydantic,
so a mistyped field is a 400 naming it), response and chunk builders, and the error
envelope `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]


class LoraplexOptions(BaseModel):
    """`extra_body={"loraplex": {...}}`: k adapters for `auto`, or an explicit mixture."""

    model_config = ConfigDict(extra="forbid")
    k: Annotated[int, Field(ge=1, le=64)] | None = None
    adapters: dict[str, float] | None = None
    exact: bool = False  # refuse a composition the engine could only approximate

    @field_validator("adapters")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and not v:
            raise ValueError("an explicit mixture names at least one adapter")
        return v


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's API does; the
    ones we cannot honour are refused by name (`refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM's extra: no end of sequence before
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    loraplex: LoraplexOptions = Field(default_factory=LoraplexOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, str):
            return self.content
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p["text"] for p in self.content)


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise ValueError("one prompt per request (send a list of one, or a string)")
        return prompts[0]


def refuse_unsupported(req: _Common) -> None:
    """ValueError naming the first field set to something we cannot do."""
    if req.n != 1:
        raise ValueError("n: only n=1 is supported; send several requests instead")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ValueError(f"{name}: not supported (send 0 or leave it out)")
    if isinstance(req, CompletionRequest) and (req.echo or req.suffix):
        raise ValueError("echo and suffix are not supported")


# -- errors --------------------------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-shaped error answer: HTTP status, message, type, param, code."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


# -- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(
    rid: str, model: str, text: str, finish: str, usage: dict, report: dict, logprobs: list | None
) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
    }
    return _body(rid, "chat.completion", model, [choice], usage, report)


def completion_response(
    rid: str, model: str, text: str, finish: str, usage: dict, report: dict, logprobs: list | None
) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": _legacy(logprobs)}
    return _body(rid, "text_completion", model, [choice], usage, report)


def chat_chunk(
    rid: str, model: str, delta: dict, finish: str | None, logprobs: list | None
) -> dict:
    choice = {
        "index": 0,
        "delta": delta,
        "finish_reason": finish,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
    }
    return _body(rid, "chat.completion.chunk", model, [choice])


def completion_chunk(
    rid: str, model: str, text: str, finish: str | None, logprobs: list | None
) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": _legacy(logprobs)}
    return _body(rid, "text_completion", model, [choice])


def usage_chunk(rid: str, obj: str, model: str, usage: dict) -> dict:
    return _body(rid, obj, model, [], usage)


def _body(
    rid: str,
    obj: str,
    model: str,
    choices: list,
    usage: dict | None = None,
    report: dict | None = None,
) -> dict:
    body: dict = {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = {**usage, "total_tokens": sum(usage.values())}
    if report is not None:
        body["loraplex"] = report
    return body


def _legacy(logprobs: list | None) -> dict | None:
    """The completions endpoint's older logprobs shape."""
    if logprobs is None:
        return None
    return {
        "tokens": [lp["token"] for lp in logprobs],
        "token_logprobs": [lp["logprob"] for lp in logprobs],
        "top_logprobs": [{a["token"]: a["logprob"] for a in lp["top_logprobs"]} for lp in logprobs],
    }
