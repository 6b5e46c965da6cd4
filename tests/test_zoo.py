"""The bundled zoo: every folder is a valid PEFT adapter carrying its own routing metadata,
matching its manifest entry, and beating the base model on its task's held-out examples."""

from __future__ import annotations

import json

import pytest

from lorahub.tasks import dev_tasks
from lorahub.zoo import ZOO_DIR
from registry import load_source

MANIFEST = ZOO_DIR / "manifest.json"
ENTRIES = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else []
KEYS = {
    "name",
    "task",
    "metric",
    "base_metric",
    "adapter_metric",
    "n_train",
    "n_test",
    "steps",
    "lr",
    "loraplus_ratio",
    "seed",
    "train_seconds",
    "sha256",
}


@pytest.mark.skipif(not ENTRIES, reason="the zoo has not been built yet")
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_zoo_adapter_is_complete_and_beats_base(entry: dict) -> None:
    assert entry.keys() >= KEYS
    assert entry["task"] in dev_tasks()
    assert entry["adapter_metric"] > entry["base_metric"]
    adapter = load_source(str(ZOO_DIR / entry["name"]))
    assert adapter.sha256() == entry["sha256"]
    assert adapter.meta.task == entry["task"] and len(adapter.meta.examples) >= 8
    assert entry["demo"] and all(d["input"] not in adapter.meta.examples for d in entry["demo"])


def test_zoo_fits_its_size_budget() -> None:
    total = (
        sum(f.stat().st_size for f in ZOO_DIR.rglob("*") if f.is_file()) if ZOO_DIR.exists() else 0
    )
    assert total <= 25 * 10**6


def test_zoo_has_at_least_24_adapters_in_related_families() -> None:
    families = {}
    for e in ENTRIES:
        families.setdefault(e["task"].split("/")[0], []).append(e["name"])
    assert len(ENTRIES) >= 24
    assert sum(len(names) >= 2 for names in families.values()) >= 5  # families, not singletons
