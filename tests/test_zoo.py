"""The bundled zoo: every folder is a valid PEFT adapter carrying its own routing metadata
and matching its manifest entry; measured here, on the held-out prompts the manifest keeps
for the demo, the adapters answer far better than the base model."""

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
def test_zoo_adapter_is_complete_and_matches_its_manifest(entry: dict) -> None:
    assert entry.keys() >= KEYS
    assert entry["task"] in dev_tasks()
    adapter = load_source(str(ZOO_DIR / entry["name"]))
    assert adapter.sha256() == entry["sha256"]
    assert adapter.meta.task == entry["task"] and len(adapter.meta.examples) >= 8
    assert adapter.meta.prompt_format == "chat"  # trained on SmolLM2's chat template
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


@pytest.mark.skipif(not ENTRIES, reason="the zoo has not been built yet")
def test_zoo_adapters_beat_the_base_model_on_held_out_prompts(tmp_path) -> None:
    """Each prompt answered by the real SmolLM2 with its own adapter and without: the
    manifest's own numbers are written only when they pass, so this measures anew."""
    from lorahub.hub import Hub
    from lorahub.inference import exact_match
    from lorahub.models import load_base_model
    from lorahub.zoo import register_zoo
    from registry import Registry
    from router import ArrowRouter, Routing

    rows = [(e["name"], d["input"], d["targets"]) for e in ENTRIES for d in e["demo"]]
    with Registry(tmp_path) as reg:
        register_zoo(reg)
        hub = Hub(reg, load_base_model(), ArrowRouter(reg))
        own = [Routing((name,), (1.0,)) for name, _, _ in rows]
        prompts = [p for _, p, _ in rows]
        with_own = hub.generate(prompts, routings=own, max_new_tokens=12, batch_size=16)
        base = hub.generate(prompts, compose="none", max_new_tokens=12, batch_size=16)
    right = [exact_match(a.text, t) for a, (_, _, t) in zip(with_own, rows, strict=True)]
    base_right = [exact_match(a.text, t) for a, (_, _, t) in zip(base, rows, strict=True)]
    assert sum(right) / len(rows) >= sum(base_right) / len(rows) + 0.3, (right, base_right)
