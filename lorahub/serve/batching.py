"""The built-in engine: continuous batching at the step level over a transformers causal LM,
every row with its own composition inside one forward pass.

Why a scheduler of our own rather than transformers' continuous-batching manager: that
manager packs requests' tokens into paged attention and owns the forward call, so the
composer could only see one flat token stream per step; mapping every packed token back to
its request's gate row, per module, per step, would tie us to its private layout. Here the
running batch is a left-padded `DynamicCache` (lorahub.serve.kv).

A request's life: waiting -> admitted (prefilling) -> running (decoding) -> ended. Each step
runs at most `prefill_tokens` prompt tokens of prefill, then one decode token for every
running row:
- prompts that fit the budget are prefilled together in one left-padded pass, in order;
- a longer prompt is prefilled in chunks of the budget, one chunk a step, in its own cache,
  so a 7k-token prompt delays the rows around it by one chunk a step, not by all of it;
- a prefilled row joins the running batch and gets its first token.
Admission bounds memory in tokens: rows are padded to the longest, so the engine admits a
request only while (rows) x (longest prompt + max_tokens) stays within `max_kv_tokens`.

The contract (engine.py): every request ends exactly once; a failure (an adapter that does
not load or fit, a step that raises, NaN logits) ends only the requests it concerns, and
the engine's state changes only after the work that needs it succeeded. The pieces:
scheduling here, output processing in `lorahub.decoding.RowOutput`, adapters in
`lorahub.serve.stack.AdapterStack`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from composition import Composition, Mode
from lorahub.applied import NOTHING, Applied
from lorahub.decoding import RowOutput, prompt_logprobs
from lorahub.hub import Hub, _fits
from lorahub.models import cache_arg
from lorahub.serve import kv
from lorahub.serve.engine import (
    Event,
    GenerationRequest,
    QueueFullError,
    RequestError,
    check_capability,
)
from lorahub.serve.stack import AdapterKey, AdapterPager, PagerConfig, StackError
from registry import AdapterNotFoundError, BaseModelMismatchError, LoraAdapter

log = logging.getLogger("loraplex.serve")


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch: rows admitted at once (prefilling or decoding); max_queue: requests
    waiting beyond those (then 429); pager: adapter slots on the model and the host cache
    (a batch never needs more distinct adapters than slots: more wait);
    prefill_tokens: prompt tokens prefilled per step (vLLM's max_num_batched_tokens plays
    this part); max_kv_tokens: cache positions held at once, rows x padded width (SmolLM2
    in float32: about 46 KB each, so 65,536 is about 3 GB); max_lanes: groups of rows of
    similar length decoded as separate passes (see _Lane); lane_floor: rows reserving at most
    this many positions share a lane whatever their lengths (SmolLM2, 32 rows of 70-150
    positions: one pass made 1.2x the tokens/s of lanes split at 2x; padding a few hundred
    columns costs less than a decode pass of its own)."""

    max_batch: int = 32
    max_queue: int = 256
    pager: PagerConfig = field(default_factory=PagerConfig)
    prefill_tokens: int = 512
    max_kv_tokens: int = 65536
    max_lanes: int = 4
    lane_floor: int = 1024

    def __post_init__(self) -> None:
        limits = (self.max_batch, self.max_queue, self.max_lanes)
        if min(*limits, self.prefill_tokens, self.max_kv_tokens) <= 0 or self.lane_floor < 0:
            raise ValueError(f"batching limits must be positive (lane_floor >= 0): {self}")


