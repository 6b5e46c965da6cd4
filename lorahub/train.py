"""LoRA training (with the LoRA+ optimizer) on a task's examples; saves PEFT format.

Loss is on the answer tokens only; prompts get the base model's chat template. Training is
resumable: every `checkpoint_every` steps the adapter and optimizer state are saved as
safetensors (no pickle) under `<out>/checkpoint/`, and a rerun continues from there.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from composition import get_layer, set_layer
from lorahub.models import BaseModel
from lorahub.tasks import Example
from registry import AdapterMeta, BaseModelInfo, LoraAdapter, LoraModule, write_peft_folder


@dataclass(frozen=True)
class TrainConfig:
    """rank/alpha/targets: the adapter. lr is A's learning rate; B's is lr * loraplus_ratio
    (LoRA+, Hayou et al. 2024, who recommend a ratio of 16; 1 gives plain LoRA)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # the LoRA paper's choice (Hu et al. 2021)
    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-4
    loraplus_ratio: float = 16.0
    warmup: float = 0.1  # fraction of steps with a linear warm-up
    max_length: int = 256
    seed: int = 0
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.steps <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"rank, steps, batch_size and lr must be positive: {self}")
        if self.loraplus_ratio <= 0:
            raise ValueError(f"loraplus_ratio must be positive, got {self.loraplus_ratio}")


class TrainableLora(nn.Module):
    """base(x) + scaling * B A x with trainable A (Kaiming-uniform) and B (zeros), as PEFT."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def inject(model: nn.Module, cfg: TrainConfig) -> dict[str, TrainableLora]:
    """Wrap every nn.Linear whose leaf name is in cfg.targets; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in cfg.targets
    ]
    if not names:
        raise ValueError(f"no nn.Linear named {cfg.targets} in {type(model).__name__}")
    layers = {}
    for name in names:
        layers[name] = TrainableLora(get_layer(model, name), cfg.rank, cfg.alpha)
        set_layer(model, name, layers[name])
    return layers


def eject(model: nn.Module, layers: dict[str, TrainableLora]) -> None:
    for name, layer in layers.items():
        set_layer(model, name, layer.base_layer)


