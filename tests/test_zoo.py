"""The bundled zoo: every folder is a valid PEFT adapter carrying its own routing metadata
and matching its manifest entry; its recorded train / validation / test splits share no
example; measured here, on the test prompts the manifest keeps for the demo, the adapters
answer far better than the base model."""

from __future__ import annotations

import json

import pytest

from lorahub.tasks import SPLITS, Example, dev_tasks, example_id
from lorahub.zoo import ZOO_DIR
from registry import load_source

MANIFEST = ZOO_DIR / "manifest.json"
ENTRIES = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else []
SPLIT_IDS = json.loads((ZOO_DIR / "splits.json").read_text()) if ENTRIES else {}
KEYS = {
    "name",
    "task",
    "metric",
    "base_metric",
    "adapter_metric",
    "n_train",
    "n_validation",
    "n_test",
    "validation",
    "split",
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


@pytest.mark.skipif(not ENTRIES, reason="the zoo has not been built yet")
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_no_example_is_in_two_splits_and_each_split_is_where_it_is_used(entry: dict) -> None:
    ids = {name: SPLIT_IDS[entry["task"]][name] for name in SPLITS}
    assert [len(ids[n]) for n in SPLITS] == [entry[f"n_{n}"] for n in SPLITS]
    assert entry["n_test"] >= 30 and entry["n_validation"] >= 30
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not set(ids[a]) & set(ids[b]), f"{entry['task']}: {a} and {b} share examples"
    adapter = load_source(str(ZOO_DIR / entry["name"]))
    # the routing examples the adapter carries are train inputs; the demo's are test inputs
    assert {example_id(Example(x)) for x in adapter.meta.examples} <= set(ids["train"])
    assert {example_id(Example(d["input"])) for d in entry["demo"]} <= set(ids["test"])
    # kept on validation: the adapter beat the base model there
    assert entry["validation"]["adapter_metric"] > entry["validation"]["base_metric"]


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