class _Row:
    """One request from submit to its one terminal event."""

    def __init__(
        self,
        request: GenerationRequest,
        emit: Callable[[Event], None],
        keys: dict[AdapterKey, float],
        out: RowOutput,
    ) -> None:
        self.request = request
        self.keys = keys  # the routing over exact adapter versions
        self.out = out
        self.applied = {"sha256": {k.name: k.sha256 for k in keys}} if keys else {}
        self.cancelled = False
        self.ended = False
        self.prefilled = 0  # prompt tokens already in `cache` (a prompt prefilled in chunks)
        self.prompt_lp: list[dict] = []  # prompt logprobs so far, when asked (echo)
        self.cache: DynamicCache | None = None
        self._emit = emit

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def reserve(self) -> int:
        """The most cache positions this row can come to need."""
        return len(self.prompt) + self.request.sampling.max_new_tokens

    def cancel(self) -> None:
        self.cancelled = True

    def send(self, event: Event) -> None:
        """A token event, unless the request already ended."""
        if not self.ended:
            self._deliver(event)

    def end(self, event: Event) -> None:
        """The request's terminal event: the first one counts, later ones are dropped."""
        if not self.ended:
            self.ended = True
            self._deliver(event)

    def fail(self, message: str, status: int = 500, code: str = "generation_failed") -> None:
        self.end(Event("error", error=message, status=status, code=code))

    def _deliver(self, event: Event) -> None:
        try:
            self._emit(event)
        except Exception:  # the listener is gone (its event loop closed): nobody to tell
            self.cancelled = True


@dataclass(eq=False)
class _Lane:
    """Running rows of similar length and their left-padded cache (rows, columns): rows
    are padded to their lane's longest, not to the longest of all, so one long request
    does not inflate every other row's cache."""

    rows: list[_Row]
    cache: DynamicCache | None
    mask: Tensor | None


def _one_lane(reserves: list[int], floor: int) -> bool:
    """Whether rows reserving these positions share a lane: all within `floor`, or within
    2x of each other."""
    return max(reserves) <= max(floor, 2 * min(reserves))


def _by_reserve(reserves: list[int], floor: int) -> list[list[int]]:
    """Indices grouped so that each group shares a lane (`_one_lane`); each group in index
    order."""
    groups: list[list[int]] = []
    for i in sorted(range(len(reserves)), key=reserves.__getitem__):
        if groups and _one_lane([reserves[groups[-1][0]], reserves[i]], floor):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def _place(lanes: list[_Lane], low: int, high: int, config: BatchingConfig) -> _Lane | None:
    """The lane for rows reserving low..high positions: the first they share a lane with
    (`_one_lane`); None for a new lane (while fewer than max_lanes, else the lane whose
    longest reserve is nearest)."""
    for lane in lanes:
        if _one_lane([low, high, *(r.reserve for r in lane.rows)], config.lane_floor):
            return lane
    if len(lanes) < config.max_lanes or not lanes:
        return None
    return min(lanes, key=lambda lane: abs(max(r.reserve for r in lane.rows) - high))


