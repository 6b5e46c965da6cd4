"""LoraHub learning: population scoring against one-candidate-at-a-time scoring and HF's own
loss, element-wise composition against the reference package, and a search that improves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_model, char_tokenizer, make_peft_model

from composition import Composer, Mode, merge
from lorahub.learn import LoraHubConfig, PopulationScorer, learn_weights
from lorahub.models import BaseModel
from lorahub.tasks import Example
from lorahub.train import TrainConfig, make_batch, train_lora
from registry import load_source

EXAMPLES = [
    Example("abc", targets=("cba",)),
    Example("hello", targets=("olleh",)),
    Example("moon", targets=("noom",)),
    Example("xy", targets=("yx",)),
]


@pytest.fixture(scope="module", params=["llama", "t5"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"learn-{family}")
    adapters = []
    for seed in (1, 2, 3):
        make_peft_model(family, seed=seed, r=4, alpha=8).save_pretrained(tmp / f"a{seed}")
        adapters.append(load_source(str(tmp / f"a{seed}")))
    padding = "left" if family != "t5" else "right"
    return BaseModel(f"tiny-{family}", build_model(family), char_tokenizer(padding)), adapters


@pytest.mark.parametrize("mode", list(Mode))
def test_population_scoring_equals_each_candidate_alone_and_hf_loss(setup, mode) -> None:
    base, adapters = setup
    W = torch.tensor([[0.5, -0.3, 1.2], [0.0, 0.0, 0.0], [-1.5, 1.5, 0.7], [0.2, 0.2, 0.2]])
    scorer = PopulationScorer(base, adapters, EXAMPLES, mode, max_rows=5)
    try:
        together = scorer.losses(W)
        alone = torch.stack([scorer.losses(W[i : i + 1])[0] for i in range(len(W))])
    finally:
        scorer.close()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    method = "fusion" if mode == Mode.fusion else "linear"
    batch = make_batch(base, EXAMPLES, 512)
    for i, w in enumerate(W.tolist()):  # the oracle: merge, attach alone, HF's mean token loss
        merged = merge(adapters, w, method).adapter
        model = copy.deepcopy(base.model)
        composer = Composer.attach(model, [merged])
        with torch.no_grad(), composer.compose(torch.ones(len(EXAMPLES), 1), path="dense"):
            expected = model(**batch).loss
        assert together[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_elementwise_composition_equals_the_reference_package(
    reference_lorahub, tmp_path: Path
) -> None:
    from peft import get_peft_model_state_dict

    weights = [0.7, -0.4, 1.1]
    cache = {}
    for seed in (1, 2, 3):
        cache[f"a{seed}"] = get_peft_model_state_dict(
            make_peft_model("llama", seed=seed, r=4, alpha=8)
        )
    reference = reference_lorahub.get_final_weights(weights, list(cache), cache)
    ours_adapters = []
    for seed in (1, 2, 3):
        make_peft_model("llama", seed=seed, r=4, alpha=8).save_pretrained(tmp_path / f"a{seed}")
        ours_adapters.append(load_source(str(tmp_path / f"a{seed}")))
    merged = merge(ours_adapters, weights, "lorahub").adapter
    for key, tensor in reference.items():
        module, ab = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        ours = (
            merged.modules[module].lora_A if ab.startswith("A") else merged.modules[module].lora_B
        )
        torch.testing.assert_close(ours, tensor, atol=1e-6, rtol=1e-6)
    assert len(reference) == 2 * len(merged.modules)
    # with equal alphas, the fusion LoraHub returns applies the reference's update exactly
    fused = merge(ours_adapters, weights, "fusion").adapter
    for name, m in merged.modules.items():
        expected = merged.scaling(name) * m.lora_B.double() @ m.lora_A.double()
        got = fused.scaling(name) * fused.modules[name].lora_B.double()
        torch.testing.assert_close(got @ fused.modules[name].lora_A.double(), expected)


def test_returned_adapter_is_the_scored_composition_with_mixed_alphas_and_ranks(
    tmp_path: Path,
) -> None:
    """The search scores fusion over adapters of ranks 2/4/6 and alphas 4/16/3; the adapter
    it returns, attached alone, gives exactly the loss it reported."""
    base = BaseModel("tiny-llama", build_model("llama"), char_tokenizer("left"))
    adapters = []
    for seed, (r, alpha) in enumerate([(2, 4), (4, 16), (6, 3)], start=1):
        make_peft_model("llama", seed=seed, r=r, alpha=alpha).save_pretrained(tmp_path / f"{seed}")
        adapters.append(load_source(str(tmp_path / f"{seed}")))
    for mode in Mode:
        cfg = LoraHubConfig(steps=16, population=8, mode=mode, patience=0)
        result = learn_weights(base, adapters, EXAMPLES, cfg, progress=False)
        assert any(w != 0 for w in result.weights), "the search kept the start point"
        composer = Composer.attach(base.model, [result.adapter])
        batch = make_batch(base, EXAMPLES, 512)
        with torch.no_grad(), composer.compose(torch.ones(len(EXAMPLES), 1), path="dense"):
            loss = _mean_token_loss(base.model(**batch).logits, batch["labels"])
        composer.detach()
        assert loss == pytest.approx(result.loss, abs=1e-5), mode


def _mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy over answer tokens, averaged over all of them (the scorer's loss)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=-100
    ).item()


def test_learning_finds_weights_better_than_none() -> None:
    from conftest import tiny_llama

    torch.manual_seed(0)
    base = BaseModel("tiny", tiny_llama(initializer_range=0.3).eval(), char_tokenizer("right"))
    task = train_lora(
        base, EXAMPLES * 4, TrainConfig(rank=4, steps=30, batch_size=4, lr=5e-3), progress=False
    ).adapter
    noise = [copy.deepcopy(task) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    for a in noise:
        for m in a.modules.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * m.lora_B.std())
    adapters = [noise[0], task, noise[1]]
    scorer = PopulationScorer(base, adapters, EXAMPLES)
    zero = scorer.losses(torch.zeros(1, 3)).item()
    scorer.close()
    for mode in (Mode.fusion, Mode.mixture):
        cfg = LoraHubConfig(steps=40, population=8, mode=mode)
        result = learn_weights(base, adapters, EXAMPLES, cfg, progress=False)
        assert result.objective < 0.8 * zero, mode
        assert result.objective == min(result.history) and len(result.history) <= 40
    # mixture is linear in w, so the task's own adapter must get a positive weight
    assert result.weights[1] > 0


def test_learning_never_returns_worse_than_no_composition(setup) -> None:
    """Candidates confined to |w| <= 1e-6 cannot beat w = 0 by `tol`: the start point,
    scored outside the optimizer, is what comes back (exact zeros, its objective)."""
    base, adapters = setup
    scorer = PopulationScorer(base, adapters, EXAMPLES)
    zero = scorer.losses(torch.zeros(1, len(adapters))).item()
    scorer.close()
    cfg = LoraHubConfig(steps=8, bound=1e-6)
    result = learn_weights(base, adapters, EXAMPLES, cfg, progress=False)
    assert len(result.history) == 8  # the optimizer ran its budget
    assert result.weights == [0.0] * len(adapters)
    assert result.objective == pytest.approx(zero, abs=1e-7)


def test_learning_starts_from_the_best_start_and_never_returns_worse(setup) -> None:
    """With a good start (uniform, the router's weights) among w = 0 and a bad one, the
    search starts there: the result scores at most that start's objective, even when the
    optimizer's moves are tiny."""
    base, adapters = setup
    n = len(adapters)
    cfg = LoraHubConfig(steps=8, population=4, l1=0.0)
    scorer = PopulationScorer(base, adapters, EXAMPLES, cfg.mode)
    candidates = torch.tensor([[0.0] * n, [1.0 / n] * n, [1.5] * n])
    losses = scorer.losses(candidates).tolist()
    scorer.close()
    result = learn_weights(
        base, adapters, EXAMPLES, cfg, progress=False, starts=candidates[1:].tolist()
    )
    assert result.objective <= min(losses) + 1e-6
    if result.objective >= min(losses) - cfg.tol:  # nothing better found: the best start back
        assert result.weights == pytest.approx(candidates[losses.index(min(losses))].tolist())
    with pytest.raises(ValueError, match="one per adapter"):
        learn_weights(base, adapters, EXAMPLES, cfg, progress=False, starts=[[1.0]])


# -- learned gating ---------------------------------------------------------------------------------


def test_gates_train_save_load_and_generate_with_the_kv_cache(tmp_path: Path) -> None:
    from conftest import tiny_llama

    from composition import LearnedGate
    from lorahub.gating import GateConfig, train_gate

    torch.manual_seed(0)
    base = BaseModel("tiny", tiny_llama(initializer_range=0.3).eval(), char_tokenizer("right"))
    task = train_lora(
        base, EXAMPLES * 4, TrainConfig(rank=4, steps=30, batch_size=4, lr=5e-3), progress=False
    ).adapter
    other = copy.deepcopy(task)
    for m in other.modules.values():
        m.lora_B.mul_(-1.0)  # the opposite update: the gate must learn to prefer `task`
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    result = train_gate(
        base, [other, task], EXAMPLES, GateConfig(steps=25, lr=5e-2, balance=0.01), progress=False
    )
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.7 * first
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())
    path = result.gate.save(tmp_path / "gate.safetensors")
    loaded = LearnedGate.load(path)
    x = torch.randn(2, 3, 32)
    name = next(iter(loaded.names))
    torch.testing.assert_close(loaded(name, x), result.gate(name, x))
    # in the pass, with the KV cache: batched generation equals a forward without cache
    composer = Composer.attach(base.model, [other, task])
    ids = torch.randint(3, 99, (2, 5))
    with torch.no_grad(), composer.compose(token_gate=loaded):
        out = base.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = base.model(out).logits[:, 4:-1].argmax(-1)
    composer.detach()
    assert torch.equal(full, out[:, 5:])
