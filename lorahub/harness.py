"""The lm-evaluation-harness model `loraplex`: every request routed on its context alone
and answered under that composition, in batched forward passes.

    loraplex lm-eval --model loraplex \\
        --model_args registry=my-registry,router=task,compose=mixture,k=3 --tasks ...

The harness (lm-eval, the `harness` extra) finds models only in its own table, filled when
a model's module is imported; `main` imports this one, then runs the harness's own CLI
with every flag unchanged. From Python: `lm_eval.simple_evaluate(model=LoraplexLM(...))`.

Tokenization is the harness's (`TemplateLM`: a context and its continuation encoded
together, then split), so scores equal the harness's `hf` model on the same weights;
prompts are scored as the task gives them (the chat template only with the harness's
`--apply_chat_template`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor

from composition import Mode
from lorahub.decoding import Sampling
from lorahub.hub import COMPOSE, Compose, Hub, compose_choice, groups
from lorahub.inference import by_length, decode
from lorahub.models import DEFAULT_MODEL
from lorahub.tasks import Task
from router import DEFAULT_ROUTER, Routing

T = TypeVar("T")
# the harness's `hf` default when neither the config nor the tokenizer names a context
_DEFAULT_MAX_LENGTH = 2048
_MAX_GEN_TOKS = 256  # the harness's `hf` default


def _score(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad: int):
    """(context ids, continuation ids) pairs, already cut to the model's window -> per pair
    (sum of the continuation's log-probabilities, whether greedy decoding gives it).
    One right-padded forward: pads come after each row, never attended to."""
    rows = [(ctx + cont)[:-1] for ctx, cont in pairs]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for i, (row, (_, cont)) in enumerate(zip(rows, pairs, strict=True)):
        here = logp[i, len(row) - len(cont) : len(row)]  # (len(cont), V)
        want = torch.tensor(cont)
        picked = here.gather(-1, want[:, None])[:, 0]
        out.append((float(picked.sum()), bool((here.argmax(-1) == want).all())))
    return out


@register_model("loraplex")
class LoraplexLM(TemplateLM):
    """model_args: `base_model` (a built-in name, folder or Hub id), `registry` (folder),
    `router` (task, retriever, classifier, arrow), `compose` (mixture, fusion, selection,
    none), `k` (adapters per context), `adapter` (one named adapter for every request,
    instead of routing), `batch_size`, `max_length`, `max_gen_toks`."""

    def __init__(
        self,
        base_model: str = DEFAULT_MODEL,
        registry: str | None = None,
        router: str = DEFAULT_ROUTER,
        compose: str = Compose.mixture,
        k: int = 3,
        adapter: str | None = None,
        batch_size: int | str | None = 16,  # "auto" (the harness's probe) means 16
        max_batch_size: int | None = None,  # passed by the harness; batches are batch_size
        max_length: int | None = None,
        max_gen_toks: int = _MAX_GEN_TOKS,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            raise ValueError(f"the loraplex model runs on the CPU; got device={device!r}")
        self.compose = compose_choice(compose)
        if adapter and self.compose == Compose.none:
            raise ValueError("adapter= names an adapter but compose=none means the base alone")
        self.hub = Hub.open(registry, base_model=base_model, router=router)
        if self.hub.base.is_seq2seq:
            raise ValueError(f"{base_model!r} is a seq2seq model; the harness model is causal")
        if adapter:
            self.hub.usable(adapter)  # fails early, naming what is wrong
        self.adapter = adapter
        self.k = int(k)
        self.tokenizer = self.hub.base.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self._said: dict[str, str] = {}  # templated context -> its last user turn

    # -- what the harness asks of a TemplateLM ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        config = self.hub.base.model.config
        return resolve_max_length(config, self.tokenizer, default=_DEFAULT_MAX_LENGTH)

    @property
    def tokenizer_name(self) -> str:
        return self.hub.base.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        """As the harness's `hf` model encodes: the tokenizer's special tokens unless the
        string already starts with the prefix token."""
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The templated context; its last user turn is what gets routed (routers know
        prompts, not chat markup: routed on the markup, the task router abstains)."""
        rendered = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        users = [turn["content"] for turn in chat_history if turn.get("role") == "user"]
        if users:
            self._said[rendered] = users[-1]
        return rendered

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    # -- routing and composing ----------------------------------------------------------------
    def routings(self, contexts: Sequence[str]) -> list[Routing]:
        """One routing per context: the named adapter, or the router's choice."""
        if self.adapter:
            return [Routing((self.adapter,), (1.0,))] * len(contexts)
        return self.hub.route([self._said.get(c, c) for c in contexts], self.k, self.compose)

    def _composed(
        self, keys: Sequence[str], lengths: Sequence[int], step: Callable[[list[int]], list[T]]
    ) -> list[T]:
        """`step(rows)` per batch of similar `lengths`, under the composition of each row's
        routing key (its context): requests that share a context share one routing, so
        every option of a question is scored under the same adapters."""
        unique = list(dict.fromkeys(keys))
        routings = self.routings(unique)
        slot = {key: i for i, key in enumerate(unique)}
        _, mode = COMPOSE[self.compose]
        out: list[Any] = [None] * len(keys)
        for group in groups(routings):
            local = {u: j for j, u in enumerate(group)}
            rows = [i for i, key in enumerate(keys) if slot[key] in local]
            with self.hub.composed([routings[u] for u in group], mode or Mode.mixture) as applied:
                for batch in by_length([lengths[i] for i in rows], self.batch_size):
                    picked = [rows[j] for j in batch.tolist()]
                    at = torch.tensor([local[slot[keys[i]]] for i in picked])
                    with applied.rows(at):
                        values = step(picked)
                    for i, value in zip(picked, values, strict=True):
                        out[i] = value
        return out

    # -- the three request types --------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **_
    ) -> list[tuple[float, bool]]:
        window = self.max_length + 1
        pairs = [_cut(ctx, cont, window) for _, ctx, cont in requests]
        keys = [context for (context, _), _, _ in requests]

        def step(rows: list[int]) -> list[tuple[float, bool]]:
            with torch.inference_mode():
                return _score(self.hub.base.model, [pairs[i] for i in rows], self._pad)

        return self._composed(keys, [sum(map(len, p)) for p in pairs], step)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document in the harness's disjoint windows, routed on the document."""
        docs = [req.args[0] for req in requests]
        windows = [
            (doc, make_disjoint_window(w))
            for doc in docs
            for w in get_rolling_token_windows(
                self.tok_encode(doc), self.prefix_token_id, self.max_length, context_len=1
            )
        ]
        scored = self._loglikelihood_tokens([((doc, ""), *w) for doc, w in windows])
        totals = dict.fromkeys(docs, 0.0)
        for (doc, _), (logprob, _) in zip(windows, scored, strict=True):
            totals[doc] += logprob
        return [totals[doc] for doc in docs]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) until a stop string, end of sequence or
        `max_gen_toks`; requests with the same generation settings share batches."""
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True), []).append(i)
        out: list[str] = [""] * len(requests)
        for rows in by_kwargs.values():
            contexts = [requests[i].args[0] for i in rows]
            for i, text in zip(
                rows, self._generate(contexts, requests[rows[0]].args[1]), strict=True
            ):
                out[i] = text
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text)
        temperature = float(kwargs.pop("temperature", 0.0))
        sampling = Sampling(
            max_new_tokens=kwargs.pop("max_gen_toks"),
            temperature=temperature if kwargs.pop("do_sample") else 0.0,
            top_p=float(kwargs.pop("top_p", 1.0)),
            stop=tuple(s for s in until if s),
            seed=kwargs.pop("seed", None),
        )
        if kwargs:
            raise ValueError(f"generation settings the loraplex model does not take: {kwargs}")
        keep = self.max_length - sampling.max_new_tokens
        encoded = [self.tok_encode(c)[-keep:] for c in contexts]

        def step(rows: list[int]) -> list[str]:
            with torch.inference_mode():
                return decode(
                    self.hub.base, self._left_padded([encoded[i] for i in rows]), sampling
                )

        return self._composed(contexts, list(map(len, encoded)), step)

    # -- small pieces ---------------------------------------------------------------------------
    @property
    def _pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eot_token_id

    @property
    def _eos_text(self) -> str:
        return self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)

    def _left_padded(self, rows: list[list[int]]) -> dict[str, Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self._pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


def _cut(context: list[int], continuation: list[int], window: int) -> tuple[list[int], list[int]]:
    """The last `window` tokens of context + continuation, split again (as the harness's
    `hf` model truncates: the context loses its start; at least one token stays to
    condition on)."""
    whole = (context + continuation)[-window:]
    n = min(len(continuation), len(whole) - 1)
    return whole[: len(whole) - n], whole[len(whole) - n :]


def main(argv: list[str]) -> int:
    """`loraplex lm-eval ARGS`: the harness's own CLI with the `loraplex` model known."""
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


