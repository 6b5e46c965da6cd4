"""LoraHub learning, side by side with the reference `lorahub==0.1.0`.

    python benchmarks/bench_lorahub.py [--quick]

Same config-built T5, same 20 random rank-16 PEFT adapters, 5 examples, 40 steps, 3 seeds.
The reference runs in its own virtual environment (created here on first use: its top-level
package is called `lorahub`, like ours), all seeds in one process; both sides time warm runs
(one untimed run first). Both final weight vectors are rescored by the same function under one
objective, ours: token-mean cross-entropy + 0.05 * mean |w| (the reference divides its loss
by the number of examples as well, a quirk we do not copy). Then ours alone on a causal LM
with SmolLM2-135M's shapes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import print_table, smollm_config, target, write_result
from transformers import LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from lorahub.learn import LoraHubConfig, PopulationScorer, learn_weights
from lorahub.models import BaseModel
from lorahub.tasks import Example
from registry import load_source

REF_VENV = Path(__file__).parent / ".venv-lorahub"
EXAMPLES = [
    Example(
        "translate English to German: The house is wonderful.", targets=("Das Haus ist wunderbar.",)
    ),
    Example("translate English to German: I like green apples.", targets=("Ich mag grüne Äpfel.",)),
    Example("translate English to German: Where is the station?", targets=("Wo ist der Bahnhof?",)),
    Example(
        "translate English to German: The weather is nice today.",
        targets=("Das Wetter ist heute schön.",),
    ),
    Example("translate English to German: We are going home.", targets=("Wir gehen nach Hause.",)),
]

# One process for all seeds, after an untimed warm-up run, as ours (both sides warm);
# -I keeps this checkout's own `lorahub` package off the reference's path.
REFERENCE_RUN = """
import json, sys, time
from lorahub.algorithm import lorahub_learning
args = json.loads(sys.argv[1])
def run(steps, seed):
    start = time.perf_counter()
    weights, model, tokenizer = lorahub_learning(args["modules"], args["inputs"],
        args["outputs"], max_inference_step=steps, model_name_or_path=args["model"],
        batch_size=None, seed=seed)
    return {"weights": [float(w) for w in weights], "seconds": time.perf_counter() - start}
