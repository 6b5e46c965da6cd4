"""lm-evaluation-harness as an outside oracle: its own `hf` model (and `hf` with `peft=`)
against the `loraplex` model, on BIG-bench-format tasks written as local harness tasks.

A tiny config-built Llama and a character tokenizer are saved to a folder that both
models load; the tasks are YAML + local JSONL in tmp_path (no Hub datasets)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, char_tokenizer, tiny_llama

lm_eval = pytest.importorskip("lm_eval")  # the `harness` extra, part of `test`
from lm_eval.tasks import TaskManager  # noqa: E402

from lorahub.evaluate import EvalConfig, evaluate  # noqa: E402
from lorahub.harness import LoraplexLM, main, write_task  # noqa: E402
from lorahub.hub import Hub  # noqa: E402
from lorahub.inference import normalize  # noqa: E402
from lorahub.tasks import Task, TaskKind, parse_bigbench  # noqa: E402
from registry import Registry  # noqa: E402

# the chat template of the tiny tokenizer: each turn on its own line, then the assistant's
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _numbers(n: int, op: str, fn) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(len(op))
    pairs = torch.randint(1, 50, (n, 2), generator=g).tolist()
    return [(a, b, fn(a, b)) for a, b in pairs]


# BIG-bench task.json bodies in the form of dev tasks (arithmetic, word sorting, ...)
TASKS = {
    "bb_arithmetic_mc": {
        "task_prefix": "Q: ",
        "examples": [
            {
                "input": f"What is {a} plus {b}?",
                "target_scores": {str(s): 1, str(s + 1): 0, str(s - 3): 0},
            }
            for a, b, s in _numbers(9, "plus", int.__add__)
        ],
    },
    "bb_sentiment_mc": {
        "examples": [
            {"input": f"{thing} was {word}.", "target_scores": {"positive": p, "negative": 1 - p}}
            for thing in ("The film", "Our dinner", "The trip")
            for word, p in (("wonderful", 1), ("awful", 0), ("bland", 0))
        ],
    },
    "bb_arithmetic_gen": {
        "examples": [
            {"input": f"What is {a} minus {b}?\nA:", "target": str(s)}
            for a, b, s in _numbers(9, "minus", int.__sub__)
        ],
    },
    "bb_word_sorting": {
        "examples": [
            {"input": f"Sort: {' '.join(words)}", "target": " ".join(sorted(words))}
            for words in (
                ["pear", "apple"],
                ["zeta", "beta", "eta"],
                ["dog", "cat", "ant"],
                ["fig", "kiwi"],
                ["yak", "ox", "emu"],
                ["red", "blue", "tan"],
            )
        ],
    },
}


def lora(model: torch.nn.Module):
    """A PEFT LoRA on every Llama projection with non-zero B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = FAMILIES["llama"][1]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), config).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A saved tiny Llama + tokenizer, a PEFT adapter for it registered in a registry, and
    the four tasks as harness tasks."""
    root = tmp_path_factory.mktemp("harness")
    tok = char_tokenizer()
    torch.manual_seed(0)
    # the vocabulary the tokenizer's size: `hf` with peft= resizes the embeddings otherwise
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=256).eval()
    tok.chat_template = CHAT
    base = root / "tiny-llama"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    adapter = root / "adapter"
    lora(model).save_pretrained(adapter)
    registry = root / "registry"
    reg = Registry(registry)
    reg.register(adapter, name="own")
    reg.close()
    tasks = root / "tasks"
    tasks.mkdir()
    parsed = [parse_bigbench(body, name) for name, body in TASKS.items()]
    for task in parsed:
        write_task(tasks, task)
    return {
        "base": base,
        "adapter": adapter,
        "registry": registry,
        "tasks": tasks,
        "parsed": parsed,
    }


def run(setup: dict, model, tasks=tuple(TASKS), **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=True,
        batch_size=4,
        device="cpu",
        **kwargs,
    )


def hf(setup: dict, **extra) -> dict:
    return {
        "model": "hf",
        "model_args": {"pretrained": str(setup["base"]), "dtype": "float32", **extra},
    }


def loraplex(setup: dict, **extra) -> LoraplexLM:
    return LoraplexLM(base_model=str(setup["base"]), registry=str(setup["registry"]), **extra)


def responses(out: dict, task: str) -> list:
    """Per request, what the model answered: a log-likelihood or a generated text."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [r for s in samples for resp in s["resps"] for r in resp]


def assert_same(ours: dict, theirs: dict) -> None:
    for task in TASKS:
        mine, ref = responses(ours, task), responses(theirs, task)
        assert len(mine) == len(ref) > 0
        for a, b in zip(mine, ref, strict=True):
            if isinstance(b, str):
                assert a == b, task
            else:  # (log-likelihood, is_greedy)
                assert math.isclose(float(a[0]), float(b[0]), abs_tol=1e-4), (task, a, b)
                assert bool(a[1]) == bool(b[1]), task
        metrics = {k: v for k, v in theirs["results"][task].items() if "stderr" not in k}
        for k, v in metrics.items():
            if isinstance(v, float):
                assert ours["results"][task][k] == pytest.approx(v), (task, k)


def test_compose_none_equals_the_harness_hf_model(setup: dict) -> None:
    theirs = run(setup, **hf(setup))
    ours = run(setup, loraplex(setup, compose="none"))
    assert_same(ours, theirs)
    # the tasks do run both request types
    assert isinstance(responses(ours, "bb_word_sorting")[0], str)
    assert len(responses(ours, "bb_arithmetic_mc")) == 3 * 9


