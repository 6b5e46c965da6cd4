"""Compositions as one ordinary LoRA (what a single-adapter engine such as vLLM applies):
exact against float64, loadable by PEFT with equal logits, cached by content."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_peft_model, model_inputs

from composition import Composer, Mode
from lorahub.serve.materialize import AdapterFolders, RankLimitError, quantize
from registry import load_source


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list:
    tmp = tmp_path_factory.mktemp("members")
    out = []
    for seed, (r, alpha) in enumerate([(4, 8), (2, 16), (4, 3)], start=1):
        make_peft_model("llama", seed=seed, r=r, alpha=alpha).save_pretrained(tmp / str(seed))
        out.append(load_source(str(tmp / str(seed))))
    return out


def delta64(adapter, name: str) -> torch.Tensor:
    m = adapter.modules[name]
    return adapter.scaling(name) * m.lora_B.double() @ m.lora_A.double()


@pytest.mark.parametrize("mode", list(Mode))
def test_the_one_adapter_applies_the_composition_exactly(adapters, mode, tmp_path: Path) -> None:
    weights = [0.5004, 0.3, 0.2]
    made, _ = AdapterFolders(tmp_path).get(adapters, weights, mode, max_rank=64)
    assert made.weights == (0.5, 0.3, 0.2) and made.rel_error == 0.0  # quantized to 1e-3
    one = load_source(str(made.path))
    for name in one.modules:
        if mode == Mode.mixture:  # sum_i g_i s_i B_i A_i
            want = sum(w * delta64(a, name) for w, a in zip(made.weights, adapters, strict=True))
            assert one.rank == made.rank == 10
        else:  # (sum_i g_i s_i B_i)(sum_i g_i A_i), ranks zero-padded
            r = max(a.modules[name].rank for a in adapters)
            pad = lambda t, rows: torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))  # noqa: E731
            B = sum(
                w * a.scaling(name) * pad(a.modules[name].lora_B.double().T, r).T
                for w, a in zip(made.weights, adapters, strict=True)
            )
            A = sum(
                w * pad(a.modules[name].lora_A.double(), r)
                for w, a in zip(made.weights, adapters, strict=True)
            )
            want = B @ A
        torch.testing.assert_close(delta64(one, name), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", list(Mode))
def test_peft_loads_it_with_the_logits_of_the_in_pass_composition(
    adapters, mode, tmp_path: Path
) -> None:
    from peft import PeftModel

    weights = [0.6, 0.25, 0.15]
    made, _ = AdapterFolders(tmp_path).get(adapters, weights, mode, max_rank=64)
    model = build_model("llama")
    peft = PeftModel.from_pretrained(copy.deepcopy(model), made.path).eval()
    inputs = model_inputs("llama")
    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(torch.tensor([weights] * 2), mode=mode, path="gathered"):
        want = model(**inputs).logits
    composer.detach()
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, want, atol=1e-4, rtol=1e-4)


def test_rank_limit_compresses_with_its_error_or_refuses_when_exact(
    adapters, tmp_path: Path
) -> None:
    folders = AdapterFolders(tmp_path)
    made, _ = folders.get(adapters, [0.4, 0.3, 0.3], Mode.mixture, max_rank=4)
    assert made.rank == 4 and 0 < made.rel_error < 1
    with pytest.raises(RankLimitError, match="rank 10"):
        folders.get(adapters, [0.4, 0.3, 0.31], Mode.mixture, max_rank=4, exact=True)
    with pytest.raises(RankLimitError, match="exceeds"):  # cached, compressed: still refused
        folders.get(adapters, [0.4, 0.3, 0.3], Mode.mixture, max_rank=4, exact=True)


def test_folders_are_content_addressed_and_bounded(adapters, tmp_path: Path) -> None:
    folders = AdapterFolders(tmp_path, max_entries=2)
    first, _ = folders.get(adapters, [0.5, 0.5, 0.0], Mode.mixture, 64)
    again, _ = folders.get(
        adapters, [0.5001, 0.4999, 0.0], Mode.mixture, 64
    )  # same after quantizing
    assert again.name == first.name
    folders.get(adapters, [0.1, 0.9, 0.0], Mode.mixture, 64)
    _, evicted = folders.get(adapters, [0.2, 0.8, 0.0], Mode.mixture, 64)
    assert evicted == [first.name] and not first.path.exists()
    assert quantize([0.12345], 0.01) == (0.12,)
