"""BIG-bench / JSONL task loading, the dev-list rule, and LoRA(+) training."""

from __future__ import annotations

import copy
import functools
import http.server
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from composition import Composer
from lorahub.models import BaseModel
from lorahub.tasks import (
    SPLITS,
    Example,
    SplitConfig,
    Task,
    TaskError,
    TaskKind,
    dev_tasks,
    example_id,
    fetch_bigbench,
    load_jsonl,
    load_task,
    require_dev_task,
)
from lorahub.train import TrainConfig, batch_for_step, save_adapter, train_lora
from registry import load_source


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_bigbench_generative_task(tmp_path: Path) -> None:
    path = write(
        tmp_path / "add" / "task.json",
        {
            "name": "add",
            "description": "add numbers",
            "task_prefix": "Q: ",
            "examples": [
                {"input": "1+1=", "target": "2"},
                {"input": "2+2=", "target": ["4", "four"]},
            ],
        },
    )
    task = load_task(path)
    assert task.kind == TaskKind.generative and task.name == "add"
    assert task.examples[0].input == "Q: 1+1=" and task.examples[1].targets == ("4", "four")
    assert task.examples[1].target == "4"


def test_bigbench_multiple_choice_task(tmp_path: Path) -> None:
    write(
        tmp_path / "fam" / "sub" / "task.json",
        {
            "examples": [{"input": "Sky color?", "target_scores": {"green": 0, "blue": 1}}],
        },
    )
    task = load_task("fam/sub", tasks_dir=tmp_path)
    ex = task.examples[0]
    assert (
        task.kind == TaskKind.multiple_choice and ex.options == ("green", "blue") and ex.answer == 1
    )
    assert ex.input == "Sky color?\n  choice: green\n  choice: blue" and ex.target == "blue"


def test_jsonl_tasks_and_their_errors(tmp_path: Path) -> None:
    (tmp_path / "gen.jsonl").write_text('{"input": "a", "target": "b"}\n')
    (tmp_path / "mc.jsonl").write_text('{"input": "a", "options": ["x", "y"], "answer": 1}\n')
    assert load_jsonl(tmp_path / "gen.jsonl").kind == TaskKind.generative
    assert load_jsonl(tmp_path / "mc.jsonl").examples[0].target == "y"
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "options": ["x"], "answer": 3}\n')
    with pytest.raises(TaskError, match=r"bad\.jsonl:1"):
        load_jsonl(tmp_path / "bad.jsonl")


def test_only_dev_tasks_may_be_trained_on() -> None:
    require_dev_task("arithmetic/1_digit_addition")
    with pytest.raises(TaskError, match="held out"):
        require_dev_task("arithmetic/2_digit_addition")  # not on the dev list
    shared = Path(__file__).parents[2] / "shared" / "bigbench_dev_tasks.txt"
    if shared.exists():  # the packaged copy is the project's list
        assert dev_tasks() == {ln.strip() for ln in shared.read_text().splitlines() if ln.strip()}


