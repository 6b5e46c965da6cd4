"""Generation semantics, one implementation for `Hub.generate` and the server's engine:
how to pick a token (`Sampling`: greedy, or a draw from the top_p nucleus with the row's
own seeded generator, so a row's draws do not depend on which rows share its batch),
`min_tokens`, stop strings, the incremental visible text and logprobs (`RowOutput`).

Pure of any scheduling: nothing here sees the batch, the KV cache or the adapters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens, as OpenAI clients name it: greedy at temperature 0 (the default);
    else softmax(logits / temperature) restricted to the top_p nucleus. `stop` strings end
    the text before them; `seed` makes sampling repeatable; no end-of-sequence token before
    `min_new_tokens` (vLLM's min_tokens; benchmarks use it for answers of equal length)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def hf_kwargs(self) -> dict:
        """The same choice as `transformers.generate` arguments."""
        lengths = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens}
        if self.greedy:
            return {**lengths, "do_sample": False}
        return {
            **lengths,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,
        }


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs (V,) -> probs restricted to the smallest set whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already enough
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_p / sorted_p.sum())


def next_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """logits (V,) float32 -> a token id."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


_SLACK = 8  # characters re-searched beyond a stop's reach, should decoding shift a little


@dataclass(frozen=True)
class Step:
    """What one token added: the newly visible text, the token, its logprobs entry (when
    asked for) and the finish reason once the row is done ("stop" or "length")."""

    text: str
    token: int
    logprobs: tuple[dict, ...]
    finish: str | None


class RowOutput:
    """Sampling state and visible text of one row; `push(logits)` per generated token."""

    def __init__(self, tokenizer, sampling: Sampling, eos: set[int], logprobs: int | None):
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.eos = eos
        self.top_logprobs = logprobs
        self.ids: list[int] = []
        self.sent = ""  # text already made visible
        self.generator = torch.Generator()
        seed = sampling.seed
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        # a stop string can only start in the last (its length - 1) characters of the old
        # text: the search for one looks no further back (long texts, long stops)
        self._reach = max((len(s) for s in sampling.stop), default=0)
        self._scanned = 0  # characters of the text already searched for stops

    def push(self, logits: Tensor) -> Step:
        """logits (V,) float32 of this row's next position -> the Step it makes."""
        s = self.sampling
        if len(self.ids) < s.min_new_tokens and self.eos:
            logits = logits.clone()
            logits[list(self.eos)] = float("-inf")
        token = next_token(logits, s.temperature, s.top_p, self.generator)
        self.ids.append(token)
        text, stopped = self._text()
        finish = (
            "stop"
            if stopped or token in self.eos
            else "length"
            if len(self.ids) >= s.max_new_tokens
            else None
        )
        visible = text if finish else settled(text, s.stop)
        delta = visible[len(self.sent) :] if visible.startswith(self.sent) else ""
        self.sent += delta
        return Step(
            delta, token, token_logprobs(self.tokenizer, logits, token, self.top_logprobs), finish
        )

    def _text(self) -> tuple[str, bool]:
        """The decoded text so far, cut before the first stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not self.sampling.stop:
            return text, False
        start = max(0, self._scanned - self._reach - _SLACK)
        head, (tail, stopped) = text[:start], cut_at_stop(text[start:], self.sampling.stop)
        self._scanned = len(text.rstrip("\ufffd"))  # an incomplete character may change
        return head + tail, stopped


def settled(text: str, stop: tuple[str, ...]) -> str:
    """What can be shown before the row ends: not a trailing incomplete character, and
    not a tail that may still become a stop string."""
    text = text.rstrip("\ufffd")
    return text[: len(text) - max((_held(text, s) for s in stop), default=0)]


def _held(text: str, stop: str) -> int:
    """The longest proper prefix of `stop` that `text` ends with (its length, or 0)."""
    longest = min(len(stop) - 1, len(text))
    return next((k for k in range(longest, 0, -1) if text.endswith(stop[:k])), 0)


def token_logprobs(tokenizer, logits: Tensor, token: int, top: int | None) -> tuple[dict, ...]:
    """The chosen token's log-probability and the `top` most likely alternatives."""
    if top is None:
        return ()
    return (_entry(tokenizer, torch.log_softmax(logits, dim=-1), token, top),)


def prompt_logprobs(tokenizer, logits: Tensor, targets: Sequence[int], top: int) -> list[dict]:
    """logits (T, V) at T prompt positions, targets (T,) the prompt tokens they predict ->
    per position the target's log-probability and the `top` likeliest alternatives (the
    entries `token_logprobs` makes for a generated token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [_entry(tokenizer, row, t, top) for row, t in zip(logp, targets, strict=True)]


def _entry(tokenizer, logp: Tensor, token: int, top: int) -> dict:
    values, ids = logp.topk(top) if top else (logp[:0], logp[:0].long())
    alternatives = [scored(tokenizer, int(i), float(v)) for v, i in zip(values, ids, strict=True)]
    return scored(tokenizer, token, float(logp[token])) | {"top_logprobs": alternatives}


def scored(tokenizer, token: int, logprob: float) -> dict:
    """One token's logprob entry as OpenAI gives it: its text, logprob and bytes."""
    return {
        "token": tokenizer.decode([token]),
        "logprob": logprob,
        "bytes": token_bytes(tokenizer, token),
    }


@cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE (GPT-2's, SmolLM2's, Llama 3's) spells each byte as one printable
    character: the printable Latin-1 bytes as themselves, the others as 256, 257, ... in
    byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    others = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def token_bytes(tokenizer, token: int) -> list[int]:
    """A token's own bytes, as OpenAI's logprobs give them: a token that is part of a
    character decodes to U+FFFD alone, and its bytes say which part. Other tokenizers than
    byte-level BPE give the bytes of the token's text."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":  # tokenizers' class, by name: not a dependency
        table, piece = _byte_of_char(), tokenizer.convert_ids_to_tokens(token)
        if piece and all(c in table for c in piece):
            return [table[c] for c in piece]
    return list(tokenizer.decode([token]).encode())
