"""Merge speed and fidelity against PEFT's `add_weighted_adapter`.

    python benchmarks/bench_merge.py [--quick]

8 random rank-16 adapters on all seven projections of a Llama with SmolLM2-135M's shapes
(hidden 576, intermediate 1536, 9 heads / 3 KV heads; 30 layers, 2 with --quick), merged
to rank 16. Error: each method's relative Frobenius error against its own full delta.
PEFT's `*_svd` take an exact SVD of that delta, so their error is the optimal rank-16
error; ours is compared with the optimum of our (identically defined) delta.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import print_table, smollm_config, target, write_result
from transformers import LlamaConfig, LlamaForCausalLM

from composition import MergeConfig, merge
from composition.merge import FULL_DELTA
from registry import BaseModelInfo, LoraAdapter, LoraModule, write_peft_folder

PROJ = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
RANK, N_ADAPTERS, DENSITY = 16, 8, 0.5
PEFT_NAME = {
    "svd": "svd",
    "ties": "ties_svd",
    "dare_linear": "dare_linear_svd",
    "dare_ties": "dare_ties_svd",
    "magnitude_prune": "magnitude_prune_svd",
}


def random_adapters(model: torch.nn.Module, n: int) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in {p for ps in PROJ.values() for p in ps}
    }
    return [
        LoraAdapter(
            {
                name: LoraModule(
                    torch.randn(RANK, d_in, generator=g) / d_in**0.5,
                    torch.randn(d_out, RANK, generator=g) * 0.01,
                    2.0 * RANK,
                )
                for name, (d_in, d_out) in shapes.items()
            },
            base_model=BaseModelInfo("smollm2-shapes"),
        )
        for _ in range(n)
    ]


def time_peft(
    model_cfg: LlamaConfig, folders: list[Path], method: str, weights: list[float]
) -> float:
    from peft import PeftModel

    base = LlamaForCausalLM(model_cfg)
    peft = PeftModel.from_pretrained(base, folders[0], adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        peft.load_adapter(f, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(folders))]
    start = time.perf_counter()
    peft.add_weighted_adapter(
        names, weights, "merged", combination_type=PEFT_NAME[method], svd_rank=RANK, density=DENSITY
    )
    return time.perf_counter() - start


def optimal_error(
    adapters: list[LoraAdapter], weights: list[float], method: str, module: str
) -> float:
    """The exact-SVD rank-16 error of our full delta for `module` (what PEFT's SVD attains)."""
    cfg = MergeConfig(rank=RANK, density=DENSITY)
    pairs = [
        (a.modules[module].lora_A, a.scaling(module) * a.modules[module].lora_B) for a in adapters
    ]
    w = torch.tensor(weights)
    if method == "svd":
        full = sum(wi * b @ a for wi, (a, b) in zip(w, pairs, strict=True))
    else:
        full = FULL_DELTA[method](
            torch.stack([b @ a for a, b in pairs]), w, cfg, torch.Generator().manual_seed(0)
        )
    S = torch.linalg.svdvals(full)
    return float((S[RANK:].square().sum() / S.square().sum()).sqrt())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = smollm_config(2 if args.quick else 30)
    model = LlamaForCausalLM(cfg)
    adapters = random_adapters(model, N_ADAPTERS)
    weights = [1.0 / N_ADAPTERS] * N_ADAPTERS
    probe = "model.layers.0.mlp.up_proj"  # largest module: where the low-rank step is hardest
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = [write_peft_folder(a, Path(tmp) / f"a{i}") for i, a in enumerate(adapters)]
        for method in [
            "linear",
            "svd",
            "ties",
            "dare_linear",
            "dare_ties",
            "magnitude_prune",
            "lorahub",
        ]:
            start = time.perf_counter()
            result = merge(adapters, weights, method, MergeConfig(rank=RANK, density=DENSITY))
            ours_s = time.perf_counter() - start
            row = {"method": method, "ours_s": ours_s, "ours_err": max(result.rel_error.values())}
            if method in PEFT_NAME:
                row["peft_s"] = time_peft(cfg, folders, method, weights)
                row["speedup"] = row["peft_s"] / ours_s
                row["probe_err"] = result.rel_error[probe]
                row["probe_optimal_err"] = optimal_error(adapters, weights, method, probe)
                row["err_ratio"] = row["probe_err"] / max(row["probe_optimal_err"], 1e-30)
            rows.append(row)
            print(f"{method}: {ours_s:.2f}s", flush=True)
    print_table(
        rows,
        [
            "method",
            "ours_s",
            "peft_s",
            "speedup",
            "ours_err",
            "probe_err",
            "probe_optimal_err",
            "err_ratio",
        ],
    )
    by = {r["method"]: r for r in rows}
    targets = [target("svd_speedup_vs_peft", by["svd"]["speedup"], 10.0, ">=")]
    for m in ("ties", "dare_ties"):
        targets.append(target(f"{m}_speedup_vs_peft", by[m]["speedup"], 3.0, ">="))
        targets.append(target(f"{m}_error_vs_optimal", by[m]["err_ratio"], 1.01, "<="))
    write_result(
        "merge",
        {
            "layers": cfg.num_hidden_layers,
            "adapters": N_ADAPTERS,
            "rank": RANK,
            "density": DENSITY,
            "quick": args.quick,
        },
        rows,
        targets,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
