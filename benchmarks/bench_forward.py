"""Single-pass multi-adapter forward: overhead over the base model, and PEFT's mixed batch.

    python benchmarks/bench_forward.py [--quick]

A Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, vocab 49152; random weights),
batch 32, 32 distinct rank-8 adapters on q,k,v,o. Prefill: 128 tokens; decode: 32 steps of
one token with the KV cache. Methods are measured interleaved, median of `--reps` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from _common import print_table, smollm_config, target, write_result
from transformers import LlamaConfig, LlamaForCausalLM

from composition import Composer
from lorahub.models import cache_arg, output_cache
from registry import BaseModelInfo, LoraAdapter, LoraModule, write_peft_folder

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(model: torch.nn.Module, n: int, rank: int) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(0)
    layers = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS}
    return [
        LoraAdapter(
            {
                name: LoraModule(
                    torch.randn(rank, m.in_features, generator=g) * 0.02,
                    torch.randn(m.out_features, rank, generator=g) * 0.02,
                    16.0,
                )
                for name, m in layers.items()
            },
            base_model=BaseModelInfo("bench"),
        )
        for _ in range(n)
    ]


def prefill(model: torch.nn.Module, ids: torch.Tensor, **kw: object) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, **kw)
    return time.perf_counter() - start


def decode(model: torch.nn.Module, ids: torch.Tensor, steps: int, **kw: object) -> float:
    out = model(input_ids=ids, use_cache=True, **kw)
    cache, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, use_cache=True, **cache_arg(model, cache), **kw)
        cache, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    layers, batch, n, tokens, steps = (4, 8, 8, 32, 8) if args.quick else (30, 32, 32, 128, 32)
    torch.manual_seed(0)
    cfg = smollm_config(layers)
    model = LlamaForCausalLM(cfg).eval()
    adapters = make_adapters(model, n, rank=8)
    names = [f"a{i}" for i in range(n)]
    ids = torch.randint(
        0, cfg.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1)
    )

    with tempfile.TemporaryDirectory() as tmp:
        peft = peft_model(cfg, model, adapters, names, Path(tmp))
    composer = Composer.attach(model, adapters, names)
    rows = range(batch)
    mix = [{names[(i + j) % n]: 1 / 3 for j in range(3)} for i in rows]
    union = torch.softmax(torch.randn(batch, n, generator=torch.Generator().manual_seed(2)), dim=1)
    # method -> (model, context, forward kwargs)
    methods: dict[str, tuple[torch.nn.Module, Callable[[], AbstractContextManager], dict]] = {
        "base": (model, nullcontext, {}),
        "selection": (
            model,
            lambda: composer.compose(composer.gates_for([{names[i % n]: 1.0} for i in rows])),
            {},
        ),
        "mixture_k3": (model, lambda: composer.compose(composer.gates_for(mix)), {}),
        "fusion_k3": (model, lambda: composer.compose(composer.gates_for(mix), mode="fusion"), {}),
        "dense_union": (model, lambda: composer.compose(union), {}),
        "peft_adapter_names": (peft, nullcontext, {"adapter_names": [names[i % n] for i in rows]}),
    }
    times: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "decode": []} for m in methods}
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # rep 0 warms up
            for name, (net, context, kw) in methods.items():
                with context():
                    p = prefill(net, ids, **kw)
                with context():
                    d = decode(net, ids, steps, **kw)
                if rep:
                    times[name]["prefill"].append(p)
                    times[name]["decode"].append(d)
                print(f"rep {rep} {name}: prefill {p:.2f}s decode {d:.2f}s", flush=True)

    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    table = [
        {
            "method": m,
            "prefill_s": med[m]["prefill"],
            "decode_s": med[m]["decode"],
            "prefill_vs_base": med[m]["prefill"] / med["base"]["prefill"],
            "decode_vs_base": med[m]["decode"] / med["base"]["decode"],
        }
        for m in methods
    ]
    print_table(table, ["method", "prefill_s", "decode_s", "prefill_vs_base", "decode_vs_base"])
    by = {r["method"]: r for r in table}
    targets = [
        target("prefill_selection_over_base", by["selection"]["prefill_vs_base"], 1.05, "<="),
        target("prefill_mixture_over_base", by["mixture_k3"]["prefill_vs_base"], 1.10, "<="),
        target("decode_selection_over_base", by["selection"]["decode_vs_base"], 1.15, "<="),
        target("decode_mixture_over_base", by["mixture_k3"]["decode_vs_base"], 1.25, "<="),
        target(
            "decode_peft_over_selection",
            med["peft_adapter_names"]["decode"] / med["selection"]["decode"],
            2.0,
            ">=",
        ),
    ]
    write_result(
        "forward",
        {
            "layers": layers,
            "batch": batch,
            "adapters": n,
            "rank": 8,
            "prefill_tokens": tokens,
            "decode_steps": steps,
            "reps": args.reps,
            "targets": list(TARGETS),
            "quick": args.quick,
        },
        {"median_s": med, "table": table},
        targets,
        quick=args.quick,
    )


def peft_model(
    cfg: LlamaConfig,
    model: torch.nn.Module,
    adapters: list[LoraAdapter],
    names: list[str],
    tmp: Path,
) -> torch.nn.Module:
    """The same base weights and adapters in PEFT."""
    from peft import PeftModel

    base = LlamaForCausalLM(cfg)
    base.load_state_dict(model.state_dict())
    folders = [write_peft_folder(a, tmp / name) for a, name in zip(adapters, names, strict=True)]
    peft = PeftModel.from_pretrained(base.eval(), folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:], strict=True):
        peft.load_adapter(folder, adapter_name=name)
    return peft.eval()


if __name__ == "__main__":
    main()
