"""The hub on a tiny config-built Llama with a real (character-level) tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_model, char_tokenizer

from lorahub.hub import Hub
from lorahub.inference import Sampling
from lorahub.models import BaseModel
from registry import BaseModelInfo, BaseModelMismatchError, LoraAdapter, LoraModule, Registry
from router import Retriever, Routing

EXAMPLES = {
    "arithmetic": ["What is 17 plus 25?", "Compute 9 times 6.", "What is 100 minus 37?"],
    "translation": ["Translate 'bonjour' to English.", "How do you say dog in Spanish?"],
    "sentiment": ["I hated that movie, it was awful.", "What a wonderful, happy day!"],
}
PROMPTS = [
    "What is 8 plus 13?",
    "Translate 'cat' into Italian.",
    "This film was dreadful.",
    "Compute 4 times 5.",
]


def adapter_for(model: torch.nn.Module, seed: int, base: str = "tiny-llama") -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {
        name: LoraModule(
            torch.randn(4, m.in_features, generator=g) * 0.5,
            torch.randn(m.out_features, 4, generator=g) * 0.5,
            8.0,
        )
        for name, m in model.named_modules()
        if name.endswith(("q_proj", "v_proj", "down_proj"))
    }
    return LoraAdapter(mods, base_model=BaseModelInfo(base))


@pytest.fixture
def hub(tmp_path: Path, embedder):
    model = build_model("llama")
    base = BaseModel("tiny-llama", model, char_tokenizer())
    reg = Registry(tmp_path, embedder=embedder)
    for i, (task, ex) in enumerate(EXAMPLES.items()):
        reg.register(adapter_for(model, i), name=task, examples=ex)
    yield Hub(reg, base, Retriever(reg))
    reg.close()


@pytest.mark.parametrize("compose", ["mixture", "fusion", "selection"])
def test_mixed_batch_equals_each_prompt_alone(hub: Hub, compose: str) -> None:
    answers = hub.generate(PROMPTS, k=2, compose=compose, max_new_tokens=6)
    assert answers[0].routing.adapters[0] == "arithmetic"
    assert answers[1].routing.adapters[0] == "translation"
    assert all(len(a.routing.adapters) == (1 if compose == "selection" else 2) for a in answers)
    for a in answers:
        alone = hub.generate([a.prompt], routings=[a.routing], compose=compose, max_new_tokens=6)[0]
        assert alone.text == a.text, a.prompt
    before = {k: v.clone() for k, v in hub.base.model.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in hub.base.model.state_dict().items())


def test_routing_changes_answers_and_none_is_the_base_model(hub: Hub) -> None:
    routed = [a.text for a in hub.generate(PROMPTS, k=1, compose="selection", max_new_tokens=6)]
    plain = hub.generate(PROMPTS, compose="none", max_new_tokens=6)
    assert all(a.routing.adapters == () for a in plain)
    assert routed != [a.text for a in plain]


def test_scores_follow_the_routing(hub: Hub) -> None:
    options = [["21", "22"], ["gatto", "cane"], ["bad", "good"], ["20", "9"]]
    routed = hub.score(PROMPTS, options, k=1, compose="selection")
    for i, p in enumerate(PROMPTS):
        alone = hub.score([p], [options[i]], k=1, compose="selection")[0]
        assert alone == pytest.approx(routed[i], abs=1e-4)
    assert hub.score(PROMPTS, options, compose="none") != routed


def test_adapters_for_another_model_fail_before_generation(tmp_path: Path, embedder) -> None:
    reg = Registry(tmp_path, embedder=embedder)
    mods = {"transformer.h.0.attn.c_attn": LoraModule(torch.randn(2, 32), torch.randn(96, 2), 2.0)}
    reg.register(LoraAdapter(mods, base_model=BaseModelInfo("gpt2-tiny")), name="g", examples=["x"])
    with pytest.raises(BaseModelMismatchError, match="gpt2-tiny"):
        Hub(reg, BaseModel("tiny-llama", build_model("llama"), char_tokenizer()), Retriever(reg))
    reg.close()


def test_empty_prompt_list_and_long_prompts(hub: Hub) -> None:
    with pytest.raises(ValueError, match="no prompts"):
        hub.generate([])
    from lorahub import inference

    with pytest.warns(UserWarning, match="truncated"):
        inference.generate(hub.base, ["x" * 200], sampling=Sampling(2), max_prompt_tokens=64)


def test_adapters_for_another_base_are_never_routed(hub: Hub, embedder) -> None:
    gpt2_mods = {
        "transformer.h.0.attn.c_attn": LoraModule(torch.randn(2, 32), torch.randn(96, 2), 2.0)
    }
    hub.registry.register(
        LoraAdapter(gpt2_mods, base_model=BaseModelInfo("gpt2-tiny")), name="g", examples=PROMPTS
    )  # the best match for every prompt, but unusable here
    with pytest.warns(UserWarning, match="gpt2-tiny"):
        fresh = Hub(hub.registry, hub.base, Retriever(hub.registry))
    assert all("g" not in r.adapters for r in fresh.route(PROMPTS, k=3))


def test_a_hub_with_no_adapter_says_so(tmp_path: Path, embedder) -> None:
    reg = Registry(tmp_path, embedder=embedder)
    empty = Hub(
        reg, BaseModel("tiny-llama", build_model("llama"), char_tokenizer()), Retriever(reg)
    )
    (routing,) = empty.route(PROMPTS[:1])
    assert routing == Routing() and routing.note == "no adapter to route to"
    assert routing.decision == "base"
    reg.close()


def test_compose_none_with_routings_that_name_adapters_is_an_error(hub: Hub) -> None:
    routing = Routing(("arithmetic",), (1.0,))
    with pytest.raises(ValueError, match="compose='none'"):
        hub.generate(PROMPTS[:1], routings=[routing], compose="none")
    assert hub.generate(PROMPTS[:1], routings=[Routing()], compose="none", max_new_tokens=2)


def test_arrow_routes_by_name_and_equals_its_gate_applied_by_hand(hub: Hub) -> None:
    from lorahub import inference
    from lorahub.applied import attached
    from lorahub.inference import Sampling
    from router import ArrowConfig, arrow_gate, make_router

    arrow = Hub(hub.registry, hub.base, make_router("arrow", hub.registry))
    answers = arrow.generate(PROMPTS, k=2, max_new_tokens=6)
    assert all(a.routing.per_token == ArrowConfig(k=2) for a in answers)
    names = list(answers[0].routing.adapters)
    adapters = [hub.adapters.get(n) for n in names]
    gate = arrow_gate(adapters, ArrowConfig(k=2))
    with attached(hub.base.model, adapters, names, token_gate=gate) as applied:
        by_hand = inference.generate(hub.base, PROMPTS, applied, Sampling(6))
    assert [a.text for a in answers] == by_hand
    with pytest.raises(ValueError, match="per-token"):
        arrow.route(PROMPTS, compose="fusion")


REGISTER_ELSEWHERE = """
import sys, torch
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import SentenceEmbedder
mods = {"transformer.h.0.attn.c_attn": LoraModule(torch.randn(2, 32), torch.randn(96, 2), 2.0)}
with Registry(sys.argv[1], embedder=SentenceEmbedder()) as reg:
    adapter = LoraAdapter(mods, base_model=BaseModelInfo("gpt2-tiny"))
    reg.register(adapter, name="g", examples=sys.argv[2:])
