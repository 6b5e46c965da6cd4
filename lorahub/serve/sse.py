"""The SSE encoder: an engine's events for one request as OpenAI's stream of `data:` chunks.
The routing report in the first chunk (chat: the role's; completions: the first text's), a
chunk per visible text, `finish_reason` last, the usage chunk when asked for, then
`data: [DONE]`; an error ends the stream with an error chunk in the OpenAI envelope."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lorahub.serve import protocol as p
from lorahub.serve.engine import Event


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class StreamShape:
    """What the chunks look like: chat or completion, this response's id and model name,
    whether logprobs and the usage chunk were asked for."""

    chat: bool
    rid: str
    model: str
    report: dict
    logprobs: bool
    include_usage: bool

    def text_chunk(
        self,
        text: str,
        finish: str | None,
        logprobs: list | None,
        offset: int = 0,
        reported: bool = False,
    ) -> str:
        """offset: where this chunk's first token starts in the whole text (completions'
        text_offset); reported: the chunk carries the routing report."""
        if self.chat:
            delta = {"content": text} if text or not finish else {}
            body = p.chat_chunk(self.rid, self.model, delta, finish, logprobs)
        else:
            body = p.completion_chunk(self.rid, self.model, text, finish, logprobs, offset)
        return sse({**body, "loraplex": self.report} if reported else body)

    def role(self) -> list[str]:
        """Chat's first chunk: the role, with the routing report. A completion sends nothing
        before its first text, which carries the report (a client's time to first token
        stays the model's, as with vLLM)."""
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": ""}
        return [
            sse({**p.chat_chunk(self.rid, self.model, delta, None, None), "loraplex": self.report})
        ]

    def usage(self, usage: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse(p.usage_chunk(self.rid, obj, self.model, usage))


async def encode(
    shape: StreamShape,
    events: asyncio.Queue[Event],
    on_event: Callable[[Event], None],
    error_body: Callable[[Event], dict],
) -> AsyncIterator[str]:
    """The chunks of one request, until its terminal event. `on_event` sees every event
    (timing); `error_body` turns an error event into the envelope sent."""
    for chunk in shape.role():
        yield chunk
    unreported, offset = not shape.chat, 0
    while True:
        ev = await events.get()
        on_event(ev)
        if ev.kind == "error":
            yield sse(error_body(ev))
            break
        if ev.kind == "token" and (ev.text or (ev.logprobs and shape.logprobs)):
            lp = list(ev.logprobs) if shape.logprobs else None
            yield shape.text_chunk(ev.text, None, lp, offset, unreported)
            unreported, offset = False, offset + sum(len(e["token"]) for e in ev.logprobs)
        if ev.kind == "done":
            yield shape.text_chunk("", ev.finish_reason, None, reported=unreported)
            if shape.include_usage:
                yield shape.usage(ev.usage)
            break
    yield DONE
