"""Batched generation and option scoring, every row with its own composition.

`applied` (lorahub.applied.Applied) says what each prompt's row gets; every chunk of rows
runs in one batched forward pass under `applied.rows(chunk)`.
"""

from __future__ import annotations

import copy
import re
import string
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from lorahub.applied import NOTHING, Applied
from lorahub.decoding import RowOutput, Sampling, cut_at_stop
from lorahub.models import BaseModel, cache_arg, output_cache


@torch.inference_mode()
def generate(
    base: BaseModel,
    prompts: Sequence[str],
    applied: Applied = NOTHING,
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    max_prompt_tokens: int = 1024,
    progress: bool = False,
    formatted: bool = False,
) -> list[str]:
    """Answers to `prompts`, `batch_size` rows a pass; each prompt in the base model's
    chat template unless already `formatted`."""
    tok = base.tokenizer
    texts = list(prompts) if formatted else [base.format_prompt(p) for p in prompts]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    if max(lengths) > max_prompt_tokens:
        warnings.warn(
            f"prompts longer than {max_prompt_tokens} tokens (up to {max(lengths)}) are truncated",
            stacklevel=2,
        )
    out = [""] * len(texts)
    for rows in tqdm(by_length(lengths, batch_size), disable=not progress, desc="generate"):
        enc = tok(
            [texts[i] for i in rows],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_prompt_tokens,
            add_special_tokens=base.is_seq2seq,
        )
        with applied.rows(rows):
            answers = (_generate_seq2seq if base.is_seq2seq else decode)(base, enc, sampling)
        for i, text in zip(rows.tolist(), answers, strict=True):
            out[i] = text.strip()
    return out


