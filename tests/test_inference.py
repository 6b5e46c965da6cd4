"""Option scoring: prompts run once and their options continue from the cache; the result
must equal scoring every (prompt, option) as one unpadded sequence on its own."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_model, char_tokenizer

from lorahub import inference
from lorahub.applied import attached
from lorahub.inference import option_logprobs
from lorahub.models import BaseModel
from registry import BaseModelInfo, LoraAdapter, LoraModule

PROMPTS = ["What is 8 plus 13?", "Pick a color", "Is it raining?"]
OPTIONS = [["21", "twenty-one", "9"], ["red", "a deep blue"], ["yes", "no", "", "maybe so"]]


def adapters(model: torch.nn.Module, family: str, n: int = 2) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        mods = {}
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in FAMILIES[family][1][:2]:
                d_in, d_out = (
                    (m.weight.shape[0], m.weight.shape[1])
                    if family == "gpt2"
                    else (m.in_features, m.out_features)
                )
                mods[name] = LoraModule(
                    torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g), 4.0
                )
        out.append(LoraAdapter(mods, base_model=BaseModelInfo(family)))
    return out


def alone(base: BaseModel, prompt: str, option: str) -> float:
    """The oracle: one (prompt, option) sequence, no padding, no cache."""
    tok = base.tokenizer
    if not option:
        return 0.0
    if base.is_seq2seq:
        enc = tok([prompt], return_tensors="pt")
        labels = tok([option], return_tensors="pt")["input_ids"]
        logits = base.model(**enc, labels=labels).logits[0]
        return float(
            torch.log_softmax(logits.double(), -1)[range(labels.shape[1]), labels[0]].sum()
        )
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(option, add_special_tokens=False)["input_ids"]
    logits = base.model(input_ids=torch.tensor([p + a])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[len(p) + t - 1, tok_id] for t, tok_id in enumerate(a)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.inference_mode()
def test_cached_option_scores_equal_each_option_alone(family: str) -> None:
    model = build_model(family)
    base = BaseModel(family, model, char_tokenizer())
    got = option_logprobs(base, PROMPTS, OPTIONS, batch_size=2)
    for i, p in enumerate(PROMPTS):
        assert got[i] == pytest.approx([alone(base, p, o) for o in OPTIONS[i]], abs=1e-4)
    gates = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    with attached(model, adapters(model, family), ["a", "b"], gates) as applied:
        routed = option_logprobs(base, PROMPTS, OPTIONS, applied, batch_size=2)
        for i, p in enumerate(PROMPTS):
            with applied.rows(torch.tensor([i])):
                want = [alone(base, p, o) for o in OPTIONS[i]]
            assert routed[i] == pytest.approx(want, rel=1e-4, abs=1e-4)  # float32 sums
    assert routed != got


@pytest.mark.parametrize("family", sorted(f for f, v in FAMILIES.items() if v[2] == "CAUSAL_LM"))
@torch.inference_mode()
def test_options_continued_a_row_a_pass_score_as_in_one_pass(family: str, monkeypatch) -> None:
    """Past its budget, a continuation runs in several passes (each on a copy of the prompt
    cache): the same scores, composed rows included."""
    model = build_model(family)
    base = BaseModel(family, model, char_tokenizer())
    gates = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    with attached(model, adapters(model, family), ["a", "b"], gates) as applied:
        one_pass = option_logprobs(base, PROMPTS, OPTIONS, applied, batch_size=3)
        monkeypatch.setattr(inference, "CACHED_POSITIONS", 1)  # one row a pass
        assert inference._continuation_rows(20, 3) == 1
        passes = option_logprobs(base, PROMPTS, OPTIONS, applied, batch_size=3)
    for got, want in zip(passes, one_pass, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
