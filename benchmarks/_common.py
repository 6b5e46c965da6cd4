"""What every benchmark shares: machine facts, a printed table, the JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def smollm_config(layers: int = 30):
    """A Llama config with SmolLM2-135M's shapes (random weights are fine for speed)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
    )


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg(),  # 1, 5 and 15 minutes: other work on a shared machine
    }


COMPARE = {
    "<=": lambda v, g: v <= g,
    ">=": lambda v, g: v >= g,
    "<": lambda v, g: v < g,
    ">": lambda v, g: v > g,
}


def target(name: str, value: float, goal: float, op: str) -> dict:
    met = COMPARE[op](value, goal)
    return {"name": name, "value": float(value), "goal": goal, "op": op, "met": bool(met)}


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def write_result(
    name: str, config: dict, results: object, targets: list[dict], quick: bool
) -> None:
    """Print the targets and write benchmarks/results/<name>.json (quick runs: <name>.quick.json,
    so a smoke run never overwrites the committed full-run numbers)."""
    for t in targets:
        print(
            f"target {t['name']}: {t['value']:.4g} (goal {t['op']} {t['goal']}) "
            f"{'met' if t['met'] else 'NOT MET'}"
        )
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": config,
        "results": results,
        "targets": targets,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
