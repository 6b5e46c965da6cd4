"""The OpenAI wire protocol as loraplex serves it: request models (validated by pydantic,
so a mistyped field is a 400 naming it), response and chunk builders, and the error
envelope `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import difflib
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # what a torch generator takes

# Typed fields, no coercion ("8" is not 8, "yes" is not true), no NaN or Infinity.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class LoraplexOptions(BaseModel):
    """`extra_body={"loraplex": {...}}`: k adapters for `auto`, or an explicit mixture."""

    model_config = ConfigDict(**STRICT, extra="forbid")
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
    model_config = STRICT
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as vLLM ignores them, but
    for one that looks like a misspelt known field; the ones we cannot honour are refused
    by name (`refuse_unsupported`)."""

    model_config = ConfigDict(**STRICT, extra="allow")
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM's extra: no end of sequence before
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    loraplex: LoraplexOptions = Field(default_factory=LoraplexOptions)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        """A field sent as null takes its default, as OpenAI's API reads it (the openai
        client sends `n=None` as null)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


class Message(BaseModel):
    model_config = STRICT
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

    def texts(self) -> list[str]:
        return [m.text() for m in self.messages]


# a completion prompt: text, or token ids as the tokenizer numbers them (POST /tokenize)
Prompt = str | list[int]


class CompletionRequest(_Common):
    """A raw-text completion (no chat template), as OpenAI's and vLLM's: the prompt is a
    text, token ids, or a list of either (one choice each, `index` in order); `echo` puts
    the prompt before the answer, with its logprobs when `logprobs` is set; max_tokens 0
    (echo only) scores the prompt without answering."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's extra: a text prompt's BOS, as its tokenizer adds

    def prompts(self) -> list[Prompt]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def texts(self) -> list[str]:
        return [p for p in self.prompts() if isinstance(p, str)]


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a text (raw, as completions read it) or chat messages (in
    the chat template, as chat completions read them)."""

    model_config = ConfigDict(**STRICT, extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize."""

    model_config = ConfigDict(**STRICT, extra="forbid")
    model: str | None = None
    tokens: list[int]


# OpenAI's and vLLM's fields we cannot honour -> the values that ask for nothing (null
# always does). Any other value is refused by name (400), never silently ignored.
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "prompt_logprobs": (),
    "suffix": (),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "top_k": (-1, 0),
    "repetition_penalty": (1, 1.0),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "skip_special_tokens": (True,),  # vLLM's; every answer here is decoded without them
}
# other servers' fields that change nothing in the answer, named here because they look
# like a misspelt known field (`refuse_unsupported`): OpenRouter's fallback `models`
IGNORED = ("models",)
TYPOS_CHECKED = 64  # unknown fields looked at for a misspelling (difflib), per request


# ... and on chat completions only (vLLM's chat `echo` repeats the last message)
CHAT_UNSUPPORTED: dict[str, tuple[object, ...]] = {"echo": (False,)}


def refuse_unsupported(req: _Common) -> None:
    """A 400 naming the first field set to something we cannot do, or the first unknown
    field that looks like a misspelt known one ("temprature": a typo would otherwise fall
    back to the default silently; so is another server's name for a known field, such as
    `max_new_tokens` or `repeat_penalty`, which would be ignored). Other unknown fields
    are ignored, as vLLM ignores them: clients send newer or other servers' fields."""
    fields = {**(req.model_extra or {}), **{k: getattr(req, k) for k in type(req).model_fields}}
    table = UNSUPPORTED | (CHAT_UNSUPPORTED if isinstance(req, ChatRequest) else {})
    for name, harmless in table.items():
        value = fields.get(name)
        if value is not None and not any(_same(value, h) for h in harmless):
            raise APIError(
                400, f"{name}: not supported by this server (leave it out)", name, "unsupported"
            )
    known = [*type(req).model_fields, *UNSUPPORTED, *CHAT_UNSUPPORTED]
    unknown = [n for n in req.model_extra or {} if n not in known and n not in IGNORED]
    for name in unknown[:TYPOS_CHECKED]:
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if near:
            raise APIError(
                400,
                f"{name}: unrecognized request argument (did you mean {near[0]}?)",
                name,
                "unrecognized_argument",
            )


def _same(value: object, harmless: object) -> bool:
    return type(value) is type(harmless) and value == harmless


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


def completion_choice(
    index: int, text: str, finish: str, logprobs: list | None, report: dict
) -> dict:
    """One prompt's choice; `report` is the routing applied to it (prompts in one request
    are routed each on its own)."""
    return {
        "index": index,
        "text": text,
        "finish_reason": finish,
        "logprobs": _legacy(logprobs),
        "loraplex": report,
    }


def completion_response(
    rid: str, model: str, choices: list[dict], usage: dict, report: dict
) -> dict:
    return _body(rid, "text_completion", model, choices, usage, report)


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
    rid: str, model: str, text: str, finish: str | None, logprobs: list | None, offset: int = 0
) -> dict:
    choice = {
        "index": 0,
        "text": text,
        "finish_reason": finish,
        "logprobs": _legacy(logprobs, offset),
    }
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


def _legacy(logprobs: list | None, offset: int = 0) -> dict | None:
    """The completions endpoint's older logprobs shape, as OpenAI and vLLM give it: per
    token its text, its logprob, the chosen token and the top alternatives (null for a
    prompt's first token, which nothing predicts), and where its text starts."""
    if logprobs is None:
        return None
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp["token"])
    return {
        "tokens": [lp["token"] for lp in logprobs],
        "token_logprobs": [lp["logprob"] for lp in logprobs],
        "top_logprobs": [
            None
            if lp["top_logprobs"] is None
            else {a["token"]: a["logprob"] for a in [lp, *lp["top_logprobs"]]}
            for lp in logprobs
        ],
        "text_offset": offsets,
    }
