"""Batched greedy generation and option scoring, optionally with per-row adapter gates.

`gates` is (len(prompts), n) over the adapters of `composer`; every chunk of rows runs in
one batched forward pass with its own gates (see composition.Composer).
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor
from tqdm import tqdm

from composition import Composer, TokenGate
from lorahub.models import BaseModel


def _context(
    composer: Composer | None,
    gates: Tensor | None,
    rows: slice | Tensor,
    mode: str,
    token_gate: TokenGate | None = None,
):
    """The composition for these rows: per-row gates, a per-token gate, or nothing."""
    if composer is None:
        return nullcontext()
    if token_gate is not None:
        return composer.compose(token_gate=token_gate)
    return composer.compose(gates[rows], mode=mode) if gates is not None else nullcontext()


@torch.inference_mode()
def generate(
    base: BaseModel,
    prompts: Sequence[str],
    composer: Composer | None = None,
    gates: Tensor | None = None,
    mode: str = "mixture",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_prompt_tokens: int = 1024,
    progress: bool = False,
    token_gate: TokenGate | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (chat template applied), `batch_size` rows a pass."""
    tok = base.tokenizer
    texts = [base.format_prompt(p) for p in prompts]
    longest = max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    if longest > max_prompt_tokens:
        warnings.warn(
            f"prompts longer than {max_prompt_tokens} tokens (up to {longest}) are truncated",
            stacklevel=2,
        )
    out: list[str] = []
    for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="generate"):
        rows = slice(start, start + batch_size)
        enc = tok(
            texts[rows],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_prompt_tokens,
            add_special_tokens=base.is_seq2seq,
        )
        with _context(composer, gates, rows, mode, token_gate):
            ids = base.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        new = ids if base.is_seq2seq else ids[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


@torch.inference_mode()
def option_logprobs(
    base: BaseModel,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    composer: Composer | None = None,
    gates: Tensor | None = None,
    mode: str = "mixture",
    batch_size: int = 16,
    token_gate: TokenGate | None = None,
) -> list[list[float]]:
    """Sum of token log-probabilities of each option after its prompt."""
    pairs = [(i, o) for i, opts in enumerate(options) for o in opts]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = torch.tensor([i for i, _ in chunk])
        with _context(composer, gates, rows, mode, token_gate):
            scores += _score(base, [prompts[i] for i, _ in chunk], [o for _, o in chunk])
    out, k = [], 0
    for opts in options:
        out.append(scores[k : k + len(opts)])
        k += len(opts)
    return out


def _score(base: BaseModel, prompts: list[str], answers: list[str]) -> list[float]:
    tok = base.tokenizer
    if base.is_seq2seq:
        enc = tok(prompts, return_tensors="pt", padding=True)
        labels = tok(answers, return_tensors="pt", padding=True)["input_ids"]
        labels[labels == tok.pad_token_id] = -100
        logits = base.model(**enc, labels=labels).logits
        return _sum_logprobs(logits, labels)
    seqs, labels = [], []
    for p, a in zip(prompts, answers, strict=True):
        p_ids = tok(base.format_prompt(p), add_special_tokens=False)["input_ids"]
        a_ids = tok(a, add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):  # left padding
        ids[i, width - len(s) :], lab[i, width - len(s) :], mask[i, width - len(s) :] = (
            torch.tensor(s),
            torch.tensor(y),
            1,
        )
    logits = base.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return _sum_logprobs(logits, lab[:, 1:])


def _sum_logprobs(logits: Tensor, labels: Tensor) -> list[float]:
    """logits (b, t, V), labels (b, t) with -100 to ignore -> (b,) summed log-probs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(-1).tolist()


_PUNCT = re.compile(
    f"^[{re.escape(string.punctuation)}\\s]+|[{re.escape(string.punctuation)}\\s]+$"
)


def normalize(text: str) -> str:
    """First line, lower case, surrounding punctuation and spaces removed."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _PUNCT.sub("", first.lower())


def exact_match(prediction: str, targets: Sequence[str]) -> bool:
    return normalize(prediction) in {normalize(t) for t in targets}


def accuracy(
    base: BaseModel,
    examples: Sequence,
    composer: Composer | None = None,
    gates: Tensor | None = None,
    mode: str = "mixture",
    max_new_tokens: int = 32,
) -> tuple[float, list[bool]]:
    """Exact match (generative) or option log-likelihood accuracy (multiple choice)."""
    prompts = [ex.input for ex in examples]
    if all(ex.answer is not None for ex in examples):
        scores = option_logprobs(
            base, prompts, [ex.options for ex in examples], composer, gates, mode
        )
        right = [
            max(range(len(s)), key=s.__getitem__) == ex.answer
            for s, ex in zip(scores, examples, strict=True)
        ]
    else:
        answers = generate(base, prompts, composer, gates, mode, max_new_tokens=max_new_tokens)
        right = [exact_match(a, ex.targets) for a, ex in zip(answers, examples, strict=True)]
    return sum(right) / max(1, len(right)), right
