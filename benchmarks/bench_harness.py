"""lm-evaluation-harness on dev tasks: `auto` vs the base model vs each task's own adapter.

The zoo registered once, SmolLM2 as its base, four zoo tasks (two multiple choice, two
generation) written as local harness tasks from their TEST split (`Task.splits`, the one
the zoo's adapters never saw), scored by the harness itself with its chat template (as the
adapters were trained): accuracy, and exact match ignoring case and surrounding
punctuation. The loraplex harness model routes on each question's context alone.

    python benchmarks/bench_harness.py [--limit 25] [--registry DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result

from lorahub.harness import LoraplexLM, write_task
from lorahub.models import loraplex_home
from lorahub.tasks import Task, fetch_bigbench, load_task
from lorahub.zoo import read_manifest, register_zoo
from registry import Registry

TASKS = (  # two multiple choice, two generation; all dev tasks with a zoo adapter
    "arithmetic/3_digit_subtraction",
    "multiemo/medicine_sentence_en",
    "linguistic_mappings/sentence_negation_json",
    "word_unscrambling",
)
MODELS = {  # column -> the loraplex model's arguments (`own` adds the task's adapter)
    "base": {"compose": "none"},
    "auto": {"router": "task", "compose": "mixture", "k": 3},
    "own": {"compose": "selection"},
}


def harness_name(task: str) -> str:
    return "lp_" + task.replace("/", "__")


def write_tasks(folder: Path, limit: int) -> dict[str, Task]:
    """Each task's first `limit` test examples as a harness task; name -> the task."""
    fetch_bigbench(TASKS)
    written = {}
    for name in TASKS:
        task = load_task(name)
        test = task.splits().test[:limit]
        local = dataclasses.replace(task, name=harness_name(name), examples=tuple(test))
        write_task(folder, local, max_gen_toks=32)
        written[name] = local
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=25, help="test examples per task")
    ap.add_argument("--registry", type=Path, default=loraplex_home() / "bench-harness-registry")
    args = ap.parse_args()
    with Registry(args.registry) as reg:
        register_zoo(reg)
    adapters = {e["task"]: e["name"] for e in read_manifest()}
    folder = Path(tempfile.mkdtemp())
    tasks = write_tasks(folder, args.limit)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    scores: dict[str, dict] = {name: {} for name in TASKS}
    runs = [(c, o, list(TASKS)) for c, o in MODELS.items() if c != "own"]
    runs += [("own", {**MODELS["own"], "adapter": adapters[name]}, [name]) for name in TASKS]
    for column, options, names in runs:  # one model per column (own: per task)
        model = LoraplexLM(registry=str(args.registry), **options)
        out = lm_eval.simple_evaluate(
            model=model,
            tasks=[tasks[name].name for name in names],
            task_manager=manager,
            apply_chat_template=True,
            batch_size=8,
            device="cpu",
        )
        for name in names:
            metrics = out["results"][tasks[name].name]
            key = next(k for k in ("acc,none", "exact_match,none") if k in metrics)
            scores[name] |= {column: metrics[key], "metric": key.split(",")[0]}
            print(name, column, round(metrics[key], 3), flush=True)
    rows = [{"task": name, **s} for name, s in scores.items()]
    macro = {c: sum(s[c] for s in scores.values()) / len(scores) for c in MODELS}
    rows.append({"task": "macro", "metric": "", **macro})
    print_table(rows, ["task", "metric", *MODELS])
    config = {"limit": args.limit, "split": "test", "tasks": list(TASKS), "models": MODELS}
    write_result("harness", config, {"tasks": scores, "macro": macro}, [], False)


if __name__ == "__main__":
    main()