"""


def test_an_adapter_for_another_base_registered_while_running_is_never_offered(hub: Hub) -> None:
    import subprocess
    import sys

    assert hub.route(PROMPTS, k=3)  # the hub has read the catalogue before the change
    subprocess.run(
        [sys.executable, "-c", REGISTER_ELSEWHERE, str(hub.registry.root), *PROMPTS], check=True
    )  # by another process: the best match for the prompts, but unusable here
    assert any(n == "g" for p in PROMPTS for n, _ in hub.registry.search(p, k=3))
    assert all("g" not in r.adapters for r in hub.route(PROMPTS, k=3))
    assert "g" in hub.catalogue().unfit and "g" not in hub.catalogue().usable
    with pytest.raises(BaseModelMismatchError, match="gpt2-tiny"):
        hub.usable("g")
    assert hub.base_models == ["tiny-llama"]


def test_an_adapter_replaced_while_running_is_applied_as_registered_now(hub: Hub) -> None:
    routings = [Routing(("arithmetic",), (1.0,))]
    before = hub.generate(PROMPTS[:1], routings=routings, max_new_tokens=6)[0].text
    new = hub.registry.register(adapter_for(hub.base.model, 7), name="arithmetic", replace=True)
    assert hub.usable("arithmetic").sha256 == new.sha256
    after = hub.generate(PROMPTS[:1], routings=routings, max_new_tokens=6)[0].text
    fresh = Hub(hub.registry, hub.base, Retriever(hub.registry))  # nothing cached
    assert after == fresh.generate(PROMPTS[:1], routings=routings, max_new_tokens=6)[0].text
    assert after != before


def test_a_router_that_names_a_removed_adapter_is_routed_again_without_it(
    hub: Hub, embedder
) -> None:
    from router import ClassifierRouter

    inputs = [x for ex in EXAMPLES.values() for x in ex]
    labels = [task for task, ex in EXAMPLES.items() for _ in ex]
    trained = Hub(hub.registry, hub.base, ClassifierRouter.fit(inputs, labels, embedder))
    assert trained.route(PROMPTS[:1], k=1, compose="selection")[0].adapters == ("arithmetic",)
    hub.registry.remove("arithmetic")  # the classifier still knows it as a class
    answers = trained.generate(PROMPTS, k=1, compose="selection", max_new_tokens=2)
    assert all(a.routing.adapters and "arithmetic" not in a.routing.adapters for a in answers)
