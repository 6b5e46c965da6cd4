"""Every bad input gets a typed error naming the problem, and the registry is unchanged."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_peft_model
from safetensors.torch import load_file, save_file

from registry import (
    AdapterError,
    AdapterFormatError,
    AdapterLimitError,
    AdapterShapeError,
    AdapterValueError,
    DuplicateNameError,
    Limits,
    Registry,
    UnsafePathError,
)

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def snapshot(root: Path) -> tuple:
    """Everything a failed registration must leave untouched."""
    with Registry(root) as reg:
        rows = [(r.name, r.sha256) for r in reg.list()]
        generation = reg.generation()
    files = sorted(
        p.relative_to(root).as_posix() for p in (root / "blobs").rglob("*") if p.is_file()
    )
    return rows, files, generation, sorted(p.name for p in (root / "tmp").iterdir())


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "adapter"
    make_peft_model("llama").save_pretrained(out)
    return out


@pytest.fixture
def adapter_dir(good_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_dir, tmp_path / "adapter"))


@pytest.fixture
def registry(tmp_path: Path, good_dir: Path) -> Path:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.register(good_dir, name="existing")
    return root


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _nan(t: dict) -> None:
    t[KEY_A][0, 0] = float("nan")


def _inf(t: dict) -> None:
    t[KEY_B][1, 0] = float("inf")


def _drop_b(t: dict) -> None:
    del t[KEY_B]


def _mismatch(t: dict) -> None:
    t[KEY_B] = torch.randn(32, 3)


def _three_d(t: dict) -> None:
    t[KEY_A] = t[KEY_A][None]


def _bad_key(t: dict) -> None:
    t["base_model.model.model.layers.0.mlp.lora_magnitude_vector"] = torch.ones(3)


def _truncate(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _garbage_header(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")


def _huge_header(folder: Path) -> None:
    """A header that declares a 2^40-element tensor the file does not hold."""
    header = json.dumps({KEY_A: {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}})
    raw = header.encode()
    (folder / "adapter_model.safetensors").write_bytes(
        len(raw).to_bytes(8, "little") + raw + b"\0" * 4
    )


def _no_config(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()


def _malformed_config(folder: Path) -> None:
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')


def _config_list(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("[1, 2]")


def _no_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


CASES = {
    "missing config": (_no_config, AdapterFormatError, "adapter_config.json"),
    "malformed config": (_malformed_config, AdapterFormatError, "malformed JSON"),
    "config not an object": (_config_list, AdapterFormatError, "JSON object"),
    "bad rank in config": (lambda f: edit_config(f, r="four"), AdapterFormatError, "'r'"),
    "negative alpha": (lambda f: edit_config(f, lora_alpha=-1), AdapterFormatError, "lora_alpha"),
    "not LoRA": (lambda f: edit_config(f, peft_type="IA3"), AdapterFormatError, "IA3"),
    "DoRA": (lambda f: edit_config(f, use_dora=True), AdapterFormatError, "DoRA"),
    "rank contradicts config": (lambda f: edit_config(f, r=7), AdapterShapeError, "r=7"),
    "no weights": (_no_weights, AdapterFormatError, "adapter_model"),
    "truncated safetensors": (_truncate, AdapterFormatError, "safetensors"),
    "garbage safetensors": (_garbage_header, AdapterFormatError, "safetensors"),
    "huge declared tensor": (_huge_header, AdapterFormatError, "offset"),
    "missing lora_B": (lambda f: edit_tensors(f, _drop_b), AdapterFormatError, "lora_B"),
    "A/B rank mismatch": (lambda f: edit_tensors(f, _mismatch), AdapterShapeError, "q_proj"),
    "3-D tensor": (lambda f: edit_tensors(f, _three_d), AdapterShapeError, "2-D"),
    "unsupported key": (lambda f: edit_tensors(f, _bad_key), AdapterFormatError, "magnitude"),
    "NaN": (lambda f: edit_tensors(f, _nan), AdapterValueError, "NaN"),
    "Inf": (lambda f: edit_tensors(f, _inf), AdapterValueError, "lora_B"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_refused_and_registry_unchanged(
    case: str, adapter_dir: Path, registry: Path
) -> None:
    corrupt, error, needle = CASES[case]
    corrupt(adapter_dir)
    before = snapshot(registry)
    with Registry(registry) as reg, pytest.raises(error, match=needle):
        reg.register(adapter_dir, name="new")
    assert snapshot(registry) == before


def test_rank_and_size_limits_are_configurable(adapter_dir: Path, registry: Path) -> None:
    before = snapshot(registry)
    with (
        Registry(registry, limits=Limits(max_rank=2)) as reg,
        pytest.raises(AdapterLimitError, match="rank 4"),
    ):
        reg.register(adapter_dir, name="new")
    with Registry(registry, limits=Limits(max_bytes=1000)) as reg, pytest.raises(AdapterLimitError):
        reg.register(adapter_dir, name="new")
    assert snapshot(registry) == before


def test_shapes_contradicting_the_same_base_model_are_refused(
    tmp_path: Path, registry: Path
) -> None:
    """Same base-model name, different hidden size: the check is on shapes."""
    from conftest import FAMILIES, tiny_llama
    from peft import LoraConfig, get_peft_model

    wide = tiny_llama(hidden_size=48)
    cfg = LoraConfig(r=4, target_modules=FAMILIES["llama"][1], init_lora_weights=False)
    get_peft_model(wide, cfg).save_pretrained(tmp_path / "wide")
    before = snapshot(registry)
    with Registry(registry) as reg, pytest.raises(AdapterShapeError, match="contradicts"):
        reg.register(tmp_path / "wide", name="wide")
    assert snapshot(registry) == before
    edit_config(tmp_path / "wide", base_model_name_or_path="another-model")
    with Registry(registry) as reg:  # a different base model may have other shapes
        assert reg.register(tmp_path / "wide", name="wide").base_model.name == "another-model"


def test_pickle_with_code_is_never_executed(
    adapter_dir: Path, registry: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (adapter_dir / "adapter_model.safetensors").unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(pickle.dumps({KEY_A: Exploit()}))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Exploit()))
    before = snapshot(registry)
    with Registry(registry) as reg:
        with pytest.raises(UnsafePathError, match="refused"):
            reg.register(adapter_dir, name="new")
        with pytest.raises(UnsafePathError, match="pickle"):
            reg.register(tmp_path / "evil.pkl", name="new")
    assert not marker.exists()
    assert snapshot(registry) == before


@pytest.mark.parametrize("target", ["adapter_model.safetensors", "adapter_config.json"])
def test_symlink_leading_outside_the_folder_is_refused(
    target: str, adapter_dir: Path, registry: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside" / target
    outside.parent.mkdir()
    shutil.move(adapter_dir / target, outside)
    (adapter_dir / target).symlink_to(outside)
    before = snapshot(registry)
    with Registry(registry) as reg, pytest.raises(UnsafePathError, match="outside"):
        reg.register(adapter_dir, name="new")
    assert snapshot(registry) == before


def test_symlink_inside_the_folder_is_fine(adapter_dir: Path, registry: Path) -> None:
    real = adapter_dir / "weights" / "adapter_model.safetensors"
    real.parent.mkdir()
    shutil.move(adapter_dir / "adapter_model.safetensors", real)
    (adapter_dir / "adapter_model.safetensors").symlink_to(real)
    with Registry(registry) as reg:
        assert reg.register(adapter_dir, name="linked").n_modules == 14


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "a/b",
        "a\\b",
        "..",
        "with space",
        "tab\tname",
        "nl\nname",
        "",
        ".hidden",
        "x" * 200,
        "nul\x00byte",
        "dots..inside",
    ],
)
def test_unsafe_names_are_refused(name: str, good_dir: Path, registry: Path) -> None:
    before = snapshot(registry)
    with Registry(registry) as reg, pytest.raises(UnsafePathError, match="invalid adapter name"):
        reg.register(good_dir, name=name)
    assert snapshot(registry) == before


def test_same_name_twice_needs_replace(good_dir: Path, registry: Path) -> None:
    before = snapshot(registry)
    with Registry(registry) as reg:
        with pytest.raises(DuplicateNameError, match="existing"):
            reg.register(good_dir, name="existing", description="again")
        assert snapshot(registry) == before
        reg.register(good_dir, name="existing", description="again", replace=True)
        assert reg.get("existing").meta.description == "again"


def test_every_error_is_an_adapter_error() -> None:
    for _, error, _ in CASES.values():
        assert issubclass(error, AdapterError)
