"""The built-in engine: continuous batching at the step level over a transformers causal LM,
every row with its own composition inside one forward pass.

Why a scheduler of our own rather than transformers' continuous-batching manager: that
manager packs requests' tokens into paged attention and owns the forward call, so the
composer could only see one flat token stream per step; mapping every packed token back to
its request's gate row, per module, per step, would tie us to its private layout. Here the
running batch is a left-padded `DynamicCache` (lorahub.serve.kv): a request that arrives
while others decode is prefilled (with its own composition) and joins the batch before the
next decode step; a finished or abandoned row leaves at once; every forward pass runs under
`Applied.rows`, so selection, mixture and fusion rows share it.

Adapters are stacked for the composer as requests need them and stay stacked (up to
`max_adapters`, least recently used dropped first), so a steady mix of adapters costs no
re-stacking.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from composition import Composer, Mode
from lorahub.applied import NOTHING, Applied
from lorahub.hub import Hub
from lorahub.inference import cut_at_stop
from lorahub.serve import kv
from lorahub.serve.engine import (
    Event,
    GenerationRequest,
    QueueFullError,
    check_capability,
)
from lorahub.serve.sampling import next_token

log = logging.getLogger("loraplex.serve")


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch: rows decoding at once; max_queue: requests waiting beyond those (then
    429); max_adapters: adapters kept stacked for the composer; prefill_tokens: prompt
    tokens prefilled per step (at least one prompt), so a burst of arrivals is admitted a
    few at a time between decode steps instead of stalling every running row (vLLM's
    max_num_batched_tokens plays this part)."""

    max_batch: int = 32
    max_queue: int = 256
    max_adapters: int = 64
    prefill_tokens: int = 1024

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_queue, self.max_adapters, self.prefill_tokens) <= 0:
            raise ValueError(f"batching limits must be positive: {self}")


