"""Property-based fuzzing of every loader and of `register`: whatever the bytes, only the
library's own error types come out, and a failed registration changes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import make_peft_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import AdapterError, Registry, load_source

# 60 inputs per property in the test suite; benchmarks/bench_reliability.py runs thousands.
EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=EXAMPLES <= 60,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "adapter"
    make_peft_model("llama", r=2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, good: Path) -> Path:
    root = tmp_path_factory.mktemp("fuzz-reg")
    with Registry(root) as reg:
        reg.register(good, name="existing")
    return root


def state(root: Path) -> tuple:
    with Registry(root) as reg:
        rows = [(r.name, r.sha256) for r in reg.list()]
    return rows, sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())


def check(folder: Path, registry: Path) -> None:
    """Loading and registering either work or raise an AdapterError; a failure leaves the
    registry as it was."""
    with contextlib.suppress(AdapterError):
        load_source(str(folder))
    before = state(registry)
    with Registry(registry) as reg:
        try:
            reg.register(folder, name="fuzzed", replace=True)
        except AdapterError:
            assert state(registry) == before
            return
        reg.remove("fuzzed")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "peft_type",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "base_model_name_or_path",
    "task_type",
    "target_modules",
]


@FUZZ
@given(key=st.sampled_from(CONFIG_KEYS), value=JSON_VALUES)
def test_mutated_config_values(good: Path, registry: Path, key: str, value: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(good, Path(tmp) / "a"))
        config = json.loads((folder / "adapter_config.json").read_text())
        config[key] = value
        (folder / "adapter_config.json").write_text(json.dumps(config))
        check(folder, registry)


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_config_text(good: Path, registry: Path, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(good, Path(tmp) / "a"))
        (folder / "adapter_config.json").write_text(text)
        check(folder, registry)


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_bytes(good: Path, registry: Path, data: st.DataObject) -> None:
    raw = bytearray((good / "adapter_model.safetensors").read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    # flip, overwrite or cut: in the length prefix, the JSON header, or the tensor data
    where = data.draw(st.sampled_from(["prefix", "header", "data", "truncate"]))
    if where == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        lo, hi = {
            "prefix": (0, 8),
            "header": (8, 8 + header_len),
            "data": (8 + header_len, len(raw)),
        }[where]
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(good, Path(tmp) / "a"))
        (folder / "adapter_model.safetensors").write_bytes(bytes(raw))
        check(folder, registry)
        single = Path(tmp) / "single.safetensors"
        single.write_bytes(bytes(raw))
        with contextlib.suppress(AdapterError):
            load_source(str(single))


@FUZZ
@given(header=JSON_VALUES)
def test_arbitrary_safetensors_headers(good: Path, registry: Path, header: object) -> None:
    body = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(good, Path(tmp) / "a"))
        (folder / "adapter_model.safetensors").write_bytes(
            len(body).to_bytes(8, "little") + body + b"\0" * 64
        )
        check(folder, registry)