def test_named_adapter_equals_hf_with_peft(setup: dict) -> None:
    theirs = run(setup, **hf(setup, peft=str(setup["adapter"])))
    ours = run(setup, loraplex(setup, adapter="own", compose="selection"))
    assert_same(ours, theirs)
    plain = run(setup, loraplex(setup, compose="none"), tasks=["bb_arithmetic_mc"])
    # the adapter changes the scores: the equality above is not the base model's twice
    assert responses(plain, "bb_arithmetic_mc") != responses(ours, "bb_arithmetic_mc")


def test_loraplex_lm_eval_runs_the_harness_cli(setup: dict, tmp_path: Path) -> None:
    args = f"base_model={setup['base']},registry={setup['registry']},adapter=own"
    tasks = ["--tasks", "bb_sentiment_mc", "--include_path", str(setup["tasks"])]
    where = ["--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path)]
    code = main(["--model", "loraplex", "--model_args", args, *tasks, *where])
    assert code == 0
    (written,) = tmp_path.glob("**/results_*.json")
    cli = json.loads(written.read_text())["results"]["bb_sentiment_mc"]
    direct = run(setup, loraplex(setup, adapter="own"), tasks=["bb_sentiment_mc"])
    assert cli["acc,none"] == direct["results"]["bb_sentiment_mc"]["acc,none"]
    assert main(["--model", "loraplex", "--no-such-flag", "x"]) == 2


def test_loraplex_eval_agrees_with_the_harness_on_the_same_split(
    setup: dict, tmp_path: Path
) -> None:
    """`lorahub.evaluate` (what `loraplex eval` runs) and the harness's `hf` model with
    --apply_chat_template, on the evaluated split: each item right or wrong alike, and the
    same first line generated. Agreeing needs the harness tasks written as loraplex reads
    them: the prompt in the chat template (one user turn), an option right after it (no
    target delimiter), the first line of the answer (until "\\n") compared without case
    and surrounding punctuation or spaces (`inference.normalize`)."""
    cfg = EvalConfig(protocol="iid", methods=("base",), limit=None, max_new_tokens=8)
    hub = Hub.open(str(setup["registry"]), base_model=str(setup["base"]))
    report = evaluate(hub, setup["parsed"], cfg, progress=False)
    split = [Task(t.name, t.kind, tuple(t.splits(cfg.split).test)) for t in setup["parsed"]]
    for task in split:
        write_task(tmp_path, task, max_gen_toks=cfg.max_new_tokens)
    theirs = lm_eval.simple_evaluate(
        **hf(setup),
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        apply_chat_template=True,
        log_samples=True,
        batch_size=4,
        device="cpu",
    )
    right = {(r["task"], r["prompt"]): r["right"] for r in report["routings"]}
    for task in split:
        mc = task.kind == TaskKind.multiple_choice
        metric = "acc" if mc else "exact_match"
        samples = sorted(theirs["samples"][task.name], key=lambda s: s["doc_id"])
        assert len(samples) == len(task.examples) >= 2
        for s in samples:
            assert right[(task.name, s["doc"]["input"][:200])] == bool(s[metric]), task.name
        ours = report["tasks"][task.name]["base"]["mc_acc" if mc else "em"]["value"]
        assert ours == pytest.approx(theirs["results"][task.name][f"{metric},none"])
        if not mc:  # right or wrong alike could be wrong alike: the texts agree too
            inputs = [s["doc"]["input"] for s in samples]
            texts = [a.text for a in hub.generate(inputs, compose="none", max_new_tokens=8)]
            assert [normalize(t) for t in texts] == [
                normalize(s["filtered_resps"][0]) for s in samples
            ]
    hub.close()


def test_local_completions_against_the_server_equals_the_native_model(setup: dict) -> None:
    from conftest import serving

    from lorahub.serve.app import ServeConfig, create_app
    from lorahub.serve.batching import BatchingConfig, BatchingEngine

    hub = Hub.open(str(setup["registry"]), base_model=str(setup["base"]))
    engine = BatchingEngine(hub, BatchingConfig())
    try:
        with serving(create_app(hub, engine, ServeConfig())) as url:
            # the harness's defaults, as a new user runs it: token-id prompt lists, and the
            # tokenizer from the server itself (its /tokenizer_info, /tokenize, /detokenize)
            args = {"base_url": f"{url}/v1/completions", "model": "own", "max_retries": 1}
            theirs = run(setup, "local-completions", model_args=args)
    finally:
        hub.close()
    assert_same(run(setup, loraplex(setup, adapter="own")), theirs)


def test_rolling_loglikelihood_over_windows_equals_hf(setup: dict) -> None:
    """Documents longer than the window (16 tokens) scored in the harness's disjoint
    windows, each document routed as one."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    docs = ["What is 12 plus 30? It is 42, and 42 minus 30 is 12.", "Sort: pear apple fig", "x"]
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    theirs = HFLM(pretrained=str(setup["base"]), max_length=16, batch_size=2, device="cpu")
    ours = loraplex(setup, compose="none", max_length=16, batch_size=2)
    expected = theirs.loglikelihood_rolling(requests, disable_tqdm=True)
    got = ours.loglikelihood_rolling(requests)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(docs[0]) > 2 * 16  # more than two windows


def test_a_templated_context_is_routed_on_its_user_turn(setup: dict) -> None:
    """With --apply_chat_template the harness hands over the templated string; the router
    must see what the user said, as `loraplex eval` and the server route it."""
    ours = loraplex(setup, router="retriever", k=1)
    routed: list[str] = []
    route = ours.hub.route
    ours.hub.route = lambda prompts, *a, **kw: routed.extend(prompts) or route(prompts, *a, **kw)
    rendered = ours.apply_chat_template([{"role": "user", "content": "What is 4 plus 9?"}])
    assert rendered != "What is 4 plus 9?"
    ours.routings([rendered, "a raw prompt"])
    assert routed == ["What is 4 plus 9?", "a raw prompt"]