class _Row:
    """One request while it is queued or decoding."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Event], None]) -> None:
        self.request = request
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""  # text already emitted
        self.cancelled = False
        self.applied: dict = {}  # the composer applies the routing itself
        seed = request.sampling.seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def cancel(self) -> None:
        self.cancelled = True


class BatchingEngine:
    """See the module docstring. Thread-safe `submit`; the decode loop runs on its own
    thread from `start()` until `stop()` has drained the queue."""

    def __init__(self, hub: Hub, config: BatchingConfig | None = None) -> None:
        if hub.base.is_seq2seq:
            raise ValueError("the built-in engine serves causal LMs; the base model is seq2seq")
        self.hub = hub
        self.model = hub.base.model
        self.config = config or BatchingConfig()
        self.tokenizer = hub.base.tokenizer
        self.eos = _eos_ids(hub)
        self.on_step: Callable[[int, int], None] | None = None  # (batch size, queue depth)
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None  # (rows, columns) of the cache
        self._stacked: OrderedDict[str, None] = OrderedDict()  # adapter names, LRU order
        self._composer: Composer | None = None
        # The decode steps' composition stays open while the running rows do not change,
        # so the per-row factors are built once per batch rather than once per step.
        self._block: ExitStack | None = None
        self._block_rows: tuple[int, ...] = ()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the public side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._close_block()
        if self._composer is not None:
            self._composer.detach()
            self._composer = None

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> _Row:
        check_capability("transformers", request)
        row = _Row(request, emit)
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(row)
            self._lock.notify_all()
        return row

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._stopping):
                    self._lock.wait()
                if self._stopping and not (self._waiting or self._running):
                    return
                joiners = self._admit()
            try:
                self._step([r for r in joiners if not r.cancelled])
            except Exception as e:  # a bug or an out-of-memory: fail this step's rows only
                log.exception("engine step failed")
                for row in [*joiners, *self._running]:
                    row.emit(Event("error", error=f"generation failed: {e}"))
                self._close_block()
                self._running, self._cache, self._mask = [], None, None
            if self.on_step is not None:
                self.on_step(len(self._running), len(self._waiting))

    def _admit(self) -> list[_Row]:
        """Waiting rows that join this step: free rows, within the prefill token budget."""
        joiners, tokens = [], 0
        free = self.config.max_batch - len(self._running)
        while self._waiting and len(joiners) < free:
            n = len(self._waiting[0].request.prompt_ids)
            if joiners and tokens + n > self.config.prefill_tokens:
                break
            joiners.append(self._waiting.popleft())
            tokens += n
        return joiners

    @torch.inference_mode()
    def _step(self, joiners: list[_Row]) -> None:
        if joiners:
            self._prefill(joiners)
        if self._running:
            self._decode()

    def _prefill(self, rows: list[_Row]) -> None:
        """The joiners' prompts in one left-padded pass, each with its composition; their
        first tokens; then their cache rows join the running batch."""
        self._close_block()
        self._stack({n for r in [*self._running, *rows] for n in r.request.routing.adapters})
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.request.prompt_ids)
            ids[i, width - n :], mask[i, width - n :] = torch.tensor(r.request.prompt_ids), 1
        cache = DynamicCache()
        with self._applied(rows).rows(torch.arange(len(rows))):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._cache, self._mask = kv.join(self._cache, self._mask, cache, mask)
        self._running.extend(rows)
        self._advance(out.logits[:, -1].float(), offset=len(self._running) - len(rows))

    def _decode(self) -> None:
        """One token for every running row."""
        rows = self._running
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long)], 1)
        last = torch.tensor([[r.ids[-1]] for r in rows])
        self._open_block(rows)
        out = self.model(
            input_ids=last,
            attention_mask=self._mask,
            position_ids=self._mask.sum(1, keepdim=True) - 1,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._advance(out.logits[:, -1].float(), offset=0)

    def _advance(self, logits: Tensor, offset: int) -> None:
        """Sample a token for running rows offset.. from logits (rows, V); emit; drop the
        rows that finished, failed or were abandoned."""
        done = set()
        for i, row_logits in enumerate(logits):
            row = self._running[offset + i]
            if row.cancelled:
                done.add(offset + i)
            elif not torch.isfinite(row_logits).all():
                row.emit(Event("error", error="the composed model produced NaN or Inf"))
                done.add(offset + i)
            elif self._emit_token(row, row_logits):
                done.add(offset + i)
        for r in self._running:  # abandoned rows that did not take part in this pass
            if r.cancelled:
                done.add(self._running.index(r))
        if done:
            stay = [i for i in range(len(self._running)) if i not in done]
            self._running = [self._running[i] for i in stay]
            if stay:
                self._cache, self._mask = kv.keep(self._cache, self._mask, torch.tensor(stay))
            else:
                self._cache, self._mask = None, None

    def _emit_token(self, row: _Row, logits: Tensor) -> bool:
        """Add one sampled token to `row` and emit what it makes visible; True if done."""
        s = row.request.sampling
        if len(row.ids) < s.min_new_tokens:
            logits = logits.clone()
            logits[list(self.eos)] = float("-inf")
        token = next_token(logits, s.temperature, s.top_p, row.generator)
        row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, s.stop)
        finish = (
            "stop"
            if stopped or token in self.eos
            else "length"
            if len(row.ids) >= s.max_new_tokens
            else None
        )
        visible = text if finish else _settled(text, s.stop)
        delta = visible[len(row.sent) :] if visible.startswith(row.sent) else ""
        row.sent += delta
        logprobs = _logprobs(self.tokenizer, logits, token, row.request.logprobs)
        row.emit(Event("token", text=delta, token_ids=(token,), logprobs=logprobs))
        if finish:
            usage = {
                "prompt_tokens": len(row.request.prompt_ids),
                "completion_tokens": len(row.ids),
            }
            row.emit(Event("done", finish_reason=finish, usage=usage))
        return finish is not None

    # -- composition ---------------------------------------------------------------------------
    def _open_block(self, rows: list[_Row]) -> None:
        """The composition of these rows, kept open across decode steps until they change."""
        key = tuple(id(r) for r in rows)
        if self._block is not None and key == self._block_rows:
            return
        self._close_block()
        self._block = ExitStack()
        self._block.enter_context(self._applied(rows).rows(torch.arange(len(rows))))
        self._block_rows = key

    def _close_block(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block, self._block_rows = None, ()

    def _stack(self, needed: set[str]) -> None:
        """Make sure the composer holds `needed` (re-stacking only when it does not)."""
        for name in needed:
            if name in self._stacked:
                self._stacked.move_to_end(name)
        missing = [n for n in sorted(needed) if n not in self._stacked]
        if not missing:
            return
        for name in missing:
            self._stacked[name] = None
        while len(self._stacked) > max(self.config.max_adapters, len(needed)):
            oldest = next(n for n in self._stacked if n not in needed)
            del self._stacked[oldest]
        if self._composer is not None:
            self._composer.detach()
        names = list(self._stacked)
        adapters = [self.hub.adapters.get(n) for n in names]
        self._composer = Composer.attach(self.model, adapters, names)

    def _applied(self, rows: list[_Row]) -> Applied:
        """These rows' compositions over the stacked adapters, per pass (never merged into
        the weights: the batch changes every step)."""
        if self._composer is None or not any(r.request.routing.adapters for r in rows):
            return NOTHING
        gates = self._composer.gates_for([r.request.routing.as_dict() for r in rows])
        modes = tuple(Mode(r.request.mode) for r in rows)
        return Applied(self._composer, gates, modes, merge=False)


def _eos_ids(hub: Hub) -> set[int]:
    eos = hub.base.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if hub.base.tokenizer.eos_token_id is not None:
        ids.add(hub.base.tokenizer.eos_token_id)
    return ids


def _settled(text: str, stop: tuple[str, ...]) -> str:
    """What can be shown before the row ends: not a trailing incomplete character, and
    not a tail that may still become a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


def _logprobs(tokenizer, logits: Tensor, token: int, top: int | None) -> tuple[dict, ...]:
    """The chosen token's log-probability and the `top` most likely alternatives."""
    if top is None:
        return ()
    logp = torch.log_softmax(logits, dim=-1)
    values, ids = logp.topk(top) if top else (logp[:0], logp[:0].long())
    alternatives = [
        {"token": tokenizer.decode([int(i)]), "logprob": float(v)}
        for v, i in zip(values, ids, strict=True)
    ]
    return (
        {
            "token": tokenizer.decode([token]),
            "logprob": float(logp[token]),
            "top_logprobs": alternatives,
        },
    )