@pytest.mark.parametrize("n", [12, 40, 700])
def test_splits_are_disjoint_by_input_even_when_inputs_repeat(n: int) -> None:
    # BIG-bench logical_deduction repeats each puzzle: a copy in train would leak the answer
    examples = tuple(Example(f"q{i % (n // 7 + 3)}", targets=(str(i),)) for i in range(n))
    task = Task("dup", TaskKind.generative, examples)
    cfg = SplitConfig(n_validation=5, n_test=6, max_train=20, seed=1)
    splits = task.splits(cfg)
    inputs = {name: [ex.input for ex in getattr(splits, name)] for name in SPLITS}
    distinct = len({ex.input for ex in examples})
    assert len(inputs["validation"]) == len(set(inputs["validation"])) <= min(5, distinct // 3)
    assert len(inputs["test"]) == len(set(inputs["test"])) == min(6, distinct // 3)
    assert inputs["train"] and len(inputs["train"]) <= 20
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not set(inputs[a]) & set(inputs[b]), (a, b)
    ids = splits.ids()
    assert ids["test"] == [example_id(ex) for ex in splits.test]
    assert task.splits(cfg) == splits  # seeded
    assert task.splits(replace(cfg, seed=2)) != splits


def test_train_is_the_same_whatever_the_test_size_when_the_task_is_large() -> None:
    # the zoo's adapters were trained before test was cut from the far end: train must not move
    examples = tuple(Example(f"q{i}", targets=("a",)) for i in range(1000))
    task = Task("big", TaskKind.generative, examples)
    assert task.splits(SplitConfig(n_test=50)).train == task.splits(SplitConfig(n_test=30)).train


def test_a_tampered_bigbench_sdist_is_refused(tmp_path: Path, monkeypatch) -> None:
    index = tmp_path / "index"
    (index / "bigbench").mkdir(parents=True)
    (index / "bigbench" / "bigbench-1.0.0.tar.gz").write_bytes(b"not the real sdist")
    (index / "bigbench" / "index.html").write_text('<a href="bigbench-1.0.0.tar.gz">x</a>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(index))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/")
    try:
        with pytest.raises(TaskError, match="sha256"):
            fetch_bigbench(["arithmetic/1_digit_addition"], cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
    assert not list((tmp_path / "cache").rglob("*.tar.gz"))  # nothing unverified is kept


def test_resumed_runs_see_the_same_batches() -> None:
    assert batch_for_step(10, 7, 4, seed=3) == batch_for_step(10, 7, 4, seed=3)
    assert sorted(i for s in range(5) for i in batch_for_step(20, s, 4, 0)) == list(range(20))


def tiny_base() -> BaseModel:
    """A tiny Llama whose output layer can express peaked distributions (the default
    init scale of 0.02 caps every logit near 0 at this width, so no adapter could)."""
    torch.manual_seed(0)
    return BaseModel(
        "tiny-llama", tiny_llama(initializer_range=0.3).eval(), char_tokenizer("right")
    )


REVERSE = [
    Example(w, targets=(w[::-1],)) for w in ["abc", "hello", "xyz", "loraplex", "cat", "moon"]
]


def test_training_lowers_the_loss_and_saves_peft_format(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tiny_base()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    cfg = TrainConfig(rank=4, alpha=8, steps=30, batch_size=4, lr=5e-3, checkpoint_every=10)
    result = train_lora(base, REVERSE, cfg, progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())
    out = save_adapter(result.adapter, tmp_path / "rev", dtype=torch.float32)
    adapter = load_source(str(out))
    assert adapter.base_model.name == "tiny-llama" and adapter.meta.extra["train"]["steps"] == 30
    assert adapter.meta.prompt_format == base.prompt_format == "plain"  # no chat template
    peft = PeftModel.from_pretrained(copy.deepcopy(base.model), out).eval()
    composer = Composer.attach(base.model, [adapter])
    ids = torch.randint(3, 99, (1, 5))
    with torch.no_grad(), composer.compose(torch.ones(1, 1)):
        torch.testing.assert_close(peft(ids).logits, base.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    import lorahub.train as train

    cfg = TrainConfig(rank=4, steps=12, batch_size=2, lr=1e-3, checkpoint_every=5)
    full = train_lora(tiny_base(), REVERSE, cfg, progress=False)
    real, calls = train.make_batch, []

    def crash_on_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "make_batch", crash_on_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_base(), REVERSE, cfg, checkpoint_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 5
    monkeypatch.setattr(train, "make_batch", real)
    resumed = train_lora(tiny_base(), REVERSE, cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)
    for name, m in full.adapter.modules.items():
        torch.testing.assert_close(
            resumed.adapter.modules[name].lora_B, m.lora_B, atol=1e-6, rtol=1e-4
        )
