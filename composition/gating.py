"""Learned gating over frozen LoRA adapters (MoLE, Wu et al. 2024; LoRA-Flow, Wang et al.
2024): at every adapted layer, gates = softmax(W h + b) from the layer's input hidden state,
per token. Only W and b train; the base model and the adapters stay frozen. The gate is a
`TokenGate`, so it runs inside the composer's forward pass (and with the KV cache, since a
token's gates depend only on its own hidden state).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from registry import AdapterError


def _key(module: str) -> str:
    return module.replace(".", "__")  # nn.ModuleDict keys cannot hold dots


class LearnedGate(nn.Module):
    """One linear router per adapted layer: (b, t, d_in) -> softmax over n adapters.

    Zero-initialized, so training starts from the uniform mixture. `balance` records the
    gates of the last forward pass for the MoLE-style balance loss.
    """

    def __init__(self, layers: Mapping[str, int], n: int, temperature: float = 1.0) -> None:
        super().__init__()
        if n < 1 or temperature <= 0:
            raise ValueError(f"need n >= 1 adapters and temperature > 0, got {n}, {temperature}")
        self.names = dict(layers)
        self.n = n
        self.temperature = temperature
        self.routers = nn.ModuleDict({_key(m): nn.Linear(d, n) for m, d in self.names.items()})
        for r in self.routers.values():
            nn.init.zeros_(r.weight)
            nn.init.zeros_(r.bias)
        self._seen: list[Tensor] = []

    def __call__(self, module: str, x: Tensor) -> Tensor:  # the TokenGate protocol
        router = self.routers[_key(module)]
        gates = torch.softmax(router(x.to(router.weight.dtype)) / self.temperature, dim=-1)
        if self.training:
            self._seen.append(gates)
        return gates

    def balance_loss(self) -> Tensor:
        """Squared coefficient of variation of each adapter's mean gate, averaged over the
        layers of the last pass (0 when every adapter is used equally); then forgets them."""
        if not self._seen:
            return torch.zeros(())
        loss = torch.stack(
            [
                (lambda m: m.var(unbiased=False) / m.mean().square())(g.reshape(-1, self.n).mean(0))
                for g in self._seen
            ]
        ).mean()
        self._seen = []
        return loss

    def forget(self) -> None:
        self._seen = []

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path)
        meta = {"layers": self.names, "n": self.n, "temperature": self.temperature}
        path.with_suffix(".json").write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: Path | str) -> LearnedGate:
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            tensors = load_file(path)
            gate = cls(meta["layers"], meta["n"], meta["temperature"])
            gate.load_state_dict(tensors)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise AdapterError(f"{path}: not a saved LearnedGate: {e}") from None
        return gate
