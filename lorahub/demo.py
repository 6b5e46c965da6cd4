"""`loraplex demo`: what the registry does, end to end, offline.

Until the bundled adapter zoo lands, the demo writes three small PEFT-format adapters for a
tiny Llama shape, registers them with example inputs, and routes a few prompts by search.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from registry import (
    AdapterMeta,
    BaseModelInfo,
    LoraAdapter,
    LoraModule,
    Registry,
    write_peft_folder,
)
from router import SentenceEmbedder

_TASKS = {
    "arithmetic": ["What is 12 plus 30?", "Compute 7 times 8.", "Subtract 19 from 42."],
    "translation": ["Translate 'good morning' to French.", "How do you say cat in German?"],
    "sentiment": ["I loved this movie, it was wonderful.", "The food was cold and awful."],
}
_PROMPTS = [
    "What is 5 plus 9?",
    "Translate 'thank you' into Spanish.",
    "What a dull and disappointing film.",
]


def _adapter(seed: int, task: str) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        f"model.layers.{i}.self_attn.{p}": LoraModule(
            torch.randn(8, 64, generator=g) * 0.02, torch.randn(64, 8, generator=g) * 0.02, 16.0
        )
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    return LoraAdapter(modules, base_model=BaseModelInfo("tiny-llama"), meta=AdapterMeta(task=task))


def run_demo(registry: Path | None = None) -> int:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = registry or Path(tmp) / "registry"
        with Registry(root, embedder=SentenceEmbedder()) as reg:
            for seed, (task, examples) in enumerate(_TASKS.items()):
                folder = write_peft_folder(_adapter(seed, task), Path(tmp) / task)
                rec = reg.register(folder, examples=examples, replace=True)
                print(
                    f"registered {rec.name:12} rank {rec.rank}  {rec.n_modules} modules  "
                    f"sha256 {rec.sha256[:12]}"
                )
            print()
            for prompt in _PROMPTS:
                (name, score), *_ = reg.search(prompt, k=1)
                print(f"{prompt!r:45} -> {name} (cosine {score:.3f})")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")
    return 0