def decode(base: BaseModel, enc: dict[str, Tensor], sampling: Sampling) -> list[str]:
    """Left-padded prompts (enc: input_ids, attention_mask (b, t)) -> each row's text, token
    by token through `RowOutput`: the server's engine draws, stops and holds back end of
    sequence exactly so, so a seeded sample here equals the server's."""
    outs = [RowOutput(base.tokenizer, sampling, base.eos_ids, None) for _ in enc["input_ids"]]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    live = list(range(len(outs)))
    while live:
        out = base.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_arg(base.model, cache),
        )
        cache, logits = output_cache(out), out.logits[:, -1].float()
        live = [i for i in live if outs[i].push(logits[i]).finish is None]
        last = [o.ids[-1] for o in outs]  # finished rows repeat their last token, unread
        ids = torch.tensor(last)[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        positions = mask.sum(1, keepdim=True) - 1
    return [o.sent for o in outs]


def _generate_seq2seq(base: BaseModel, enc: dict[str, Tensor], sampling: Sampling) -> list[str]:
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    tok = base.tokenizer
    ids = base.model.generate(**enc, **sampling.hf_kwargs(), pad_token_id=tok.pad_token_id)
    answers = tok.batch_decode(ids, skip_special_tokens=True)
    return [cut_at_stop(text, sampling.stop)[0] for text in answers]


def by_length(lengths: Sequence[int], batch_size: int) -> list[Tensor]:
    """Row indices in batches of similar length: a mixed stream (a 10-token sum beside a
    300-token review) otherwise pads every short prompt to its batch's longest."""
    order = torch.tensor(sorted(range(len(lengths)), key=lengths.__getitem__), dtype=torch.long)
    return list(order.split(batch_size))


@torch.inference_mode()
def option_logprobs(
    base: BaseModel,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    applied: Applied = NOTHING,
    batch_size: int = 16,
    formatted: bool = False,
) -> list[list[float]]:
    """Sum of token log-probabilities of each option after its prompt.

    Each prompt runs once (`batch_size` prompts a pass); its options then continue from the
    prompt's cached keys and values (seq2seq: its encoder states), so a question with m
    options costs one prompt pass and m short continuations instead of m full passes."""
    if not formatted and not base.is_seq2seq:
        prompts = [base.format_prompt(p) for p in prompts]
    score = _score_seq2seq if base.is_seq2seq else _score_causal
    out: list[list[float]] = [[] for _ in prompts]
    for rows in by_length([len(p) for p in prompts], batch_size):

        def context(local: Tensor, rows: Tensor = rows):
            return applied.rows(rows[local])

        scores = score(base, [prompts[i] for i in rows], [options[i] for i in rows], context)
        for i, s in zip(rows.tolist(), scores, strict=True):
            out[i] = s
    return out


def _regroup(flat: list[float], options: Sequence[Sequence[str]]) -> list[list[float]]:
    out, k = [], 0
    for opts in options:
        out.append(flat[k : k + len(opts)])
        k += len(opts)
    return out


def _score_causal(base: BaseModel, prompts: list[str], options, context) -> list[list[float]]:
    tok = base.tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pairs = [
        (i, tok(o, add_special_tokens=False)["input_ids"])
        for i, opts in enumerate(options)
        for o in opts
    ]
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with context(torch.arange(len(prompts))):
        out = base.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (P, V): each option's 1st token
    owner = torch.tensor([i for i, _ in pairs])
    length = max(1, *(len(a) for _, a in pairs))
    labels = torch.full((len(pairs), length), -100)
    for r, (_, a) in enumerate(pairs):  # right padding: pads come after, never attended to
        labels[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    cache, rows = output_cache(out), _continuation_rows(width, length)
    picked = []
    for start in range(0, len(pairs), rows):
        part = slice(start, start + rows)
        part_cache = cache if rows >= len(pairs) else copy.deepcopy(cache)
        part_cache.batch_select_indices(owner[part])  # one cached prompt per row
        with context(owner[part]):
            picked.append(
                _continuation_logprobs(base, mask, part_cache, owner[part], labels[part], first)
            )
    return _regroup(torch.cat(picked).tolist(), options)


# One continuation pass holds a copy of its prompt's keys and values per (prompt, option)
# row, and log-probabilities over the vocabulary per option token: 24 prompts of 100 options
# each took 24 GB in one pass. A pass takes at most CACHED_POSITIONS prompt positions and
# SCORED_TOKENS option tokens over all its rows (at least one row).
CACHED_POSITIONS = 1 << 16
SCORED_TOKENS = 1 << 12


def _continuation_rows(prompt_width: int, option_length: int) -> int:
    return max(1, min(CACHED_POSITIONS // prompt_width, SCORED_TOKENS // option_length))


def _continuation_logprobs(
    base: BaseModel, mask: Tensor, cache: object, owner: Tensor, labels: Tensor, first: Tensor
) -> Tensor:
    """Each row's option (labels, -100 after it) continued from its prompt's cache ->
    (rows,) summed log-probabilities; `first` (prompts, V) scores each option's first token."""
    keep = labels != -100
    cont = labels.clamp(min=0)
    logits = base.model(
        input_ids=cont,
        attention_mask=torch.cat([mask[owner], keep.long()], dim=1),
        position_ids=mask.sum(1)[owner, None] + torch.arange(labels.shape[1]),
        **cache_arg(base.model, cache),
    ).logits
    logp = torch.cat([first[owner, None], torch.log_softmax(logits[:, :-1].float(), dim=-1)], 1)
    return (logp.gather(-1, cont[..., None])[..., 0] * keep).sum(-1)


def _score_seq2seq(base: BaseModel, prompts: list[str], options, context) -> list[list[float]]:
    tok = base.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    with context(torch.arange(len(prompts))):
        states = base.model.get_encoder()(**enc).last_hidden_state
    owner = torch.tensor([i for i, opts in enumerate(options) for _ in opts])
    answers = [tok(o)["input_ids"] for opts in options for o in opts]
    labels = torch.full((len(answers), max(1, *map(len, answers))), -100)
    for r, a in enumerate(answers):  # right padding: the decoder is causal
        labels[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    with context(owner):
        logits = base.model(
            encoder_outputs=(states[owner],),
            attention_mask=enc["attention_mask"][owner],
            labels=labels,
        ).logits
    return _regroup(_sum_logprobs(logits, labels), options)


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
    applied: Applied = NOTHING,
    max_new_tokens: int = 32,
) -> tuple[float, list[bool]]:
    """Exact match (generative) or option log-likelihood accuracy (multiple choice)."""
    prompts = [ex.input for ex in examples]
    if all(ex.answer is not None for ex in examples):
        scores = option_logprobs(base, prompts, [ex.options for ex in examples], applied)
        right = [
            max(range(len(s)), key=s.__getitem__) == ex.answer
            for s, ex in zip(scores, examples, strict=True)
        ]
    else:
        answers = generate(base, prompts, applied, Sampling(max_new_tokens))
        right = [exact_match(a, ex.targets) for a, ex in zip(answers, examples, strict=True)]
    return sum(right) / max(1, len(right)), right