# exact match as `lorahub.inference.normalize` reads an answer: case and surrounding
# punctuation or spaces ignored (the harness's generation stops at the first line)
_PUNCT = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~\s]"""
NORMALIZE = {"ignore_case": True, "regexes_to_ignore": [f"^{_PUNCT}+", f"{_PUNCT}+$"]}


def write_task(folder: Path, task: Task, max_gen_toks: int = 8) -> None:
    """`task` (its examples as they are: pass a split) as a harness task: a YAML config
    and a JSONL file beside it in `folder`, scored as `loraplex eval` scores it (multiple
    choice by accuracy; generation to the first newline, exact match ignoring case and
    surrounding punctuation or spaces)."""
    data = folder / f"{task.name}.jsonl"
    mc = task.examples[0].answer is not None
    with data.open("w") as f:
        for ex in task.examples:
            row = {"input": ex.input}
            row |= (
                {"options": list(ex.options), "answer": ex.answer} if mc else {"target": ex.target}
            )
            f.write(json.dumps(row) + "\n")
    config = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "input",
        "target_delimiter": "",
    }
    if mc:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "options",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc"}],
        }
    else:
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "target",
            "generation_kwargs": {
                "until": ["\n"],
                "max_gen_toks": max_gen_toks,
                "do_sample": False,
            },
            "metric_list": [{"metric": "exact_match", **NORMALIZE}],
        }
    # JSON is YAML
    (folder / f"{task.name}.yaml").write_text(json.dumps(config, indent=1))
