"""The background: example inputs of tasks no adapter was made for, so the task router can
learn a `none` class (the base model answers) beside its adapters.

The shipped set (`data/background.jsonl`) is BIG-bench (Apache-2.0): the first 16 train
inputs of each task in the tuning half of the open-world split
(benchmarks/results/openworld/split.json; written by `benchmarks/openworld.py background`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors import safe_open

BACKGROUND_PATH = Path(__file__).parent / "data" / "background.jsonl"
# their embeddings by the default embedder, so no registry embeds 1,936 texts on its first
# route (minutes on 2 cores); used only when its key (embedder id + texts) matches
BACKGROUND_VECTORS = Path(__file__).parent / "data" / "background-vectors.safetensors"
# per tuning-half task, what composing did on its validation prompts against the base model
# (benchmarks/openworld.py gains): the task router composes anyway below its fit threshold
# where a prompt's nearest background inputs come from tasks that composing helped
BACKGROUND_GAINS = Path(__file__).parent / "data" / "background-gains.json"
MAX_CHARS = 600  # MiniLM reads 256 word pieces; longer inputs only cost bytes


def truncate(text: str) -> str:
    return text[:MAX_CHARS]


@cache
def background_texts(path: Path = BACKGROUND_PATH) -> tuple[str, ...]:
    """The background inputs of a JSONL file of {"task", "input"} objects."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(ln)["input"] for ln in lines if ln.strip())


@cache
def background_tasks(path: Path = BACKGROUND_PATH) -> tuple[str, ...]:
    """The task of each background input, in the order of `background_texts`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(ln)["task"] for ln in lines if ln.strip())


@cache
def background_gains(
    gains: Path = BACKGROUND_GAINS, path: Path = BACKGROUND_PATH
) -> tuple[float, ...]:
    """Per background input (in the order of `background_texts`), its task's measured gain of
    composing over the base model (accuracy, in [-1, 1]); 0 where nothing was measured (the
    chat prompts, or no file)."""
    measured = json.loads(gains.read_text(encoding="utf-8"))["tasks"] if gains.exists() else {}
    return tuple(float(measured.get(t, {}).get("gain", 0.0)) for t in background_tasks(path))


@cache
def shipped_vectors(key: str, path: Path = BACKGROUND_VECTORS) -> torch.Tensor | None:
    """The shipped background embeddings (n, d) if they were made under `key`
    (registry.embedding.examples_key of the embedder and the texts), else None."""
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor("vectors").float()
