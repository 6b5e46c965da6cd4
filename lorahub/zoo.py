"""The bundled adapter zoo: LoRA adapters for SmolLM2-135M-Instruct trained on BIG-bench
dev-list tasks, in families (arithmetic, unit conversion, colors, linguistic mappings,
sentiment, logical deduction, permutations, word games ...).

    python -m lorahub.zoo [--tasks a,b] [--steps N]     # resumable: done tasks are skipped

Each adapter folder (PEFT format, bfloat16) carries its task, description and routing
examples in its metadata, so `loraplex register lorahub/zoo/<name>` needs no flags.
Every task has three disjoint splits (`Task.splits`): the adapter trains on train, is kept
only if it beats the base model on validation, and `manifest.json` reports base vs adapter
on test. `splits.json` records every split's example ids.

    python -m lorahub.zoo --refresh     # routing examples, splits, metrics: no retraining
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lorahub.applied import attached
from lorahub.inference import accuracy
from lorahub.models import DEFAULT_MODEL, load_base_model, loraplex_home
from lorahub.tasks import SplitConfig, Task, TaskKind, fetch_bigbench, load_task, require_dev_task
from lorahub.train import TrainConfig, save_adapter, train_lora
from registry import AdapterError, Registry, Submission, load_source

ZOO_DIR = Path(__file__).parent / "zoo"

ZOO_TASKS = [
    "arithmetic/1_digit_addition",
    "arithmetic/2_digit_multiplication",
    "arithmetic/3_digit_subtraction",
    "arithmetic/4_digit_addition",
    "modified_arithmetic/three_digit_addition_control",
    "modified_arithmetic/two_digit_multiplication_plus_one",
    "unit_conversion/unit_identification",
    "unit_conversion/different_systems",
    "color/hex",
    "color/rgb",
    "linguistic_mappings/de_past_tense_json",
    "linguistic_mappings/pronoun_replacement_json",
    "linguistic_mappings/sentence_negation_json",
    "linguistic_mappings/question_formation_json",
    "multiemo/hotels_sentence_en",
    "multiemo/medicine_sentence_en",
    "multiemo/products_sentence_en",
    "logical_deduction/three_objects",
    "logical_deduction/seven_objects",
    "undo_permutation/reorder_chars",
    "language_games/pig_latin_encode",
    "object_counting",
    "navigate",
    "word_unscrambling",
    # spares, for adapters that fail to beat the base model
    "color/hcl",
    "arithmetic/3_digit_multiplication",
    "cs_algorithms/valid_parentheses",
    "linguistic_mappings/de_past_tense_regular_json",
    # long inputs, ~12 min each to train on 2 cores
    "multiemo/reviews_text_en",
    "undo_permutation/reorder_byswap",
]


@dataclass(frozen=True)
class ZooConfig:
    split: SplitConfig = field(default_factory=SplitConfig)
    # train inputs stored with each adapter for routing: the task router's classifier
    # separates the zoo's distinguishable tasks on validation 90% / 94% / 95% of the time
    # with 24 / 128 / 256 of them (a one-off sweep on the validation split, C = 10)
    n_routing_examples: int = 256
    n_demo: int = 4  # held-out prompts kept in the manifest for the demo
    max_adapters: int = 24  # 24 x 0.94 MB stays under the 25 MB budget
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=80, batch_size=8, lr=2e-4, loraplus_ratio=16.0)
    )


def adapter_name(task: str) -> str:
    return task.replace("/", "-")


def _read_manifest(zoo: Path) -> list[dict]:
    path = zoo / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else []


def _write_manifest(zoo: Path, entries: list[dict]) -> None:
    tmp = zoo / ".manifest.json.tmp"
    tmp.write_text(json.dumps(sorted(entries, key=lambda e: e["name"]), indent=2) + "\n")
    os.replace(tmp, zoo / "manifest.json")


def measure(base, task: Task, cfg: ZooConfig, adapter=None) -> dict:
    """An adapter's manifest numbers: its split (sizes, seed) and base vs adapter on
    validation (keep or reject) and test (reported); held-out test prompts for the demo."""
    splits = task.splits(cfg.split)
    metrics = {}
    for name in ("validation", "test"):
        examples = getattr(splits, name)
        base_acc, _ = accuracy(base, examples)
        with attached(base.model, [adapter], ["adapter"], torch.ones(len(examples), 1)) as on:
            adapter_acc, _ = accuracy(base, examples, on)
        metrics[name] = {"base_metric": base_acc, "adapter_metric": adapter_acc}
    return {
        "metric": "mc_acc" if task.kind == TaskKind.multiple_choice else "em",
        # the manifest's headline numbers are on test, never used for a choice
        **metrics["test"],
        "validation": metrics["validation"],
        "n_train": len(splits.train),
        "n_validation": len(splits.validation),
        "n_test": len(splits.test),
        "split": asdict(cfg.split),
        # held-out prompts for `loraplex demo` (it must run offline, without the BIG-bench sdist)
        "demo": [
            {"input": ex.input, "targets": list(ex.targets) or [ex.target]}
            for ex in splits.test[: cfg.n_demo]
        ],
    }


def build_one(base, task_name: str, cfg: ZooConfig, zoo: Path, work: Path) -> dict:
    require_dev_task(task_name)
    task = load_task(task_name)
    train = task.splits(cfg.split).train
    result = train_lora(base, train, cfg.train, checkpoint_dir=work / adapter_name(task_name))
    family = task_name.split("/", 1)[0]
    adapter = result.adapter.to(torch.bfloat16).with_meta(
        task=task_name,
        description=task.description or task_name,
        examples=tuple(ex.input for ex in train[: cfg.n_routing_examples]),
        tags=(family, task.kind.value),
        license="Apache-2.0 (BIG-bench data)",
        source="loraplex zoo",
    )
    folder = save_adapter(adapter, zoo / adapter_name(task_name))
    return {
        "name": adapter_name(task_name),
        "task": task_name,
        **measure(base, task, cfg, adapter),
        "steps": cfg.train.steps,
        "lr": cfg.train.lr,
        "loraplus_ratio": cfg.train.loraplus_ratio,
        "rank": cfg.train.rank,
        "targets": list(cfg.train.targets),
        "seed": cfg.train.seed,
        "train_seconds": round(result.seconds, 1),
        "final_loss": result.losses[-1],
        "sha256": adapter.sha256(),
        "bytes": (folder / "adapter_model.safetensors").stat().st_size,
    }


def write_splits(entries: list[dict], cfg: ZooConfig, zoo: Path = ZOO_DIR) -> None:
    """splits.json: task -> split -> example ids, for every adapter of the manifest."""
    splits = {e["task"]: load_task(e["task"]).splits(cfg.split).ids() for e in entries}
    (zoo / "splits.json").write_text(json.dumps(dict(sorted(splits.items()))) + "\n")


def refresh(cfg: ZooConfig, zoo: Path = ZOO_DIR) -> list[dict]:
    """Bring every adapter up to `cfg` without retraining: its routing examples (train
    inputs; the weights and their sha256 stay) and, where not yet measured on `cfg.split`,
    its split and metrics."""
    entries = _read_manifest(zoo)
    fetch_bigbench([e["task"] for e in entries])
    base = load_base_model(DEFAULT_MODEL)
    for e in entries:
        task = load_task(e["task"])
        adapter = load_source(str(zoo / e["name"]))
        examples = tuple(ex.input for ex in task.splits(cfg.split).train[: cfg.n_routing_examples])
        if adapter.meta.examples != examples:
            save_adapter(adapter.with_meta(examples=examples), zoo / e["name"])
        if e.get("split") != asdict(cfg.split) or "validation" not in e:
            e.update(measure(base, task, cfg, adapter.to(torch.float32)))
            print(f"{e['task']}: test base {e['base_metric']:.3f} -> {e['adapter_metric']:.3f}")
    _write_manifest(zoo, entries)
    write_splits(entries, cfg, zoo)
    return entries


def _read_rejected(zoo: Path) -> list[dict]:
    path = zoo / "rejected.json"
    return json.loads(path.read_text()) if path.exists() else []


def build_zoo(tasks: list[str], cfg: ZooConfig, zoo: Path = ZOO_DIR) -> list[dict]:
    """Train the zoo's adapters in order until `cfg.max_adapters` are kept. An adapter that
    does not beat the base model on its validation split is dropped and recorded in
    rejected.json (so a rerun does not retry it)."""
    zoo.mkdir(parents=True, exist_ok=True)
    work = loraplex_home() / "zoo-work"
    entries, rejected = _read_manifest(zoo), _read_rejected(zoo)
    done = {e["task"] for e in entries} | {e["task"] for e in rejected}
    todo = [t for t in tasks if t not in done]
    fetch_bigbench(todo)
    base = load_base_model(DEFAULT_MODEL)
    for task_name in todo:
        if len(entries) >= cfg.max_adapters:
            break
        start = time.perf_counter()
        entry = build_one(base, task_name, cfg, zoo, work)
        if entry["validation"]["adapter_metric"] > entry["validation"]["base_metric"]:
            entries.append(entry)
            _write_manifest(zoo, entries)
            write_splits(entries, cfg, zoo)
        else:
            shutil.rmtree(zoo / entry["name"], ignore_errors=True)
            rejected.append(
                {k: entry[k] for k in ("name", "task", "metric", "validation", "split")}
            )
            (zoo / "rejected.json").write_text(json.dumps(rejected, indent=2) + "\n")
        shutil.rmtree(work / adapter_name(task_name), ignore_errors=True)
        print(
            f"{task_name}: validation base {entry['validation']['base_metric']:.3f} -> adapter "
            f"{entry['validation']['adapter_metric']:.3f} "
            f"({time.perf_counter() - start:.0f}s){'' if entry in entries else ' rejected'}",
            flush=True,
        )
    return entries


def read_manifest(zoo: Path = ZOO_DIR) -> list[dict]:
    """The zoo's manifest; a clear error if the zoo is missing."""
    path = zoo / "manifest.json"
    if not path.exists():
        raise AdapterError(f"{path}: the adapter zoo is missing (python -m lorahub.zoo builds it)")
    return json.loads(path.read_text())


def register_zoo(reg: Registry, zoo: Path = ZOO_DIR) -> list[dict]:
    """Register every zoo adapter not yet in `reg` (their metadata carries task and routing
    examples); returns the manifest."""
    manifest = read_manifest(zoo)
    missing = [
        Submission(zoo / e["name"], name=e["name"]) for e in manifest if e["name"] not in reg
    ]
    failed = [r for r in reg.register_many(missing) if not r.ok]
    if failed:
        raise failed[0].error
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", help="comma-separated (default: the full zoo list)")
    ap.add_argument("--steps", type=int, help="training steps per adapter")
    ap.add_argument("--out", type=Path, default=ZOO_DIR)
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="update routing examples, splits and metrics without retraining",
    )
    args = ap.parse_args()
    cfg = ZooConfig()
    if args.refresh:
        refresh(cfg, args.out)
        return
    if args.steps:
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    tasks = args.tasks.split(",") if args.tasks else ZOO_TASKS
    build_zoo(tasks, cfg, args.out)
    print(json.dumps(asdict(cfg)))


if __name__ == "__main__":
    main()
