"""Sources: hf:// addresses resolved offline from a real Hugging Face cache layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_peft_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(cache: Path, repo: str, adapter_dir: Path, refs: dict[str, str]) -> Path:
    """Lay out `adapter_dir` as the Hub cache does: blobs by hash, snapshot symlinks, refs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in adapter_dir.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)
    return root


def loraplex(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorahub.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("hub")
    make_peft_model("llama").save_pretrained(tmp / "adapter")
    build_hub_cache(
        tmp / "cache", "someone/math-lora", tmp / "adapter", {"main": COMMIT, "v1": COMMIT}
    )
    return {
        "HF_HUB_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "LORAPLEX_HOME": str(tmp / "home"),
    }


def test_hub_adapter_registers_offline_from_the_cache(hub_env: dict[str, str]) -> None:
    out = loraplex("register", "hf://someone/math-lora", "--json", env=hub_env)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["name"] == "math-lora" and rec["n_modules"] == 14
    assert rec["source"] == "hf://someone/math-lora" and rec["revision"] == COMMIT
    out = loraplex(
        "register", "hf://someone/math-lora@v1", "--name", "pinned", "--json", env=hub_env
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revision"] == COMMIT


def test_hub_adapter_missing_from_the_cache_is_a_clear_error(hub_env: dict[str, str]) -> None:
    out = loraplex("register", "hf://someone/not-cached", env=hub_env)
    assert out.returncode == 1
    assert "not in the local Hugging Face cache" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["hf://../../etc", "hf://owner", "hf://a/b/../../c"])
def test_malformed_hub_addresses_are_refused(spec: str, hub_env: dict[str, str]) -> None:
    out = loraplex("register", spec, env=hub_env)
    assert out.returncode == 1 and "hf://" in out.stderr