run(2, 0)
print(json.dumps([run(args["steps"], seed) for seed in args["seeds"]]))
"""


def reference_python() -> Path:
    """The reference package in its own venv (CPU torch from this machine's pip)."""
    py = REF_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(REF_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run(
            [
                *pip,
                "transformers",
                "peft",
                "nevergrad",
                "datasets",
                "pandas",
                "sentencepiece",
                "numpy<2.4",
            ],
            check=True,
        )
        subprocess.run([*pip, "--no-deps", "lorahub==0.1.0"], check=True)
    return py


def char_tokenizer():
    """A real byte-level tokenizer built offline, shared by both sides."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{chr(i): i + 3 for i in range(256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_t5(folder: Path, n_adapters: int, seed: int = 0) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=300,
        d_model=256,
        d_ff=512,
        d_kv=32,
        num_layers=4,
        num_heads=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(folder / "t5")
    char_tokenizer().save_pretrained(folder / "t5")
    paths = []
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        lcfg = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q", "v"],
            init_lora_weights=False,
            task_type="SEQ_2_SEQ_LM",
        )
        peft = get_peft_model(T5ForConditionalGeneration.from_pretrained(folder / "t5"), lcfg)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data.mul_(0.05)
        peft.save_pretrained(folder / f"lora{i}")
        paths.append(folder / f"lora{i}")
    return folder / "t5", paths


def objective(base: BaseModel, adapters: list, weights: list[float], l1: float = 0.05) -> float:
    scorer = PopulationScorer(base, adapters, EXAMPLES)
    try:
        w = torch.tensor([weights])
        return float(scorer.losses(w)[0] + l1 * w.abs().mean())
    finally:
        scorer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_adapters, seeds, steps = (6, [0], 20) if args.quick else (20, [0, 1, 2], 40)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t5_dir, paths = make_t5(Path(tmp), n_adapters)
        base = BaseModel(
            "t5", T5ForConditionalGeneration.from_pretrained(t5_dir).eval(), char_tokenizer()
        )
        adapters = [load_source(str(p)) for p in paths]
        py = reference_python()
        payload = json.dumps(
            {
                "modules": [str(p) for p in paths],
                "inputs": [e.input for e in EXAMPLES],
                "outputs": [e.target for e in EXAMPLES],
                "steps": steps,
                "model": str(t5_dir),
                "seeds": seeds,
            }
        )
        out = subprocess.run(
            [str(py), "-I", "-c", REFERENCE_RUN, payload], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(f"reference lorahub failed:\n{out.stderr[-3000:]}")
        refs = json.loads(out.stdout.strip().splitlines()[-1])
        learn_weights(base, adapters, EXAMPLES, LoraHubConfig(steps=2), progress=False)  # warm-up
        for seed, ref in zip(seeds, refs, strict=True):
            ours = learn_weights(
                base, adapters, EXAMPLES, LoraHubConfig(steps=steps, seed=seed), progress=False
            )
            rows.append(
                {
                    "model": "t5",
                    "seed": seed,
                    "ref_s": ref["seconds"],
                    "ours_s": ours.seconds,
                    "speedup": ref["seconds"] / ours.seconds,
                    "ref_objective": objective(base, adapters, ref["weights"]),
                    "ours_objective": objective(base, adapters, ours.weights),
                    "ours_evals": len(ours.history),
                }
            )
            print(rows[-1], flush=True)
        causal = BaseModel(
            "smollm2-shapes",
            LlamaForCausalLM(smollm_config(30 if not args.quick else 4)).eval(),
            char_tokenizer(),
        )
        causal.tokenizer.padding_side = "left"
        causal_adapters = _random_causal(causal.model, n_adapters)
        ours = learn_weights(
            causal, causal_adapters, EXAMPLES, LoraHubConfig(steps=steps), progress=False
        )
        rows.append(
            {
                "model": "smollm2-shapes (causal)",
                "seed": 42,
                "ours_s": ours.seconds,
                "ours_objective": ours.objective,
                "ours_evals": len(ours.history),
            }
        )
    print_table(
        rows,
        [
            "model",
            "seed",
            "ref_s",
            "ours_s",
            "speedup",
            "ref_objective",
            "ours_objective",
            "ours_evals",
        ],
    )
    t5 = [r for r in rows if r["model"] == "t5"]
    speedup = min(r["speedup"] for r in t5)
    worse = max(r["ours_objective"] - r["ref_objective"] for r in t5)
    targets = [
        target("min_speedup_vs_reference", speedup, 5.0, ">="),
        target("max_objective_gap_ours_minus_reference", worse, 0.0, "<="),
    ]
    write_result(
        "lorahub",
        {
            "adapters": n_adapters,
            "rank": 16,
            "examples": len(EXAMPLES),
            "steps": steps,
            "seeds": seeds,
            "quick": args.quick,
        },
        rows,
        targets,
        quick=args.quick,
    )


def _random_causal(model: torch.nn.Module, n: int) -> list:
    from registry import BaseModelInfo, LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(0)
    layers = {k: m for k, m in model.named_modules() if k.endswith(("q_proj", "v_proj"))}
    return [
        LoraAdapter(
            {
                k: LoraModule(
                    torch.randn(16, m.in_features, generator=g) / m.in_features**0.5,
                    torch.randn(m.out_features, 16, generator=g) * 0.01,
                    32.0,
                )
                for k, m in layers.items()
            },
            base_model=BaseModelInfo("smollm2-shapes"),
        )
        for _ in range(n)
    ]


if __name__ == "__main__":
    main()