class BatchingEngine:
    """See the module docstring. Thread-safe `submit`, `cancel`, `stats`; the loop runs on
    its own thread from `start()` until `stop()` has finished what was queued."""

    def __init__(self, hub: Hub, config: BatchingConfig | None = None) -> None:
        if hub.base.is_seq2seq:
            raise ValueError("the built-in engine serves causal LMs; the base model is seq2seq")
        self.hub = hub
        self.model = hub.base.model
        self.config = config or BatchingConfig()
        self.tokenizer = hub.base.tokenizer
        self.eos = hub.base.eos_ids
        self.on_step: Callable[[int, int], None] | None = None  # (running rows, waiting)
        self.stack = AdapterPager(self.model, self._load, _why_unfit, self.config.pager)
        self._waiting: deque[_Row] = deque()
        self._prefilling: list[_Row] = []  # admitted, prompt not yet all in a cache
        self._lanes: list[_Lane] = []  # the rows decoding, by length
        # Each lane's composition (its per-row factors) is built once and reused by its
        # decode steps while its rows and the bank's slots stay the same: key -> (the rows,
        # held so their ids stay theirs; the composition), made under `_bank_state`.
        self._compositions: dict[tuple[int, ...], tuple[tuple[_Row, ...], Composition | None]]
        self._compositions, self._bank_state = {}, None
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
        self._compositions.clear()
        self.stack.close()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> _Row:
        check_capability("transformers", request)
        self._check(request)
        keys = self._keys(request)
        s = request.sampling
        row = _Row(request, emit, keys, RowOutput(self.tokenizer, s, self.eos, request.logprobs))
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(row)
            self._lock.notify_all()
        return row

    def stats(self) -> dict:
        with self._lock:
            return {
                "running": len(self._running),
                "lanes": len(self._lanes),
                "waiting": len(self._waiting),
                "prefilling": len(self._prefilling),
                "kv_tokens": self._kv_tokens(),
            }

    # -- checks at submit: the client's mistakes, before anything is queued ---------------------
    def _check(self, request: GenerationRequest) -> None:
        c = self.config
        if not request.prompt_ids:
            raise RequestError("the prompt is empty after tokenization", "empty_prompt")
        need = len(request.prompt_ids) + request.sampling.max_new_tokens
        if need > c.max_kv_tokens:
            raise RequestError(
                f"the prompt's {len(request.prompt_ids)} tokens + max_tokens "
                f"{request.sampling.max_new_tokens} exceed this server's token budget of "
                f"{c.max_kv_tokens}",
                "context_length_exceeded",
            )
        if len(request.routing.adapters) > c.pager.slots:
            raise RequestError(
                f"{len(request.routing.adapters)} adapters in one request; this server "
                f"holds at most {c.pager.slots} at once",
                "too_many_adapters",
            )

    def _keys(self, request: GenerationRequest) -> dict[AdapterKey, float]:
        """The routing over the adapters' registered versions now (what will be applied)."""
        keys = {}
        for name, weight in request.routing.as_dict().items():
            try:
                record = self.hub.usable(name)
            except AdapterNotFoundError:
                raise RequestError(
                    f"the adapter {name!r} is not registered (removed?)", "model_not_found", 404
                ) from None
            except BaseModelMismatchError as e:
                raise RequestError(str(e), "adapter_incompatible") from None
            keys[AdapterKey(name, record.sha256)] = weight
        return keys

    def _load(self, key: AdapterKey) -> LoraAdapter:
        return self.hub.registry.load(key.name, sha256=key.sha256)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._prefilling or self._running or self._stopping):
                    self._lock.wait()
                if self._stopping and not (self._waiting or self._prefilling or self._running):
                    return
                self._admit()
            self._step()
            if self.on_step is not None:
                self.on_step(len(self._running), len(self._waiting))

    def _admit(self) -> None:
        """Waiting rows, in order, while rows, the token budget and the stack allow."""
        c = self.config
        while self._waiting:
            row = self._waiting[0]
            if row.cancelled:
                self._waiting.popleft().fail("cancelled", 499, "cancelled")
                continue
            rows = [*self._running, *self._prefilling, row]
            keys = {k for r in rows for k in r.keys}
            if len(rows) > c.max_batch or self._reserved(row) > c.max_kv_tokens:
                return
            if len(keys) > c.pager.slots:
                return
            self._prefilling.append(self._waiting.popleft())

    @torch.inference_mode()
    def _step(self) -> None:
        self._drop_cancelled()
        group, chunked = self._prefill_work()
        if group or chunked:
            group, chunked = self._stack_for(group, chunked)
        if group:
            self._prefill_group(group)
        if chunked is not None:
            self._contain([chunked], self._prefill_chunk, chunked)
        for lane in list(self._lanes):
            if lane in self._lanes:  # not emptied by a cancellation meanwhile
                self._contain(lane.rows, self._decode, lane)

    def _contain(self, rows: list[_Row], work: Callable, *args) -> None:
        """Run one forward's work; if it raises, only `rows` fail."""
        try:
            work(*args)
        except Exception as e:  # a bug or out-of-memory: the rows in this forward fail
            self._failed(rows, e)

    def _failed(self, rows: list[_Row], e: Exception) -> None:
        """`rows` end with an error; the engine stays consistent (failed running rows leave
        the batch, their cache with them)."""
        log.error("engine step failed for %d request(s)", len(rows), exc_info=e)
        self._compositions.clear()
        for row in rows:
            row.fail(f"generation failed: {type(e).__name__}")
        self._prefilling = [r for r in self._prefilling if not r.ended]
        self._drop_ended()

    def _prefill_work(self) -> tuple[list[_Row], _Row | None]:
        """This step's prefill: prompts that fit the budget together (in order), and one
        chunk of the first longer prompt."""
        budget = self.config.prefill_tokens
        group = []
        for row in self._prefilling:
            if not row.prefilled and _prefill_cost([*group, row]) <= budget:
                group.append(row)
        chunked = next((r for r in self._prefilling if len(r.prompt) > budget), None)
        return group, chunked

    def _stack_for(self, group: list[_Row], chunked: _Row | None) -> tuple[list[_Row], _Row | None]:
        """Stack the adapters of the running rows and this step's prefill; a request whose
        adapter cannot be loaded or stacked fails alone, and the rest go on."""
        while True:
            live = [r for r in [*group, chunked] if r is not None and not r.ended]
            try:
                self.stack.ensure({k for r in [*self._running, *live] for k in r.keys})
                break
            except StackError as e:
                if not any(k in r.keys for r in live for k in e.bad):  # never loop forever
                    e.bad.update({k: str(e) for r in live for k in r.keys})
                for row in live:
                    bad = [f"{k.name}: {why}" for k, why in e.bad.items() if k in row.keys]
                    if bad:
                        row.fail(f"adapter failed: {'; '.join(bad)}", 500, "adapter_failed")
                self._prefilling = [r for r in self._prefilling if not r.ended]
        group = [r for r in group if not r.ended]
        return group, chunked if chunked is not None and not chunked.ended else None

    def _prefill_group(self, rows: list[_Row]) -> None:
        """Whole prompts in one left-padded pass, each with its composition. If the pass
        raises, each prompt is tried alone, so one prompt's fault fails that prompt only."""
        try:
            prefilled = self._whole_prompts(rows)
        except Exception as e:
            if len(rows) == 1:
                self._failed(rows, e)
                return
            log.warning("a prefill of %d prompts failed; trying each alone", len(rows))
            for row in rows:
                self._prefill_group([row])
            return
        cache, mask, logits, prompt_lp = prefilled
        for row, lp in zip(rows, prompt_lp, strict=True):
            row.prompt_lp.extend(lp)
        self._contain(rows, self._join, rows, cache, mask, logits)

    def _whole_prompts(
        self, rows: list[_Row]
    ) -> tuple[DynamicCache, Tensor, Tensor, list[list[dict]]]:
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt) :], mask[i, width - len(r.prompt) :] = (
                torch.tensor(r.prompt),
                1,
            )
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        starts = [len(r.prompt) - width for r in rows]
        return cache, mask, *self._forward(rows, ids, mask, positions, cache, starts)

    def _prefill_chunk(self, row: _Row) -> None:
        """The next `prefill_tokens` of one long prompt, in the row's own cache."""
        start = row.prefilled
        end = min(len(row.prompt), start + self.config.prefill_tokens)
        ids = torch.tensor([row.prompt[start:end]])
        mask = torch.ones((1, end), dtype=torch.long)
        cache = row.cache if row.cache is not None else DynamicCache()
        logits, (lp,) = self._forward(
            [row], ids, mask, torch.arange(start, end)[None], cache, [start]
        )
        row.cache, row.prefilled = cache, end
        row.prompt_lp.extend(lp)
        if end == len(row.prompt):
            row.cache = None
            self._join([row], cache, mask, logits)

    def _forward(
        self,
        rows: list[_Row],
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        cache: DynamicCache,
        starts: list[int],
    ) -> tuple[Tensor, list[list[dict]]]:
        """One prefill pass under these rows' compositions -> last logits (rows, V), and per
        row the logprobs of its prompt tokens this pass predicts (when it asked for them).
        starts: per row, the prompt index in column 0 of `ids` (negative under padding)."""
        asked = any(r.request.prompt_logprobs is not None for r in rows)
        with self._applied(rows).rows(torch.arange(len(rows))):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=0 if asked else 1,
                **cache_arg(self.model, cache),
            )
        lp = [
            self._prompt_lp(r, logits, s)
            for r, logits, s in zip(rows, out.logits, starts, strict=True)
        ]
        return out.logits[:, -1].float(), lp

    def _prompt_lp(self, row: _Row, logits: Tensor, start: int) -> list[dict]:
        """logits (columns, V) of one row, column c at prompt index start + c -> the
        entries for the prompt tokens they predict (index start + c + 1)."""
        top = row.request.prompt_logprobs
        if top is None:
            return []
        first, last = max(0, -start), min(logits.shape[0], len(row.prompt) - 1 - start)
        targets = row.prompt[start + first + 1 : start + last + 1]
        return prompt_logprobs(self.tokenizer, logits[first:last], targets, top)

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: Tensor, logits: Tensor) -> None:
        """Prefilled rows join lanes of their length with their first token."""
        self._prefilling = [r for r in self._prefilling if r not in rows]
        clusters = _by_reserve([r.reserve for r in rows], self.config.lane_floor)
        for idx in clusters:
            part = [rows[i] for i in idx]
            if len(clusters) == 1:
                part_cache, part_mask = cache, mask
            else:
                part_cache, part_mask = kv.select(cache, mask, torch.tensor(idx))
            reserve = [r.reserve for r in part]
            lane = _place(self._lanes, min(reserve), max(reserve), self.config)
            if lane is None:
                lane = _Lane(part, part_cache, part_mask)
                self._lanes.append(lane)
            else:
                lane.cache, lane.mask = kv.join(lane.cache, lane.mask, part_cache, part_mask)
                lane.rows.extend(part)
            self._advance(lane, logits[idx], offset=len(lane.rows) - len(part))

    def _decode(self, lane: _Lane) -> None:
        """One token for every row of a lane."""
        rows = lane.rows
        mask = torch.cat([lane.mask, torch.ones((len(rows), 1), dtype=torch.long)], 1)
        last = torch.tensor([[r.out.ids[-1]] for r in rows])
        with self._use(self._composition(rows)):
            out = self.model(
                input_ids=last,
                attention_mask=mask,
                position_ids=mask.sum(1, keepdim=True) - 1,
                use_cache=True,
                **cache_arg(self.model, lane.cache),
            )
        lane.mask = mask
        self._advance(lane, out.logits[:, -1].float(), offset=0)

    def _advance(self, lane: _Lane, logits: Tensor, offset: int) -> None:
        """A token for the lane's rows offset.. from logits (rows, V); drop the rows that
        finished, failed or were abandoned."""
        finite = torch.isfinite(logits).all(1).tolist()  # one pass, not one per row
        for i, row_logits in enumerate(logits):
            row = lane.rows[offset + i]
            if row.cancelled or row.ended:
                continue
            if not finite[i]:
                row.fail("the composed model produced NaN or Inf")
                continue
            step = row.out.push(row_logits)
            first = len(row.out.ids) == 1
            row.send(
                Event(
                    "token",
                    text=step.text,
                    token_ids=(step.token,),
                    logprobs=step.logprobs,
                    prompt_logprobs=tuple(row.prompt_lp) if first else (),
                )
            )
            if step.finish:
                usage = {"prompt_tokens": len(row.prompt), "completion_tokens": len(row.out.ids)}
                row.end(Event("done", finish_reason=step.finish, usage=usage))
        self._drop_cancelled()

    @property
    def _running(self) -> list[_Row]:
        return [r for lane in self._lanes for r in lane.rows]

    def _drop_cancelled(self) -> None:
        """Cancelled requests end; ended rows leave the batch and the prefill."""
        for row in [*self._running, *self._prefilling]:
            if row.cancelled:
                row.fail("cancelled", 499, "cancelled")
        self._prefilling = [r for r in self._prefilling if not r.ended]
        self._drop_ended()

    def _drop_ended(self) -> None:
        for lane in self._lanes:
            stay = [i for i, r in enumerate(lane.rows) if not r.ended]
            if len(stay) < len(lane.rows):
                lane.rows = [lane.rows[i] for i in stay]
                if stay:
                    lane.cache, lane.mask = kv.keep(lane.cache, lane.mask, torch.tensor(stay))
        self._lanes = [lane for lane in self._lanes if lane.rows]

    def _reserved(self, joining: _Row) -> int:
        """Cache positions the admitted rows and `joining` can come to hold: each lane's
        rows padded to its longest reserve, the prefilling rows placed as they would be."""
        lanes = [_Lane(list(lane.rows), None, None) for lane in self._lanes]
        for row in [*self._prefilling, joining]:
            lane = _place(lanes, row.reserve, row.reserve, self.config)
            if lane is None:
                lanes.append(_Lane([row], None, None))
            else:
                lane.rows.append(row)
        return sum(len(lane.rows) * max(r.reserve for r in lane.rows) for lane in lanes)

    def _kv_tokens(self) -> int:
        running = sum(lane.mask.numel() for lane in self._lanes)
        return running + sum(r.prefilled for r in self._prefilling)

    # -- composition ---------------------------------------------------------------------------
    def _composition(self, rows: list[_Row]) -> Composition | None:
        """These rows' composition, prepared once while they and the bank stay the same."""
        key = tuple(id(r) for r in rows)
        bank = (id(self.stack.composer), frozenset(self.stack.slot_of.items()))
        if bank != self._bank_state:  # paged since: the gates may point elsewhere
            self._compositions, self._bank_state = {}, bank
        if key not in self._compositions:
            live = {tuple(id(r) for r in lane.rows) for lane in self._lanes}
            self._compositions = {k: v for k, v in self._compositions.items() if k in live}
            prepared = self._applied(rows).prepare(torch.arange(len(rows)))
            self._compositions[key] = (tuple(rows), prepared)
        return self._compositions[key][1]

    def _use(self, composition: Composition | None) -> AbstractContextManager:
        return nullcontext() if composition is None else self.stack.composer.use(composition)

    def _applied(self, rows: list[_Row]) -> Applied:
        """These rows' compositions over the stack, per pass (never merged into the
        weights: the batch changes every step)."""
        if not any(r.keys for r in rows):
            return NOTHING
        gates = self.stack.gates([r.keys for r in rows])
        modes = tuple(Mode(r.request.mode) for r in rows)
        return Applied(self.stack.composer, gates, modes, merge=False)


def _prefill_cost(rows: list[_Row]) -> int:
    """Prompt tokens a prefill of these rows computes logits for: the padded batch when
    one keeps its prompt's logits (echo with logprobs), else the prompts' tokens."""
    lengths = [len(r.prompt) for r in rows]
    if any(r.request.prompt_logprobs is not None for r in rows):
        return len(rows) * max(lengths)
    return sum(lengths)


def _why_unfit(model: nn.Module, adapter: LoraAdapter) -> str | None:
    shapes = {name: (m.lora_A.shape[1], m.lora_B.shape[0]) for name, m in adapter.modules.items()}
    if _fits(model, shapes):
        return None
    return f"its modules do not fit this model (made for {adapter.base_model.name!r})"
