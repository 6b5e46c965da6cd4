"""PEFT layout: adapters PEFT saved load bit-identically; adapters we save load in PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_peft_model, model_inputs
from safetensors.torch import load_file

from registry import LoraAdapter, Registry, load_source, write_peft_folder


def test_peft_saved_adapter_round_trips_bit_identical(peft_dir: Path, tmp_path: Path) -> None:
    saved = load_file(peft_dir / "adapter_model.safetensors")
    with Registry(tmp_path / "reg") as reg:
        reg.register(peft_dir, name="a")
        adapter = reg.load("a")
    out = write_peft_folder(adapter, tmp_path / "out")
    again = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == again.keys()
    for key in saved:
        assert torch.equal(saved[key], again[key]), key


def test_loraplex_saved_adapter_gives_peft_the_same_logits(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    original = make_peft_model(family)
    original.save_pretrained(tmp_path / "peft")
    adapter = load_source(str(tmp_path / "peft"))
    write_peft_folder(adapter, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(build_model(family), tmp_path / "ours").eval()
    inputs = model_inputs(family)
    with torch.no_grad():
        expected = original(**inputs).logits
        got = reloaded(**inputs).logits
    assert torch.equal(expected, got)
    assert not torch.equal(expected, build_model(family)(**inputs).logits)  # adapter matters


def test_mixed_ranks_alphas_and_rslora_survive_peft_loading(tmp_path: Path) -> None:
    from peft import PeftModel

    pattern = {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    original = make_peft_model("llama", r=4, alpha=8, use_rslora=True, **pattern)
    original.save_pretrained(tmp_path / "peft")
    adapter = load_source(str(tmp_path / "peft"))
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    v = adapter.modules["model.layers.1.self_attn.v_proj"]
    assert (q.rank, q.alpha, v.rank, v.alpha) == (2, 8.0, 4, 3.0)
    assert adapter.use_rslora and adapter.scaling("model.layers.1.self_attn.v_proj") == 3.0 / 2.0
    write_peft_folder(adapter, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(build_model("llama"), tmp_path / "ours").eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        assert torch.equal(original(**inputs).logits, reloaded(**inputs).logits)


def test_metadata_travels_in_the_safetensors_header(tmp_path: Path) -> None:
    make_peft_model("llama").save_pretrained(tmp_path / "peft")
    adapter = load_source(str(tmp_path / "peft")).with_meta(
        task="arithmetic", examples=("1+1=",), tags=("math",)
    )
    write_peft_folder(adapter, tmp_path / "ours")
    back = load_source(str(tmp_path / "ours"))
    assert (back.meta.task, back.meta.examples, back.meta.tags) == (
        "arithmetic",
        ("1+1=",),
        ("math",),
    )
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


def test_single_safetensors_file_with_header_config(tmp_path: Path) -> None:
    """A blob from the registry is a self-contained single-file adapter."""
    make_peft_model("gpt2", r=4, alpha=16).save_pretrained(tmp_path / "peft")
    with Registry(tmp_path / "reg") as reg:
        rec = reg.register(tmp_path / "peft", name="g")
        blob = reg.blob_path(rec.sha256)
    adapter = load_source(str(blob))
    assert isinstance(adapter, LoraAdapter)
    assert adapter.sha256() == rec.sha256
    assert all(m.alpha == 16 for m in adapter.modules.values())


def test_legacy_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    model = make_peft_model("llama")
    model.save_pretrained(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "peft" / "adapter_model.bin")
    adapter = load_source(str(tmp_path / "peft"))
    assert len(adapter.modules) == 14


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_preserved(dtype: torch.dtype, tmp_path: Path) -> None:
    make_peft_model("llama").save_pretrained(tmp_path / "peft")
    adapter = load_source(str(tmp_path / "peft")).to(dtype)
    with Registry(tmp_path / "reg") as reg:
        reg.register(adapter, name="x")
        back = reg.load("x")
    assert all(m.lora_A.dtype == dtype for m in back.modules.values())
    assert back.sha256() == adapter.sha256()