def encode_example(base: BaseModel, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt): the loss sees only the answer."""
    tok = base.tokenizer
    prompt = tok(base.format_prompt(ex.input), add_special_tokens=False)["input_ids"]
    answer = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = prompt[-max(1, max_length - len(answer)) :]  # keep the end of long prompts
    return prompt + answer, [-100] * len(prompt) + answer


def causal_batch(
    base: BaseModel, examples: Sequence[Example], max_length: int
) -> dict[str, Tensor]:
    pairs = [encode_example(base, ex, max_length) for ex in examples]
    width = max(len(ids) for ids, _ in pairs)
    pad = base.tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
            torch.tensor(x),
            torch.tensor(y),
            1,
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_batch(
    base: BaseModel, examples: Sequence[Example], max_length: int
) -> dict[str, Tensor]:
    tok = base.tokenizer
    enc = tok(
        [ex.input for ex in examples],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    labels = tok(
        [ex.target for ex in examples],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return {**enc, "labels": labels}


def make_batch(base: BaseModel, examples: Sequence[Example], max_length: int) -> dict[str, Tensor]:
    return (seq2seq_batch if base.is_seq2seq else causal_batch)(base, examples, max_length)


def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for `step`: epochs of seeded shuffles, so a resumed run sees the
    same batches as an uninterrupted one."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[(i * batch_size + j) % n] for j in range(batch_size)]


@dataclass(frozen=True)
class TrainResult:
    adapter: LoraAdapter
    losses: list[float]
    seconds: float


def _optimizer(layers: dict[str, TrainableLora], cfg: TrainConfig) -> torch.optim.AdamW:
    a = [m.lora_A for m in layers.values()]
    b = [m.lora_B for m in layers.values()]
    return torch.optim.AdamW(
        [{"params": a, "lr": cfg.lr}, {"params": b, "lr": cfg.lr * cfg.loraplus_ratio}],
        weight_decay=0.0,
    )


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _save_checkpoint(
    folder: Path,
    layers: dict,
    opt: torch.optim.Optimizer,
    step: int,
    losses: list[float],
    cfg: TrainConfig,
) -> None:
    tensors = {}
    for name, m in layers.items():
        for label, p in (("A", m.lora_A), ("B", m.lora_B)):
            tensors[f"{name}.{label}"] = p.detach().contiguous()
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"{name}.{label}.{key}"] = state[key].contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "state.safetensors.tmp")
    (folder / "state.safetensors.tmp").replace(folder / "state.safetensors")
    progress = {"step": step, "losses": losses, "config": asdict(cfg)}
    (folder / "progress.json.tmp").write_text(json.dumps(progress))
    (folder / "progress.json.tmp").replace(folder / "progress.json")


def _load_checkpoint(
    folder: Path, layers: dict, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, list[float]]:
    try:
        progress = json.loads((folder / "progress.json").read_text())
        tensors = load_file(folder / "state.safetensors")
    except (OSError, ValueError):
        return 0, []
    if progress.get("config") != json.loads(json.dumps(asdict(cfg))):
        return 0, []  # a different run: start over
    with torch.no_grad():
        for name, m in layers.items():
            for label, p in (("A", m.lora_A), ("B", m.lora_B)):
                p.copy_(tensors[f"{name}.{label}"])
                if f"{name}.{label}.exp_avg" in tensors:
                    opt.state[p] = {
                        "step": torch.tensor(float(progress["step"])),
                        "exp_avg": tensors[f"{name}.{label}.exp_avg"],
                        "exp_avg_sq": tensors[f"{name}.{label}.exp_avg_sq"],
                    }
    return progress["step"], progress["losses"]


def train_lora(
    base: BaseModel,
    examples: Sequence[Example],
    cfg: TrainConfig = TrainConfig(),
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on `examples`; the base model is left unchanged."""
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    model = base.model
    layers = inject(model, cfg)
    opt = _optimizer(layers, cfg)
    start_step, losses = (
        _load_checkpoint(checkpoint_dir, layers, opt, cfg) if checkpoint_dir else (0, [])
    )
    start = time.perf_counter()
    model.train()
    try:
        bar = tqdm(
            range(start_step, cfg.steps),
            initial=start_step,
            total=cfg.steps,
            disable=not progress,
            desc="train",
            leave=False,
        )
        for step in bar:
            for group, base_lr in zip(
                opt.param_groups, (cfg.lr, cfg.lr * cfg.loraplus_ratio), strict=True
            ):
                group["lr"] = base_lr * _lr_factor(step, cfg)
            idx = batch_for_step(len(examples), step, cfg.batch_size, cfg.seed)
            loss = model(**make_batch(base, [examples[i] for i in idx], cfg.max_length)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if checkpoint_dir and (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(checkpoint_dir, layers, opt, step + 1, losses, cfg)
    finally:
        model.eval()
        eject(model, layers)
    modules = {
        name: LoraModule(m.lora_A.detach().clone(), m.lora_B.detach().clone(), cfg.alpha)
        for name, m in layers.items()
    }
    info = BaseModelInfo(base.name, type(model).__name__)
    adapter = LoraAdapter(
        modules,
        False,
        info,
        AdapterMeta(
            prompt_format=base.prompt_format,  # encode_example formats prompts this way
            extra={
                "task_type": "SEQ_2_SEQ_LM" if base.is_seq2seq else "CAUSAL_LM",
                "train": asdict(cfg),
            },
        ),
    )
    return TrainResult(adapter, losses, time.perf_counter() - start)


def save_adapter(adapter: LoraAdapter, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    return write_peft_folder(adapter.to(dtype), out)
