"""Tasks: BIG-bench `task.json` files and user JSONL files, as lists of examples.

BIG-bench tasks come from the `bigbench==1.0.0` sdist on PyPI: `fetch_bigbench` downloads it
once from PyPI's simple index, checks it against a pinned sha256 (it is never installed nor
built: `pip download` would run its setup.py, which fails on a direct-URL dependency) and
extracts only the task files asked for. Training and tuning may use only the tasks in `bigbench_dev_tasks.txt`; every
other task is held out for evaluation (`require_dev_task`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

from lorahub.models import loraplex_home
from registry import AdapterError

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PYPI_SIMPLE = "https://pypi.org/simple"
_DEV_LIST = Path(__file__).with_name("bigbench_dev_tasks.txt")


class TaskError(AdapterError):
    """A task file is missing or malformed, or a held-out task was asked for training."""


class TaskKind(StrEnum):
    generative = "generative"
    multiple_choice = "multiple_choice"


@dataclass(frozen=True)
class Example:
    """`input` is the text shown to the model; generative examples have `targets`
    (any is right), multiple-choice ones `options` and the index of the `answer`."""

    input: str
    targets: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    answer: int | None = None

    @property
    def target(self) -> str:
        """The text a model should produce (first target, or the right option)."""
        return self.options[self.answer] if self.answer is not None else self.targets[0]


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    examples: tuple[Example, ...]
    description: str = ""

    def splits(self, cfg: SplitConfig | None = None) -> Splits:
        """Three disjoint splits after a seeded shuffle: validation from the front, test
        from the far end, train in between (at most `max_train`). Small tasks give each of
        validation and test at most a third of their distinct inputs. Some tasks repeat
        inputs (BIG-bench logical_deduction holds each puzzle several times): every copy of
        a validation or test input stays out of train, and validation and test keep one
        copy. The zoo's adapters were trained on exactly this train split."""
        cfg = cfg or SplitConfig()
        order = list(self.examples)
        random.Random(cfg.seed).shuffle(order)
        n_inputs = len({ex.input for ex in order})
        validation = _first_copies(order[: min(cfg.n_validation, n_inputs // 3)])
        held = {ex.input for ex in validation}
        rest = [ex for ex in order if ex.input not in held]
        test = _first_copies(reversed(rest), min(cfg.n_test, n_inputs // 3))
        held |= {ex.input for ex in test}
        train = [ex for ex in rest if ex.input not in held][: cfg.max_train]
        return Splits(train, validation, test)


@dataclass(frozen=True)
class SplitConfig:
    """Sizes and seed of `Task.splits` (the zoo's and the evaluation's)."""

    n_validation: int = 50
    n_test: int = 50
    max_train: int = 400
    seed: int = 0


SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits:
    """train: adapter training and few-shot examples; validation: keep/reject and every
    tuning choice; test: reported only."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def ids(self) -> dict[str, list[str]]:
        """split -> example ids (`example_id`), for the record."""
        return {name: [example_id(ex) for ex in getattr(self, name)] for name in SPLITS}


def example_id(ex: Example) -> str:
    """A short stable id of an example: the sha256 of its input (the splits are disjoint
    by input, so equal inputs are one example for this purpose)."""
    return hashlib.sha256(ex.input.encode()).hexdigest()[:16]


def _first_copies(examples: Iterable[Example], limit: int | None = None) -> list[Example]:
    """The first example of every distinct input, in order, at most `limit` of them."""
    out: dict[str, Example] = {}
    for ex in examples:
        if limit is not None and len(out) >= limit:
            break
        out.setdefault(ex.input, ex)
    return list(out.values())


@cache
def dev_tasks() -> frozenset[str]:
    """The BIG-bench tasks that may be trained and tuned on."""
    return frozenset(ln.strip() for ln in _DEV_LIST.read_text().splitlines() if ln.strip())


def require_dev_task(name: str) -> None:
    if name.startswith("bigbench:"):
        name = name.removeprefix("bigbench:")
    if name not in dev_tasks():
        raise TaskError(
            f"{name!r} is not in bigbench_dev_tasks.txt: it is held out for evaluation and "
            "must not be trained or tuned on"
        )


def _format_mc(task: dict, ex: dict, options: list[str]) -> str:
    text = ex["input"]
    if task.get("append_choices_to_input", True):
        prefix = task.get("choice_prefix", "\n  choice: ")
        text += "".join(prefix + o for o in options)
    return text


def parse_bigbench(data: dict, name: str) -> Task:
    """A BIG-bench task.json (already parsed) -> Task. Multiple choice when examples carry
    `target_scores`; the task prefix, if any, goes before every input."""
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise TaskError(f"{name}: no 'examples' list (a task with subtasks has one per folder)")
    prefix = data.get("task_prefix", "")
    mc = all(isinstance(e.get("target_scores"), dict) and e["target_scores"] for e in examples)
    out = []
    for e in examples:
        if not isinstance(e, dict) or not isinstance(e.get("input"), str):
            raise TaskError(f"{name}: every example needs a string 'input'")
        if mc:
            options = [str(o) for o in e["target_scores"]]
            scores = list(e["target_scores"].values())
            answer = max(range(len(options)), key=lambda i: scores[i])
            out.append(
                Example(
                    prefix + _format_mc(data, e, options), options=tuple(options), answer=answer
                )
            )
        else:
            target = e.get("target")
            targets = [target] if isinstance(target, str) else list(target or [])
            if not targets or not all(isinstance(t, str) for t in targets):
                raise TaskError(f"{name}: example without a string 'target'")
            out.append(Example(prefix + e["input"], targets=tuple(targets)))
    kind = TaskKind.multiple_choice if mc else TaskKind.generative
    return Task(name, kind, tuple(out), str(data.get("description", "")))


def load_jsonl(path: Path, name: str | None = None) -> Task:
    """JSONL: one object a line, {"input", "target"} or {"input", "options", "answer"}."""
    examples = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{i}: malformed JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
            raise TaskError(f"{path}:{i}: expected an object with a string 'input'")
        if "options" in obj:
            opts, ans = obj["options"], obj.get("answer")
            if not isinstance(opts, list) or not isinstance(ans, int) or not 0 <= ans < len(opts):
                raise TaskError(f"{path}:{i}: 'options' must be a list and 'answer' an index in it")
            examples.append(Example(obj["input"], options=tuple(map(str, opts)), answer=ans))
        elif isinstance(obj.get("target"), str):
            examples.append(Example(obj["input"], targets=(obj["target"],)))
        else:
            raise TaskError(f"{path}:{i}: needs a string 'target' or 'options' + 'answer'")
    if not examples:
        raise TaskError(f"{path}: no examples")
    kinds = {e.answer is not None for e in examples}
    if len(kinds) > 1:
        raise TaskError(f"{path}: mixes generative and multiple-choice examples")
    kind = TaskKind.multiple_choice if kinds.pop() else TaskKind.generative
    return Task(name or path.stem, kind, tuple(examples))


def load_task(source: str | Path, tasks_dir: Path | None = None) -> Task:
    """A .jsonl file, a task.json, or a BIG-bench task name (looked up in `tasks_dir`,
    default the fetched cache)."""
    path = Path(source)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    if path.suffix == ".json":
        return parse_bigbench(_read_json(path), path.parent.name)
    name = str(source)
    folder = (tasks_dir or bigbench_cache()) / name
    if not (folder / "task.json").exists():
        raise TaskError(f"{name}: no task.json under {folder} (fetch it with fetch_bigbench)")
    return parse_bigbench(_read_json(folder / "task.json"), name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{path}: unreadable task file: {e}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected a JSON object")
    return data


def bigbench_cache() -> Path:
    return loraplex_home() / "bigbench"


def fetch_bigbench(names: Sequence[str], cache_dir: Path | None = None) -> Path:
    """Make `<cache>/<name>/task.json` exist for every name; returns the cache folder.
    Downloads the sdist once and extracts only what is missing."""
    cache_dir = cache_dir or bigbench_cache()
    missing = {n for n in names if not (cache_dir / n / "task.json").exists()}
    if not missing:
        return cache_dir
    sdist = _download_sdist(cache_dir / "sdist")
    wanted = {f"bigbench/benchmark_tasks/{n}/task.json": n for n in missing}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = member.name.split("/", 1)[-1]  # drop the top folder bigbench-1.0.0/
            if rel in wanted and member.isfile():
                out = cache_dir / wanted.pop(rel) / "task.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
            if not wanted:
                break
    if wanted:
        raise TaskError(f"not in {BIGBENCH_SDIST}: {sorted(wanted.values())}")
    return cache_dir


def _download_sdist(folder: Path) -> Path:
    """The BIG-bench sdist in `folder`, downloaded once from the package index
    ($PIP_INDEX_URL or PyPI) and verified against BIGBENCH_SHA256."""
    path = folder / BIGBENCH_SDIST
    if path.exists():
        return path
    index = os.environ.get("PIP_INDEX_URL", PYPI_SIMPLE).rstrip("/")
    try:
        page = urllib.request.urlopen(f"{index}/bigbench/", timeout=60).read().decode()
        url = next(
            href.split("#")[0]
            for href in re.findall(r'href="([^"]+)"', page)
            if href.split("#")[0].rsplit("/", 1)[-1] == BIGBENCH_SDIST
        )
        url = urllib.parse.urljoin(f"{index}/bigbench/", url)
        data = urllib.request.urlopen(url, timeout=600).read()
    except (OSError, StopIteration) as e:
        raise TaskError(f"could not download {BIGBENCH_SDIST} from {index}: {e!r}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != BIGBENCH_SHA256:
        raise TaskError(f"{BIGBENCH_SDIST}: sha256 {digest} is not the pinned {BIGBENCH_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
