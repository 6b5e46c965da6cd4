"""`LoraAdapter`: a LoRA adapter as plain data (tensors + identity + metadata)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from registry.errors import AdapterValueError


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: delta W = scaling * lora_B @ lora_A.

    lora_A: (r, d_in); lora_B: (d_out, r). `alpha` is this module's lora_alpha.
    """

    lora_A: Tensor
    lora_B: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def d_in(self) -> int:
        return self.lora_A.shape[1]

    @property
    def d_out(self) -> int:
        return self.lora_B.shape[0]


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r (LoRA, Hu et al. 2021) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class BaseModelInfo:
    """Which base model an adapter was made for.

    `name` is the model id or path as PEFT records it (`base_model_name_or_path`);
    `architecture` the transformers class name when known. The per-module shapes of the
    adapter itself pin down the hidden sizes.
    """

    name: str = "unknown"
    architecture: str | None = None


PROMPT_FORMATS = (None, "chat", "plain")


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter is for and where it came from (no effect on the math)."""

    task: str | None = None
    description: str | None = None
    examples: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    license: str | None = None
    source: str | None = None
    revision: str | None = None
    # How prompts looked in training: "chat" (the base model's chat template around the
    # turns) or "plain" (the raw text). None: not recorded (read as "chat").
    prompt_format: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise AdapterValueError(
                f"prompt_format must be one of {PROMPT_FORMATS[1:]}, got {self.prompt_format!r}"
            )

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "description": self.description,
            "examples": list(self.examples),
            "tags": list(self.tags),
            "license": self.license,
            "source": self.source,
            "revision": self.revision,
            "prompt_format": self.prompt_format,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> AdapterMeta:
        return cls(
            task=d.get("task"),
            description=d.get("description"),
            examples=tuple(str(x) for x in d.get("examples") or ()),
            tags=tuple(str(x) for x in d.get("tags") or ()),
            license=d.get("license"),
            source=d.get("source"),
            revision=d.get("revision"),
            prompt_format=d.get("prompt_format"),
            extra=dict(d.get("extra") or {}),
        )


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter: per target module (its full name in the base model) an A/B pair.

    Ranks and alphas may differ between modules. `modules` keys look like
    `model.layers.0.self_attn.q_proj` (the name `named_modules()` gives).
    """

    modules: dict[str, LoraModule]
    use_rslora: bool = False
    base_model: BaseModelInfo = BaseModelInfo()
    meta: AdapterMeta = AdapterMeta()

    @property
    def targets(self) -> list[str]:
        """Leaf names of the adapted layers (`q_proj`, `v_proj`, ...), sorted."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def rank(self) -> int:
        """The largest rank over modules."""
        return max(m.rank for m in self.modules.values())

    @property
    def num_parameters(self) -> int:
        return sum(m.lora_A.numel() + m.lora_B.numel() for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(
            m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
            for m in self.modules.values()
        )

    def scaling(self, module: str) -> float:
        m = self.modules[module]
        return lora_scaling(m.alpha, m.rank, self.use_rslora)

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense update scaling * B @ A of one module: (d_out, d_in)."""
        m = self.modules[module]
        return self.scaling(module) * (m.lora_B.to(dtype) @ m.lora_A.to(dtype))

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (d_in, d_out) of the base layer it adapts."""
        return {name: (m.d_in, m.d_out) for name, m in self.modules.items()}

    def with_meta(self, **changes: object) -> LoraAdapter:
        return replace(self, meta=replace(self.meta, **changes))

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        mods = {
            k: LoraModule(m.lora_A.to(dtype), m.lora_B.to(dtype), m.alpha)
            for k, m in self.modules.items()
        }
        return replace(self, modules=mods)

    def sha256(self) -> str:
        """Content hash over what defines the math: tensors (name, dtype, shape, bytes),
        alphas and the rsLoRA flag. Metadata does not change it, so identical weights
        registered under two names are stored once."""
        h = hashlib.sha256(f"rslora={self.use_rslora}\n".encode())
        for name in sorted(self.modules):
            m = self.modules[name]
            h.update(f"{name}\nalpha={m.alpha!r}\n".encode())
            for t in (m.lora_A, m.lora_B):
                t = t.detach().contiguous().cpu()
                h.update(f"{t.dtype}{tuple(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
