"""Routers: retrieval on a constructed set, exclusion and filters, Arrow prototypes and
gates against float64 SVD, classifier save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from composition import Composer
from registry import AdapterError, BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import (
    ArrowConfig,
    ClassifierRouter,
    Retriever,
    RetrieverConfig,
    Routing,
    arrow_gate,
    top_right_singular_vector,
)
from router.routing import softmax

TASKS = {
    "arithmetic": [
        "What is 17 plus 25?",
        "Compute 9 times 6.",
        "What is 100 minus 37?",
        "Add 45 and 12.",
        "Multiply 8 by 7.",
    ],
    "translation": [
        "Translate 'bonjour' to English.",
        "How do you say dog in Spanish?",
        "Translate 'thank you' into German.",
        "What is 'cat' in French?",
    ],
    "sentiment": [
        "I hated that movie, it was awful.",
        "What a wonderful, happy day!",
        "The service was terrible and slow.",
        "I love this phone so much.",
    ],
    "geography": [
        "What is the capital of France?",
        "Which river flows through Cairo?",
        "Which country is Nairobi in?",
        "What is the largest ocean?",
    ],
}
QUERIES = {
    "arithmetic": "What is 8 plus 13?",
    "translation": "Translate 'cat' into Italian.",
    "sentiment": "This restaurant was dreadful.",
    "geography": "What is the capital of Peru?",
}


def tiny_adapter(seed: int, base: str = "tiny") -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {"proj": LoraModule(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 2.0)},
        base_model=BaseModelInfo(base),
    )


@pytest.fixture
def registry(tmp_path: Path, embedder) -> Registry:
    reg = Registry(tmp_path, embedder=embedder)
    for i, (task, ex) in enumerate(TASKS.items()):
        reg.register(
            tiny_adapter(i, base="other" if task == "geography" else "tiny"),
            name=task,
            examples=ex[:3],
            tags=["nlp" if task != "arithmetic" else "math"],
        )
    yield reg
    reg.close()


def test_retrieval_returns_the_right_adapter(registry: Registry) -> None:
    routes = Retriever(registry).route(list(QUERIES.values()), k=1)
    assert [r.adapters[0] for r in routes] == list(QUERIES)


def test_weights_sum_to_one_uniform_and_softmax(registry: Registry) -> None:
    uniform = RetrieverConfig(k=3, weighting="uniform")
    for cfg in (RetrieverConfig(k=3), uniform, RetrieverConfig(k=3, temperature=0.1)):
        for r in Retriever(registry, cfg).route(list(QUERIES.values())):
            assert len(r.adapters) == 3 and sum(r.weights) == pytest.approx(1.0)
    uni = Retriever(registry, uniform).route(["What is 3 plus 4?"], k=2)[0]
    assert uni.weights == (0.5, 0.5) and uni.scores[0] >= uni.scores[1]
    soft = Retriever(registry).route(["What is 3 plus 4?"], k=2)[0]  # default: softmax / 0.02
    expected = np.exp(np.array(soft.scores, np.float64) / 0.02)
    assert soft.weights == pytest.approx(tuple(expected / expected.sum()), rel=1e-6)


def test_exclusion_and_filters(registry: Registry) -> None:
    retriever = Retriever(registry)
    prompts = list(QUERIES.values())
    routes = retriever.route(prompts, k=2, exclude_each=[[t] for t in QUERIES])
    for task, r in zip(QUERIES, routes, strict=True):
        assert task not in r.adapters and len(r.adapters) == 2
    assert "arithmetic" not in retriever.route(prompts, k=3, exclude=["arithmetic"])[0].adapters
    assert {a for r in retriever.route(prompts, k=4, tags=["math"]) for a in r.adapters} == {
        "arithmetic"
    }
    assert (
        "geography"
        not in retriever.route([QUERIES["geography"]], k=4, base_model="tiny")[0].adapters
    )


def test_k_larger_than_the_registry_returns_all(registry: Registry) -> None:
    r = Retriever(registry).route(["anything"], k=50)[0]
    assert sorted(r.adapters) == sorted(TASKS)


def test_empty_prompts_route_to_no_adapter_with_a_warning(registry: Registry) -> None:
    with pytest.warns(UserWarning, match="empty prompt"):
        routes = Retriever(registry).route(["   ", QUERIES["arithmetic"], ""], k=1)
    assert (
        routes[0] == Routing() and routes[2] == Routing() and routes[1].adapters == ("arithmetic",)
    )


def test_adapters_without_embeddings_are_skipped_with_a_warning(registry: Registry) -> None:
    registry.register(tiny_adapter(9), name="mystery")
    with pytest.warns(UserWarning, match="no embedding"):
        r = Retriever(registry).route(["What is 2 plus 2?"], k=10)[0]
    assert "mystery" not in r.adapters and len(r.adapters) == 4


def test_an_embedder_of_another_dimension_is_refused(registry: Registry) -> None:
    class Other:
        id, dim = registry.embedder.id, 16  # same id, different size: a corrupt setup

        def encode(self, texts):
            return np.ones((len(texts), 16), np.float32) / 4

    registry.embedder = Other()
    registry._index = None
    with pytest.raises(AdapterError, match="dimension"):
        Retriever(registry).route(["x"], k=1)


def test_routing_json_round_trip() -> None:
    r = softmax(["a", "b"], [0.9, 0.5], temperature=0.2)
    assert Routing.from_json(r.to_json()) == r and r.top(1).adapters == ("a",)
    assert (r.decision, r.top(1).decision, Routing().decision) == ("adapters", "adapters", "base")
    assert r.to_json()["decision"] == "adapters"
    with pytest.raises(ValueError, match="decision base with adapters"):
        Routing(("a",), (1.0,), decision="base")
    with pytest.raises(ValueError, match="decision broad with adapters \\(\\)"):
        Routing(decision="broad")
    with pytest.raises(ValueError, match="bogus"):
        Routing.from_json({"adapters": [], "decision": "bogus"})


# -- Arrow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_arrow_prototype_is_the_top_right_singular_vector(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(4, 20, generator=g), torch.randn(12, 4, generator=g)
    v = top_right_singular_vector(A, B)
    _, _, Vh = torch.linalg.svd(B.double() @ A.double())
    assert abs(float(v.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-6)


def test_arrow_gates_select_the_adapter_aligned_with_the_token() -> None:
    d = 8
    protos = torch.eye(d)[:3]  # adapter i's update acts along e_i
    adapters = [
        LoraAdapter({"proj": LoraModule(5 * p[None, :], torch.ones(6, 1), 1.0)}) for p in protos
    ]
    gate = arrow_gate(adapters, ArrowConfig(k=1, temperature=1.0))
    x = torch.zeros(1, 3, d)
    x[0, 0, 2], x[0, 1, 0], x[0, 2, 1] = 1.0, -3.0, 0.5
    gates = gate("proj", x)
    assert gates.argmax(-1).tolist() == [[2, 0, 1]] and torch.allclose(
        gates.sum(-1), torch.ones(1, 3)
    )


def test_arrow_runs_inside_the_composer_and_caches_prototypes(tmp_path: Path) -> None:
    class OneLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.proj(x)

    adapters = [tiny_adapter(i) for i in range(3)]
    with Registry(tmp_path) as reg:
        gate = arrow_gate(adapters, ArrowConfig(k=2), registry=reg)
        assert len(list((tmp_path / "cache").glob("arrow-*.safetensors"))) == 3
        again = arrow_gate(adapters, ArrowConfig(k=2), registry=reg)
    torch.testing.assert_close(gate.protos["proj"], again.protos["proj"])
    model = OneLayer()
    x = torch.randn(2, 4, 8)
    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(token_gate=gate):
        got = model(x)
    g = gate("proj", x).double()
    deltas = torch.stack([a.delta("proj", torch.float64) for a in adapters])
    expected = model.proj(x).double() + torch.einsum("btn,nod,btd->bto", g, deltas, x.double())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert int((g > 0).sum(-1).max()) == 2


# -- classifier ------------------------------------------------------------------------------------


def test_classifier_routes_and_round_trips_without_pickle(tmp_path: Path, embedder) -> None:
    inputs = [x for ex in TASKS.values() for x in ex]
    labels = [t for t, ex in TASKS.items() for _ in ex]
    router = ClassifierRouter.fit(inputs, labels, embedder)
    routes = router.route(list(QUERIES.values()), k=2)
    assert [r.adapters[0] for r in routes] == list(QUERIES)
    assert all(sum(r.weights) == pytest.approx(1.0) for r in routes)
    router.save(tmp_path / "clf")
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {
        "classifier.safetensors",
        "classifier.json",
    }
    loaded = ClassifierRouter.load(tmp_path / "clf", embedder)
    np.testing.assert_allclose(
        loaded.probabilities(list(QUERIES.values())),
        router.probabilities(list(QUERIES.values())),
        atol=1e-6,
    )


# -- retriever training -----------------------------------------------------------------------------


def test_batches_never_hold_two_pairs_of_one_adapter() -> None:
    from datasets import Dataset

    from router.training import DistinctLabelBatchSampler

    labels = [i % 5 for i in range(37)]
    data = Dataset.from_dict({"anchor": [str(i) for i in range(37)], "label": labels})
    sampler = DistinctLabelBatchSampler(data, batch_size=4, drop_last=False)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert all(len({labels[i] for i in b}) == len(b) for b in batches)


def test_trained_static_retriever_routes_and_loads_by_path(tmp_path: Path) -> None:
    from router import SentenceEmbedder
    from router.training import RetrieverTrainConfig, train_retriever

    cfg = RetrieverTrainConfig(epochs=5, batch_size=4, lr=5e-2, pairs_per_adapter=16)
    emb = train_retriever(TASKS, tmp_path / "static", base="static:all-MiniLM-L6-v2", config=cfg)
    assert (tmp_path / "static" / "modules.json").exists()
    again = SentenceEmbedder(model=str(tmp_path / "static"))
    np.testing.assert_allclose(
        again.encode(["What is 1 plus 1?"]), emb.encode(["What is 1 plus 1?"]), atol=1e-6
    )
    with Registry(tmp_path / "reg", embedder=emb) as reg:
        for i, (task, ex) in enumerate(TASKS.items()):
            reg.register(tiny_adapter(i), name=task, examples=ex)
        routes = Retriever(reg).route(list(QUERIES.values()), k=1)
    assert sum(r.adapters[0] == t for r, t in zip(routes, QUERIES, strict=True)) >= 3


def test_arrow_routes_by_name_with_its_per_token_spec_and_exclusions(registry) -> None:
    from router import ArrowConfig, make_router

    router = make_router("arrow", registry)
    routes = router.route(["anything", "else"], k=2, exclude_each=[["arithmetic"], []])
    assert all(r.per_token == ArrowConfig(k=2) for r in routes)
    assert "arithmetic" not in routes[0].adapters and "arithmetic" in routes[1].adapters
    assert set(routes[1].adapters) == set(registry.names())
    assert Routing.from_json(routes[0].to_json()) == routes[0]
    with pytest.raises(ValueError, match="choose from"):
        make_router("nope", registry)


# -- task router ---------------------------------------------------------------------------------


def test_task_router_neighbour_fit_is_the_mean_of_each_adapters_nearest_examples(
    registry,
) -> None:
    from sklearn.linear_model import LogisticRegression

    from router import TaskRouter, TaskRouterConfig

    router = TaskRouter(
        registry,
        TaskRouterConfig(
            fit="neighbours", neighbours=2, fit_threshold=-1.0, broad_threshold=-1.0, C=3.0
        ),
    )
    prompts = list(QUERIES.values())
    scores = router.scores(prompts)
    names, table, prob = scores.names, scores.neighbour, scores.prob
    emb = registry.embedder
    q = emb.encode(prompts).astype(np.float64)
    for j, name in enumerate(names):  # float64 oracle: top-2 cosines of the adapter's examples
        ex = emb.encode(TASKS[name][:3]).astype(np.float64)
        want = np.sort(q @ ex.T, axis=1)[:, -2:].mean(1)
        np.testing.assert_allclose(table[:, j], want, atol=1e-5)
    # the weights are a logistic regression's probabilities over the adapters' examples
    X = np.concatenate([emb.encode(TASKS[n][:3]) for n in names])
    y = np.repeat(np.arange(len(names)), 3)
    oracle = LogisticRegression(C=3.0, max_iter=1000).fit(X, y).predict_proba(emb.encode(prompts))
    np.testing.assert_allclose(prob, oracle, atol=1e-3)
    routed = router.route(prompts, k=2)
    for row, ((task, _), r) in enumerate(zip(QUERIES.items(), routed, strict=True)):
        assert r.adapters[0] == task and r.confidence == pytest.approx(table[row].max())
        assert sum(r.weights) == pytest.approx(1.0)
        assert r.weights[0] / r.weights[1] == pytest.approx(
            prob[row, names.index(r.adapters[0])] / prob[row, names.index(r.adapters[1])]
        )


def test_task_router_background_fit_is_one_minus_the_none_class(registry) -> None:
    from sklearn.linear_model import LogisticRegression

    from router import TaskRouter, TaskRouterConfig
    from router.background import background_texts

    router = TaskRouter(registry, TaskRouterConfig(fit_threshold=-1.0, broad_threshold=-1.0))
    prompts = list(QUERIES.values())
    scores = router.scores(prompts)
    emb = registry.embedder
    X = np.concatenate([emb.encode(TASKS[n][:3]) for n in scores.names])
    X = np.concatenate([X, emb.encode(list(background_texts()))])
    y = np.concatenate(
        [
            np.repeat(np.arange(len(scores.names)), 3),
            [len(scores.names)] * (len(X) - 3 * len(scores.names)),
        ]
    )
    oracle = (
        LogisticRegression(C=100.0, max_iter=1000, class_weight="balanced")
        .fit(X, y)
        .predict_proba(emb.encode(prompts))
    )
    np.testing.assert_allclose(scores.p_none, oracle[:, -1], atol=2e-3)
    routed = router.route(prompts, k=2)
    for row, r in enumerate(routed):
        assert r.confidence == pytest.approx(1 - scores.p_none[row])


def test_task_router_sends_greetings_and_gibberish_to_the_base_model(registry) -> None:
    from router import TaskRouter

    router = TaskRouter(registry)  # the shipped defaults and background
    chat = ["hello", "asdkjh qwe zxcv", "😀😀😀", "Write a haiku about the sea."]
    for prompt, r in zip(chat, router.route(chat, k=3), strict=True):
        assert r.adapters == () and "no adapter fits" in r.note, (prompt, r)
        assert r.confidence < router.config.fit_threshold
    # chat-shaped arithmetic and translation requests belong to the background's chat
    # tuning set now; a review and a geography question still find their adapters
    in_task = router.route([QUERIES["sentiment"], QUERIES["geography"]], k=3)
    assert [r.adapters[0] for r in in_task] == ["sentiment", "geography"]
    assert all(r.confidence >= router.config.fit_threshold for r in in_task)


@pytest.mark.parametrize("fit", ["background", "neighbours"])
def test_task_router_abstains_below_its_threshold_and_says_why(registry, fit) -> None:
    from router import TaskRouter, TaskRouterConfig, make_router
    from router.routers import RouterOptions

    always = TaskRouter(registry, TaskRouterConfig(fit=fit, fit_threshold=-1.0))
    fits = always.route([QUERIES["arithmetic"], "zzqx vlorp"], k=1)
    threshold = (fits[0].confidence + fits[1].confidence) / 2
    assert fits[0].confidence > fits[1].confidence  # an in-domain prompt fits better
    picky = make_router(
        "task", registry, RouterOptions(task=TaskRouterConfig(fit=fit, fit_threshold=threshold))
    )
    kept, dropped = picky.route([QUERIES["arithmetic"], "zzqx vlorp"], k=1)
    assert kept.adapters == ("arithmetic",)
    assert dropped.adapters == () and "no adapter fits" in dropped.note
    assert (kept.decision, dropped.decision) == ("adapters", "base")
    assert dropped.confidence == pytest.approx(fits[1].confidence)
    again = Routing.from_json(dropped.to_json())
    told = ("note", "confidence", "decision")
    assert [getattr(again, f) for f in told] == [getattr(dropped, f) for f in told]
    unsure = make_router(
        "task",
        registry,
        RouterOptions(
            task=TaskRouterConfig(fit=fit, fit_threshold=-1.0, broad_threshold=threshold)
        ),
    )
    kept, broad = unsure.route([QUERIES["arithmetic"], "zzqx vlorp"], k=2)
    assert kept.adapters[0] == "arithmetic" and len(kept.adapters) == 2  # sure: the top k
    wide = min(TaskRouterConfig().broad_k, len(TASKS), 2)  # unsure: the likeliest, equally
    assert len(broad.adapters) == wide and set(broad.adapters) <= set(TASKS)
    assert "unsure" in broad.note and broad.weights == pytest.approx([1 / wide] * wide)
    assert broad.decision == "broad" and Routing.from_json(broad.to_json()).decision == "broad"
    assert len(unsure.route(["zzqx vlorp"], k=1)[0].adapters) == 1  # selection picks one
    with pytest.raises(ValueError, match="fit_threshold"):
        TaskRouterConfig(fit_threshold=2.0)
    with pytest.raises(ValueError, match="choose from"):
        TaskRouterConfig(fit="nearest")


def test_the_unsure_regime_mixes_at_most_broad_k_adapters(registry) -> None:
    from router import TaskRouter, TaskRouterConfig

    unsure = TaskRouterConfig(fit_threshold=-1.0, broad_threshold=1.0, broad_k=2)
    routed = TaskRouter(registry, unsure).route([*QUERIES.values(), "zzqx vlorp"], k=4)
    for r in routed:  # 4 adapters registered and 4 asked for: the bound still holds
        assert len(r.adapters) == 2 and r.weights == pytest.approx([0.5, 0.5])
        assert "unsure" in r.note and r.decision == "broad"
    wide = TaskRouterConfig(fit_threshold=-1.0, broad_threshold=1.0, broad_k=3)
    for r in TaskRouter(registry, wide).route([*QUERIES.values()], k=2):
        assert len(r.adapters) == 2  # nor more than the caller's k
    assert TaskRouterConfig().broad_k < len(TASKS) + 1  # the default is a bound, not the pool
    with pytest.raises(ValueError, match="broad_k"):
        TaskRouterConfig(broad_k=0)


def test_below_its_fit_threshold_the_router_composes_where_composing_helped_nearby_tasks(
    registry,
) -> None:
    from registry.embedding import examples_key
    from router import TaskRouter, TaskRouterConfig
    from router.background import background_gains, background_texts, shipped_vectors

    prompts = ["hello", "What is 98765 minus 12345?", "zzqx vlorp", QUERIES["sentiment"]]
    scores = TaskRouter(registry).scores(prompts)
    # oracle: the mean measured gain of each prompt's nearest background inputs
    vectors = shipped_vectors(examples_key(registry.embedder, background_texts())).numpy()
    m = TaskRouterConfig().gain_neighbours
    nearest = np.argsort(-(registry.embedder.encode(prompts) @ vectors.T), axis=1)[:, :m]
    np.testing.assert_allclose(scores.gain, np.asarray(background_gains())[nearest].mean(1), 1e-6)
    assert np.ptp(scores.gain) > 0  # the shipped gains tell these prompts apart
    # nothing fits (fit_threshold 1): each prompt composes iff its gain clears the threshold
    threshold = float(np.median(scores.gain))
    cfg = TaskRouterConfig(fit_threshold=1.0, gain_threshold=threshold)
    for r, gain, prob in zip(
        TaskRouter(registry, cfg).route(prompts, k=2), scores.gain, scores.prob, strict=True
    ):
        assert r.confidence < 1.0
        if gain >= threshold:
            top = np.argsort(-prob)[:2]
            assert r.adapters == tuple(scores.names[j] for j in top), r
            assert r.weights == pytest.approx(prob[top] / prob[top].sum(), rel=1e-5)
            assert r.note.startswith("helped") and f"{gain:+.2f}" in r.note
            assert r.decision == "helped"
        else:
            assert r.adapters == () and r.note.startswith("no adapter fits"), r
            assert r.decision == "base"


def test_the_shipped_background_is_the_tuning_half_of_the_open_world_split() -> None:
    import json

    from router.background import BACKGROUND_PATH

    root = Path(__file__).parents[1]
    split = json.loads((root / "benchmarks/results/openworld/split.json").read_text())
    rows = [json.loads(ln) for ln in BACKGROUND_PATH.read_text().splitlines() if ln.strip()]
    tasks = {r["task"] for r in rows if not r["task"].startswith("chat/")}
    assert tasks == set(split["tuning"])  # every tuning-half task, and the chat tuning set
    assert not tasks & (set(split["reporting"]) | set(split["zoo"]) | set(split["unseen"]))
    from lorahub.tasks import dev_tasks

    assert tasks <= dev_tasks()
    assert '"data/background.jsonl"' in (root / "pyproject.toml").read_text()  # shipped


def test_task_router_defaults_are_the_open_world_tuning_choice() -> None:
    import json

    from router import TaskRouterConfig

    results = Path(__file__).parents[1] / "benchmarks/results/openworld"
    default = TaskRouterConfig()
    assert default.fit == "background"
    for tuned in ("tune.json", "tune_gains.json"):  # thresholds, then the helped regime
        chosen = json.loads((results / tuned).read_text())["chosen"]
        assert {name: getattr(default, name) for name in chosen} == chosen


def test_task_router_honours_exclusions_and_caches_example_embeddings(
    registry, monkeypatch
) -> None:
    from router import TaskRouter, TaskRouterConfig

    router = TaskRouter(registry, TaskRouterConfig(fit_threshold=-1.0, broad_threshold=-1.0))
    prompts = [QUERIES["arithmetic"], QUERIES["sentiment"]]
    out = router.route(prompts, k=3, exclude_each=[["arithmetic"], []])
    assert "arithmetic" not in out[0].adapters and out[1].adapters[0] == "sentiment"
    cached = sorted((registry.root / "cache").glob("examples-*.safetensors"))
    # the adapters' (made at registration) and, unless this process embedded it before, the
    # background's
    assert len(cached) in (len(TASKS), len(TASKS) + 1)
    (fit,) = (registry.root / "cache").glob("task-router-*.safetensors")
    calls, original = [], registry.embedder.encode
    monkeypatch.setattr(
        registry.embedder, "encode", lambda texts: calls.append(len(texts)) or original(texts)
    )
    TaskRouter(registry, TaskRouterConfig(fit_threshold=-1.0)).route(prompts, k=1)
    assert calls == [2]  # a new router embeds only the prompts: the rest comes from the cache
    # a changed background is embedded and fitted anew
    monkeypatch.setattr("router.task.background_texts", lambda: ("hello there", "zzqx"))
    TaskRouter(registry, TaskRouterConfig(fit_threshold=-1.0)).route(prompts, k=1)
    assert calls == [2, 2, 2]
    fits = list((registry.root / "cache").glob("task-router-*.safetensors"))
    assert len(fits) == 1 and fits[0] != fit  # fitted anew; the old background's fit gone


def test_task_router_with_one_or_no_adapter(tmp_path: Path, embedder) -> None:
    from router import TaskRouter, TaskRouterConfig

    with Registry(tmp_path, embedder=embedder) as reg:
        router = TaskRouter(reg, TaskRouterConfig(fit_threshold=-1.0, broad_threshold=-1.0))
        assert router.route(["What is 8 plus 13?"])[0].adapters == ()
        reg.register(tiny_adapter(0), name="math", examples=TASKS["arithmetic"][:3])
        (only,) = router.route(["What is 8 plus 13?"], k=3)
        assert only.adapters == ("math",) and only.weights == (1.0,) and only.confidence > 0


def _synthetic_pool(n: int, d: int = 384, m: int = 64, seed: int = 0):
    """n adapters as random unit directions, each with m example vectors scattered about
    it: -> (names, (n, m, d) unit examples)."""
    from router.heads import unit

    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n, d)))
    examples = unit(centres[:, None] + 0.08 * rng.standard_normal((n, m, d)))
    return [f"a{i:05d}" for i in range(n)], examples


def _table(names, examples, **shortlist):
    from router.heads import HeadTable, ShortlistConfig, shared_precision

    rng = np.random.default_rng(1)  # a background of 20 tasks x 30 inputs
    bg = rng.standard_normal((600, examples.shape[2])).astype(np.float32)
    table = HeadTable(
        shared_precision(bg, np.repeat(np.arange(20), 30), 0.1), ShortlistConfig(**shortlist)
    )
    table.sync({n: f"v{i}" for i, n in enumerate(names)}, lambda n: examples[names.index(n)])
    return table


def test_a_shortlist_over_2000_adapters_picks_the_exact_top1_on_their_own_examples() -> None:
    names, examples = _synthetic_pool(2000)
    table = _table(names, examples, candidates=64, hnsw_above=1000)  # HNSW at 2,000
    queries = examples[:, :2].reshape(-1, examples.shape[2])  # 2 own examples per adapter
    exact = (queries @ table.coef.T + table.intercept).argmax(1)  # every adapter's head
    short = table.shortlist(queries)
    assert short.shape == (len(queries), 64)
    picked = np.take_along_axis(short, table.logits(queries, short).argmax(1)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(picked, exact)
    assert (exact == np.repeat(np.arange(len(names)), 2)).mean() > 0.99  # and it is the own


def test_adding_or_removing_one_adapter_fits_no_other_head() -> None:
    names, examples = _synthetic_pool(300, m=8)
    table = _table(names[:-1], examples[:-1], candidates=16)
    assert table.fitted == 299
    before = dict(zip(table.names, table.coef.copy(), strict=True))
    keys = {n: f"v{i}" for i, n in enumerate(names)}
    table.sync(keys, lambda n: examples[names.index(n)])
    assert table.fitted == 300 and table.names[-1] == names[-1]  # one head more
    for n, w in zip(table.names, table.coef, strict=True):
        if n in before:
            np.testing.assert_array_equal(w, before[n])  # the others untouched
    del keys[names[0]]
    table.sync(keys, lambda n: pytest.fail("no head is fitted on a removal"))
    assert table.fitted == 300 and names[0] not in table.names and len(table.names) == 299
    assert names[0] not in {table.names[i] for i in table.shortlist(examples[0, :1])[0]}


def test_past_its_candidates_the_task_router_fits_one_head_per_new_adapter_and_keeps_them(
    registry,
) -> None:
    from router import TaskRouter, TaskRouterConfig
    from router.heads import ShortlistConfig

    cfg = TaskRouterConfig(
        fit_threshold=-1.0, broad_threshold=-1.0, shortlist=ShortlistConfig(candidates=2)
    )
    router = TaskRouter(registry, cfg)
    prompts = list(QUERIES.values())
    cache = registry.root / "cache"
    cache.mkdir(exist_ok=True)
    stale = cache / "task-heads-0123456789abcdef-of-an-older-format.safetensors"
    save_file({"coef": torch.zeros(1)}, stale)
    first = router.route(prompts, k=1)
    assert not stale.exists()  # a table no router reads any more does not stay on disk
    assert router._table.fitted == len(TASKS)
    assert [r.adapters[0] for r in first] == list(QUERIES)
    assert all(0.0 <= r.confidence <= 1.0 and len(r.scores) == 1 for r in first)
    registry.register(tiny_adapter(9), name="poetry", examples=["Write a poem about rain."])
    again = router.route([*prompts, "Write a poem about the sun."], k=1)
    assert router._table.fitted == len(TASKS) + 1  # only the new adapter's head
    assert len(list(cache.glob("task-heads-*"))) == 1  # the old one gone, nothing else
    assert len(list(cache.glob("*.safetensors"))) == len(TASKS) + 2  # 5 example sets, 1 table
    assert [r.adapters[0] for r in again] == [*QUERIES, "poetry"]
    restarted = TaskRouter(registry, cfg)
    assert restarted.route(prompts, k=1) == first[:4]
    assert restarted._table.fitted == 0  # its heads came from the registry's cache


def test_up_to_its_candidates_the_task_router_uses_the_one_classifier(registry) -> None:
    from router import TaskRouter, TaskRouterConfig

    router = TaskRouter(registry, TaskRouterConfig(fit_threshold=-1.0, broad_threshold=-1.0))
    router.route(list(QUERIES.values()), k=2)
    assert router._table is None and len(TASKS) <= TaskRouterConfig().shortlist.candidates
    registry.register(tiny_adapter(9), name="poetry", examples=["Write a poem about rain."])
    assert router.route(["Write a poem about the sun."], k=1)[0].adapters == ("poetry",)
    fits = list((registry.root / "cache").glob("task-router-*"))
    assert len(fits) == 1  # the classifier of the catalogue before is not kept


def test_heads_scores_stay_finite_when_one_side_wins_by_hundreds_of_nats() -> None:
    from router.heads import rescored, score

    names, examples = _synthetic_pool(80, m=4)
    table = _table(names, examples, candidates=8)
    q = examples[:3, 0]
    d = q.shape[1]
    for bias, none_wins in ((1e3, True), (-1e3, False)):
        none = (np.zeros((2, d), np.float32), np.full(2, bias, np.float32))
        cand, prob, p_none = score(table, none, q)
        assert np.isfinite(prob).all() and np.allclose(prob.sum(1), 1.0)
        np.testing.assert_allclose(p_none, 1.0 if none_wins else 0.0, atol=1e-6)
        z = rescored(table, q, cand, table.logits(q, cand).astype(np.float64))
        assert (z.argmax(1) == prob.argmax(1)).all()


def test_a_router_sees_an_adapter_re_registered_through_another_router(registry) -> None:
    """Two routers on one registry: when one writes the table of a changed catalogue, the
    other restores it rather than keep its own stale heads."""
    from router import TaskRouter, TaskRouterConfig
    from router.heads import TENSORS, ShortlistConfig

    cfg = TaskRouterConfig(
        fit_threshold=-1.0, broad_threshold=-1.0, shortlist=ShortlistConfig(candidates=2)
    )
    first, second = TaskRouter(registry, cfg), TaskRouter(registry, cfg)
    first.route(["What is 8 plus 13?"])
    registry.register(
        tiny_adapter(1), name="translation", examples=["Write a poem about rain."], replace=True
    )
    second.route(["What is 8 plus 13?"])
    (poem,) = first.route(["Write a poem about the sun."], k=1)
    assert first._table.keys == second._table.keys
    for tensor in TENSORS:
        np.testing.assert_array_equal(getattr(first._table, tensor), getattr(second._table, tensor))
    assert poem.adapters == ("translation",)


def test_local_logits_equal_lda_under_the_candidates_pooled_spread_in_float64() -> None:
    """The Woodbury path against a dense float64 oracle, in the shared covariance's
    whitened coordinates: LDA with the covariance lam * I + alpha * (the candidates'
    pooled rank-r scatter + the trace it leaves out spread evenly), for adapters with
    fewer examples than directions kept and with more."""
    from router.heads import HeadTable, ShortlistConfig, local_logits, shared_precision

    d, rank, rng = 24, 4, np.random.default_rng(0)
    counts = {"a": 3, "b": 10, "c": 30, "d": 7}
    pool = {n: rng.standard_normal((c, d)) * rng.uniform(0.2, 2.0, d) for n, c in counts.items()}
    bg = rng.standard_normal((600, d)) * rng.uniform(0.5, 1.5, d)
    cfg = ShortlistConfig(rank=rank, local_prior=40.0)
    table = HeadTable(shared_precision(bg, np.repeat(np.arange(20), 30), 0.1), cfg)
    table.sync({n: n for n in pool}, lambda n: pool[n].astype(np.float32))
    ids = np.arange(4)
    queries = rng.standard_normal((5, d)).astype(np.float32)
    head = (queries @ table.coef.T + table.intercept).astype(np.float64)
    got = local_logits(table, ids, queries.astype(np.float64) @ table.root(), head)

    root = np.linalg.cholesky(table.precision)
    n = sum(counts.values())
    lam = max(cfg.local_shrink, cfg.local_prior / (cfg.local_prior + n))
    alpha = (1 - lam) / (n - len(ids))
    scatter, means = np.zeros((d, d)), []
    for x in pool.values():
        white = x.astype(np.float32).astype(np.float64) @ root
        centred = white - white.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        kept = (s[:rank, None] * vt[:rank]).T @ (s[:rank, None] * vt[:rank])
        scatter += kept + (np.trace(centred.T @ centred) - np.trace(kept)) / d * np.eye(d)
        means.append(white.mean(0))
    inverse = np.linalg.inv(lam * np.eye(d) + alpha * scatter)
    means = np.array(means)
    u = queries.astype(np.float64) @ root
    want = u @ inverse @ means.T - 0.5 * np.einsum("ad,de,ae->a", means, inverse, means)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert not np.allclose(got, head, rtol=0.05)  # it is not the heads' own answer


def test_an_adapters_spread_is_its_best_low_rank_scatter_with_few_or_many_examples() -> None:
    from router.heads import spread

    rng = np.random.default_rng(0)
    for n in (1, 3, 64, 500):  # fewer examples than dimensions, and more
        x = rng.standard_normal((n, 40)).astype(np.float32)
        x64 = x.astype(np.float64)
        centred = x64 - x64.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        want = (s[:8, None] * vt[:8]).T @ (s[:8, None] * vt[:8])
        got, leftover = spread(x, 8)
        assert got.shape == (8, 40)
        np.testing.assert_allclose(got.T @ got, want, atol=1e-9)
        np.testing.assert_allclose(leftover, (s[8:] ** 2).sum(), atol=1e-8)


def test_prompts_sharing_a_candidate_set_in_any_order_are_rescored_as_one_at_a_time() -> None:
    from router.heads import rescored

    names, examples = _synthetic_pool(30, d=32, m=12)
    table = _table(names, examples, rescore=4)
    rng = np.random.default_rng(5)
    queries = examples[:6, 0]
    cand = np.stack([rng.permutation(10) for _ in range(6)])  # one set, orders differ
    z = (np.einsum("pd,pkd->pk", queries, table.coef[cand]) + table.intercept[cand]).astype(
        np.float64
    )
    together = rescored(table, queries, cand, z)
    alone = np.concatenate(
        [
            rescored(table, q[None], c[None], r[None])
            for q, c, r in zip(queries, cand, z, strict=True)
        ]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-12, atol=1e-9)
    assert not np.allclose(together, z)


def test_rescoring_reorders_the_likeliest_candidates_but_keeps_their_mass() -> None:
    from router.heads import score

    names, examples = _synthetic_pool(80, d=32, m=12)
    q = examples[:, 0] + 0.05 * np.random.default_rng(3).standard_normal(examples[:, 0].shape)
    d = q.shape[1]
    none = (np.zeros((2, d), np.float32), np.zeros(2, np.float32))
    plain = _table(names, examples, candidates=16, rescore=0)
    local = _table(names, examples, candidates=16, rescore=4)
    cand0, prob0, none0 = score(plain, none, q)
    cand1, prob1, none1 = score(local, none, q)
    np.testing.assert_array_equal(cand0, cand1)
    np.testing.assert_allclose(none1, none0, rtol=1e-9)  # P(none): the decision stays
    top = np.argsort(-prob0, axis=1)[:, :4]
    for p0, p1, t in zip(prob0, prob1, top, strict=True):
        np.testing.assert_allclose(p1[t].sum(), p0[t].sum(), rtol=1e-9)
        rest = np.setdiff1d(np.arange(16), t)
        np.testing.assert_allclose(p1[rest], p0[rest], rtol=1e-9)
    assert not np.allclose(prob0, prob1)


def test_rescoring_tells_apart_siblings_that_the_shared_covariance_confuses() -> None:
    """Two sibling tasks whose means differ a little along e0 and whose examples spread
    widely along (e0 + e1) / sqrt(2). The shared covariance (an isotropic background)
    reads e0 alone, swamped by that spread; the candidates' own spread shows that e0 - e1
    separates them."""
    from router.heads import HeadTable, ShortlistConfig, score, shared_precision

    d, rng = 16, np.random.default_rng(0)
    e, v = np.eye(d), (np.eye(d)[0] + np.eye(d)[1]) / np.sqrt(2)
    bg = 0.05 * rng.standard_normal((400, d))

    def examples(mean: np.ndarray, n: int) -> np.ndarray:
        along = rng.standard_normal((n, 1)) * v
        return (mean + along + 0.01 * rng.standard_normal((n, d))).astype(np.float32)

    pool = {"four": examples(0.1 * e[0], 1000), "five": examples(-0.1 * e[0], 1000)}
    pool |= {f"other{i}": examples(5 * e[2 + i], 16) for i in range(6)}
    queries = np.concatenate([examples(0.1 * e[0], 100), examples(-0.1 * e[0], 100)])
    want = np.repeat([0, 1], 100)
    none = (np.zeros((1, d), np.float32), np.full(1, -1e4, np.float32))
    right = {}
    for rescore in (0, 2):
        precision = shared_precision(bg, np.repeat(np.arange(20), 20), 0.1)
        table = HeadTable(precision, ShortlistConfig(rescore=rescore))
        table.sync({n: n for n in pool}, pool.__getitem__)
        cand, prob, _ = score(table, none, queries)
        right[rescore] = (cand[np.arange(200), prob.argmax(1)] == want).mean()
    assert right[0] < 0.75 and right[2] > 0.95, right
