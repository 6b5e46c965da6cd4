"""Weight-space merges against float64 recomputation and PEFT's definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_model, make_peft_model, model_inputs

from composition import MERGES, Composer, MergeConfig, merge
from composition.merge import (
    dare_linear_delta,
    dare_ties_delta,
    magnitude_prune_delta,
    ties_delta,
)
from registry import (
    AdapterError,
    BaseModelInfo,
    BaseModelMismatchError,
    LoraAdapter,
    LoraModule,
    load_source,
    write_peft_folder,
)

D_IN, D_OUT = 24, 20


def adapters(specs=((4, 8.0, False), (2, 3.0, False), (6, 6.0, True)), modules=("m.q", "m.v")):
    g = torch.Generator().manual_seed(0)
    out = []
    for r, alpha, rs in specs:
        mods = {
            name: LoraModule(
                torch.randn(r, D_IN, generator=g), torch.randn(D_OUT, r, generator=g), alpha
            )
            for name in modules
        }
        out.append(LoraAdapter(mods, use_rslora=rs, base_model=BaseModelInfo("tiny")))
    return out


def exact_sum(ads: list[LoraAdapter], weights: list[float], module: str) -> torch.Tensor:
    return sum(
        w * a.delta(module, torch.float64)
        for w, a in zip(weights, ads, strict=True)
        if module in a.modules
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def merged_delta(result, module: str) -> torch.Tensor:
    return result.adapter.delta(module, torch.float64)


def test_linear_merge_equals_exact_float64_sum_while_peft_linear_does_not(tmp_path: Path) -> None:
    ads, weights = adapters(), [0.7, -0.4, 1.3]
    result = merge(ads, weights, "linear")
    for module in ("m.q", "m.v"):
        assert rel(merged_delta(result, module), exact_sum(ads, weights, module)) < 1e-5
    assert result.adapter.modules["m.q"].rank == 12  # 4 + 2 + 6
    # PEFT's `linear` averages A and B separately: not the weighted sum of deltas.
    peft = make_peft_model("llama", seed=1, r=4, alpha=8)
    peft.load_adapter(_save_other(tmp_path), adapter_name="other")
    peft.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    exact = 0.5 * layer.get_delta_weight("default") + 0.5 * layer.get_delta_weight("other")
    assert rel(layer.get_delta_weight("mix"), exact) > 0.1
    ours = merge([load_source(str(tmp_path / "a")), load_source(str(tmp_path / "b"))], [0.5, 0.5])
    assert rel(ours.adapter.delta("model.layers.0.self_attn.q_proj", torch.float64), exact) < 1e-5


def _save_other(tmp_path: Path) -> Path:
    make_peft_model("llama", seed=1, r=4, alpha=8).save_pretrained(tmp_path / "a")
    make_peft_model("llama", seed=2, r=4, alpha=8).save_pretrained(tmp_path / "b")
    return tmp_path / "b"


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_svd_merge_is_the_best_rank_r_approximation_and_reports_its_error(rank: int) -> None:
    ads, weights = adapters(), [0.5, 1.0, -0.25]
    result = merge(ads, weights, "svd", MergeConfig(rank=rank))
    exact = exact_sum(ads, weights, "m.q")
    U, S, Vh = torch.linalg.svd(exact)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    got = merged_delta(result, "m.q")
    assert rel(got, best) < 1e-5
    assert result.rel_error["m.q"] == pytest.approx(rel(got, exact), rel=1e-4)
    assert result.adapter.modules["m.q"].rank == rank


def test_svd_merge_of_rank_deficient_factors_is_exact_and_finite() -> None:
    (a,) = adapters(specs=((3, 6.0, False),))
    same = merge([a, a], [0.5, 0.5], "svd", MergeConfig(rank=4))  # stacked rank 6, true rank 3
    assert rel(merged_delta(same, "m.q"), a.delta("m.q", torch.float64)) < 1e-5
    assert same.rel_error["m.q"] < 1e-5
    cancelled = merge([a, a], [1.0, -1.0], "svd", MergeConfig(rank=2))
    assert torch.isfinite(cancelled.adapter.modules["m.q"].lora_A).all()
    assert merged_delta(cancelled, "m.q").abs().max() < 1e-4 and cancelled.rel_error["m.q"] <= 1.0


@pytest.mark.parametrize(
    "ours, peft_name",
    [
        (ties_delta, "ties"),
        (dare_linear_delta, "dare_linear"),
        (dare_ties_delta, "dare_ties"),
        (magnitude_prune_delta, "magnitude_prune"),
    ],
)
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_sparsifying_merges_match_peft_definitions(ours, peft_name: str, density: float) -> None:
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(5)
    deltas = torch.randn(3, D_OUT, D_IN, generator=g)
    w = torch.tensor([0.6, -0.3, 1.1])
    cfg = MergeConfig(density=density, seed=11)
    got = ours(deltas, w, cfg, torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)  # PEFT draws DARE's masks from the global generator
    args = (list(deltas), w, density)
    expected = getattr(merge_utils, peft_name)(*args)
    torch.testing.assert_close(got, expected)


def test_sparsifying_merges_back_to_low_rank_report_fidelity() -> None:
    ads = adapters()
    result = merge(ads, [1.0, 1.0, 1.0], "ties", MergeConfig(rank=8, density=0.5))
    for module, err in result.rel_error.items():
        assert 0.0 <= err < 1.0
        assert result.adapter.modules[module].rank == 8


def test_lorahub_merge_is_the_elementwise_sum_of_factors() -> None:
    ads = adapters(specs=((4, 8.0, False), (4, 8.0, False)))
    result = merge(ads, [0.3, -1.2], "lorahub")
    m = result.adapter.modules["m.v"]
    torch.testing.assert_close(
        m.lora_A, 0.3 * ads[0].modules["m.v"].lora_A - 1.2 * ads[1].modules["m.v"].lora_A
    )
    torch.testing.assert_close(
        m.lora_B, 0.3 * ads[0].modules["m.v"].lora_B - 1.2 * ads[1].modules["m.v"].lora_B
    )
    assert result.adapter.scaling("m.v") == ads[0].scaling("m.v")


def test_a_missing_module_contributes_nothing() -> None:
    q_only = adapters(specs=((4, 8.0, False),), modules=("m.q",))[0]
    both = adapters(specs=((2, 2.0, False),))[0]
    result = merge([q_only, both], [1.0, 0.5], "linear")
    assert rel(merged_delta(result, "m.v"), 0.5 * both.delta("m.v", torch.float64)) < 1e-6
    assert rel(merged_delta(result, "m.q"), exact_sum([q_only, both], [1.0, 0.5], "m.q")) < 1e-6


@pytest.mark.parametrize("method", sorted(MERGES))
def test_every_merge_saves_in_peft_format_and_peft_runs_it(method: str, tmp_path: Path) -> None:
    from peft import PeftModel

    for seed in (1, 2):
        make_peft_model("llama", seed=seed, r=4, alpha=8).save_pretrained(tmp_path / f"a{seed}")
    ads = [load_source(str(tmp_path / f"a{s}")) for s in (1, 2)]
    result = merge(ads, [0.6, 0.4], method, MergeConfig(rank=4))
    write_peft_folder(result.adapter, tmp_path / "merged")
    peft = PeftModel.from_pretrained(build_model("llama"), tmp_path / "merged").eval()
    model = build_model("llama")
    composer = Composer.attach(model, [load_source(str(tmp_path / "merged"))])
    inputs = model_inputs("llama")
    with torch.no_grad(), composer.compose(torch.ones(2, 1)):
        ours = model(**inputs).logits
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, ours, atol=1e-5, rtol=1e-5)


def test_merge_refuses_bad_input() -> None:
    a, b = adapters()[:2]
    other = LoraAdapter(b.modules, base_model=BaseModelInfo("other-model"))
    with pytest.raises(BaseModelMismatchError, match="other-model"):
        merge([a, other])
    with pytest.raises(AdapterError, match="empty"):
        merge([])
    with pytest.raises(ValueError, match="choose from"):
        merge([a, b], method="average")
    with pytest.raises(ValueError, match="2 finite weights"):
        merge([a, b], [1.0])
    with pytest.raises(AdapterError, match="equal ranks"):
        merge([a, b], method="lorahub")
