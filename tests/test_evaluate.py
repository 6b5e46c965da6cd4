"""The evaluation harness on a tiny model: metrics on hand-made cases, the OOD exclusion,
and the results.json schema."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model, char_tokenizer

from lorahub.evaluate import EvalConfig, Item, bootstrap_ci, evaluate, report_dict
from lorahub.gating import GateConfig
from lorahub.hub import Hub
from lorahub.inference import exact_match, normalize
from lorahub.learn import LoraHubConfig
from lorahub.models import BaseModel
from lorahub.report import write_report
from lorahub.tasks import Example, Task, TaskKind
from registry import AdapterMeta, BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import Retriever

REVERSE = Task(
    "reverse",
    TaskKind.generative,
    tuple(
        Example(f"Reverse the word: {w}", targets=(w[::-1],))
        for w in ["abc", "moon", "star", "tree", "lamp", "fish", "wolf", "rain", "sand"]
    ),
)
COLOR = Task(
    "color",
    TaskKind.multiple_choice,
    tuple(
        Example(f"What color is {x}?", options=("red", "blue", "green"), answer=i % 3)
        for i, x in enumerate(
            ["the sky", "grass", "blood", "the sea", "a leaf", "fire", "coal", "snow", "a lime"]
        )
    ),
)


def test_metrics_on_hand_made_cases() -> None:
    assert normalize("  The Answer.\nmore") == "the answer" and exact_match("42.", ["42"])
    assert not exact_match("4 2", ["42"])
    lo, hi = bootstrap_ci([1.0] * 10, 200, 0)
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, 2000, 0)
    assert 0.38 < lo < 0.5 < hi < 0.62
    items = [
        Item("t", Example("a", targets=("x",)), "own", right={"m": r}, routed={"m": rt})
        for r, rt in [(True, ("own", "b")), (False, ("b", "own")), (True, ("own",)), (True, ("c",))]
    ]
    task = Task("t", TaskKind.generative, ())
    res = report_dict(items, ["m"], [task], EvalConfig(n_bootstrap=100))
    assert res["tasks"]["t"]["m"]["em"]["value"] == 0.75 and res["tasks"]["t"]["m"]["em"]["n"] == 4


@pytest.fixture
def hub(tmp_path: Path, embedder):
    model = build_model("llama")
    reg = Registry(tmp_path / "reg", embedder=embedder)
    g = torch.Generator().manual_seed(0)
    for task in (REVERSE, COLOR, Task("extra", TaskKind.generative, ())):
        mods = {
            n: LoraModule(
                torch.randn(2, m.in_features, generator=g),
                torch.randn(m.out_features, 2, generator=g),
                4.0,
            )
            for n, m in model.named_modules()
            if n.endswith("q_proj")
        }
        examples = tuple(e.input for e in task.examples[:3]) or ("Translate to Klingon: hello",)
        reg.register(
            LoraAdapter(mods, base_model=BaseModelInfo("tiny"), meta=AdapterMeta(task=task.name)),
            name=f"{task.name}-lora",
            examples=examples,
        )
    yield Hub(reg, BaseModel("tiny", model, char_tokenizer()), Retriever(reg))
    reg.close()


def test_ood_never_uses_the_excluded_adapter(hub: Hub) -> None:
    res = evaluate(
        hub,
        [REVERSE, COLOR],
        EvalConfig(protocol="ood", k=2, limit=4, n_bootstrap=50, max_new_tokens=4),
        progress=False,
    )
    own = {"reverse": "reverse-lora", "color": "color-lora"}
    assert "oracle" not in res["summary"]
    used = [r for r in res["routings"] if r["method"] != "base"]
    assert {r["method"] for r in used} == {
        "selection",
        "mixture",
        "fusion",
        "auto",
        "uniform",
        "arrow",
    }
    assert all(own[r["task"]] not in r["adapters"] for r in used)


def test_results_json_follows_its_schema(hub: Hub, tmp_path: Path) -> None:
    cfg = EvalConfig(protocol="iid", k=2, limit=3, n_bootstrap=50, max_new_tokens=4)
    out = write_report(evaluate(hub, [REVERSE, COLOR], cfg, progress=False), tmp_path / "report")
    res = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "report.md",
        "methods.png",
        "tasks.png",
    }
    assert set(res) >= {"protocol", "config", "seeds", "tasks", "summary", "routings"}
    for methods in res["tasks"].values():
        assert set(methods) == set(cfg.methods)
        for metrics in methods.values():
            for metric, stat in metrics.items():
                assert metric in {"em", "mc_acc", "routing_top1", "routing_topk"}
                assert set(stat) == {"value", "ci_low", "ci_high", "n"} and stat["n"] == 3
                assert stat["ci_low"] <= stat["value"] <= stat["ci_high"]
    assert "mc_acc" in res["tasks"]["color"]["base"] and "em" in res["tasks"]["reverse"]["base"]
    assert res["tasks"]["color"]["oracle"]["mc_acc"]["n"] == 3
    assert "routing_top1" in res["tasks"]["reverse"]["selection"]
    assert all(isinstance(v, float) for s in res["summary"].values() for v in s.values())


def test_fewshot_learns_from_shots_apart_from_the_prompts_and_excludes_own_adapters(
    hub: Hub,
) -> None:
    cfg = EvalConfig(
        protocol="fewshot",
        shots=2,
        limit=3,
        n_bootstrap=50,
        max_new_tokens=4,
        lorahub=LoraHubConfig(steps=4, population=2),
        gate=GateConfig(steps=2, batch_size=2),
    )
    res = evaluate(hub, [REVERSE, COLOR], cfg, progress=False)
    assert res["fewshot"]["candidates"] == ["extra-lora"]  # own-task adapters are left out
    assert set(res["summary"]) == {"base", "uniform", "auto", "lorahub", "gated"}
    for task in ("reverse", "color"):
        learned = res["fewshot"]["tasks"][task]
        assert set(learned["lorahub"]["weights"]) == {"extra-lora"}
        assert learned["lorahub"]["starts"]["uniform"] == [1.0]
        assert len(learned["gated"]["shots"]) == 2
        prompts = {r["prompt"] for r in res["routings"] if r["task"] == task}
        assert len(prompts) == 3 and not prompts & set(learned["lorahub"]["shots"])
        assert res["tasks"][task]["lorahub"][next(iter(res["tasks"][task]["lorahub"]))]["n"] == 3
    used = [r for r in res["routings"] if r["method"] in ("auto", "uniform")]
    assert all(r["adapters"] == ["extra-lora"] for r in used if r["method"] == "uniform")
    assert all(f"{r['task']}-lora" not in r["adapters"] for r in used)


def test_prompts_come_from_the_asked_split_and_alike_routings_are_scored_once(
    hub: Hub, monkeypatch
) -> None:
    import lorahub.evaluate as ev

    scored = []
    real = ev.score_items
    monkeypatch.setattr(
        ev,
        "score_items",
        lambda h, items, *a, **kw: scored.append(len(items)) or real(h, items, *a, **kw),
    )
    seen: dict = {}
    cfg = EvalConfig(
        protocol="iid",
        k=1,
        limit=3,
        n_bootstrap=20,
        max_new_tokens=4,
        methods=("oracle", "selection", "auto"),
    )
    first = evaluate(hub, [REVERSE, COLOR], cfg, progress=False, seen=seen)
    assert scored[0] == 6 and sum(scored[1:]) < 12  # selection and auto mostly route as oracle
    scored.clear()
    again = evaluate(hub, [REVERSE, COLOR], cfg, progress=False, seen=seen)
    assert sum(scored) == 0 and again["tasks"] == first["tasks"]
    fresh = evaluate(hub, [REVERSE, COLOR], cfg, progress=False)
    assert fresh["tasks"] == first["tasks"]  # remembering changes nothing but the work
    test = {r["prompt"] for r in first["routings"]}
    want = {ex.input for t in (REVERSE, COLOR) for ex in t.splits(cfg.split).test}
    assert test == want
    val = evaluate(hub, [REVERSE, COLOR], replace(cfg, on="validation"), progress=False)
    assert not {r["prompt"] for r in val["routings"]} & test


def test_methods_must_fit_the_protocol() -> None:
    with pytest.raises(ValueError, match=r"lorahub.*iid"):
        EvalConfig(protocol="iid", methods=("base", "lorahub"))
    with pytest.raises(ValueError, match="oracle"):
        EvalConfig(protocol="ood", methods=("oracle",))
    assert "oracle" not in EvalConfig(protocol="ood").methods
