"""Compositions as ONE ordinary LoRA, for engines that apply a single adapter per request
(vLLM). Exact, no kernels needed:

    mixture (output space)  sum_i g_i s_i B_i A_i x  =  B' A' x  with  A' = [A_1; ...; A_k],
                            B' = [g_1 s_1 B_1, ..., g_k s_k B_k], rank sum r_i, scaling 1
                            (`composition.merge` "linear");
    fusion                  (sum_i g_i s_i B_i) (sum_i g_i A_i)  ("fusion");
    selection               one adapter, weight 1 (its own scaling folded in).

Weights are quantized to `step` before anything else, so near-equal routings share one
adapter, and the weights reported are the ones applied. A composition whose rank exceeds
the engine's limit is compressed by the svd merge (its relative error reported) unless the
request asks for exactness. Folders are content-addressed by (base model, members' sha256,
quantized weights, mode, rank limit, recipe version) and kept in a bounded LRU folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from composition import MergeConfig, Mode, merge
from registry import LoraAdapter, write_peft_folder

RECIPE = 1  # bump when the construction below changes: old folders are then never reused
MERGE_FOR = {Mode.mixture: "linear", Mode.fusion: "fusion"}


class RankLimitError(ValueError):
    """An exact composition would exceed the engine's LoRA rank limit."""


@dataclass(frozen=True)
class Materialized:
    """A composition written as a PEFT folder; `name` is how engines refer to it."""

    name: str
    path: Path
    weights: tuple[float, ...]  # as applied (quantized)
    rank: int
    rel_error: float  # 0 when exact; else the svd merge's worst per-module error


def quantize(weights: Sequence[float], step: float) -> tuple[float, ...]:
    return tuple(round(round(w / step) * step, 12) for w in weights)


def composition_key(
    base: str, shas: Sequence[str], weights: Sequence[float], mode: Mode, max_rank: int
) -> str:
    spec = {
        "recipe": RECIPE,
        "base": base,
        "members": list(shas),
        "weights": list(weights),
        "mode": str(mode),
        "max_rank": max_rank,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def compose_one(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    mode: Mode,
    max_rank: int,
    exact: bool,
) -> tuple[LoraAdapter, float]:
    """The composition as one adapter of rank <= max_rank, and its relative error."""
    adapter = merge(adapters, list(weights), MERGE_FOR[Mode(mode)]).adapter
    if adapter.rank <= max_rank:
        return adapter, 0.0
    if exact:
        raise RankLimitError(
            f"the exact composition has rank {adapter.rank}, above the engine's limit "
            f"{max_rank}; drop loraplex.exact to accept an svd compression, or raise the limit"
        )
    squeezed = merge([adapter], [1.0], "svd", MergeConfig(rank=max_rank))
    return squeezed.adapter, max(squeezed.rel_error.values())


class AdapterFolders:
    """The bounded on-disk cache of materialized compositions (least recently used go).

    A folder in use is pinned (`get(..., pin=True)` until `release`) and never evicted; one
    build per composition however many requests ask for it at once, and builds of different
    compositions run side by side."""

    def __init__(self, root: Path, max_entries: int = 256, step: float = 1e-3) -> None:
        if max_entries <= 0 or step <= 0:
            raise ValueError("max_entries and step must be positive")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.step = step
        self.builds = 0  # folders written (the others were found built)
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()
        self._building: dict[str, Future] = {}

    def get(
        self,
        adapters: Sequence[LoraAdapter],
        weights: Sequence[float],
        mode: Mode,
        max_rank: int,
        exact: bool = False,
        pin: bool = False,
    ) -> tuple[Materialized, list[str]]:
        """The folder for this composition (built once), and the names evicted to make
        room (engines unload those). Blocks while it is built: call it off event loops."""
        applied = quantize(weights, self.step)
        base = adapters[0].base_model.name
        key = composition_key(base, [a.sha256() for a in adapters], applied, mode, max_rank)
        name = f"lx-{key}"
        folder = self.root / name
        while True:
            self._build_once(
                name, applied, lambda: compose_one(adapters, applied, mode, max_rank, exact)
            )
            with self._lock:
                if not (folder / "loraplex.json").exists():  # evicted since: build it again
                    continue
                os.utime(folder)
                info = json.loads((folder / "loraplex.json").read_text())
                if exact and info["rel_error"] > 0:  # built earlier for a request that allowed it
                    raise RankLimitError(
                        f"the exact composition exceeds the engine's rank limit {max_rank}; "
                        "drop loraplex.exact to accept the svd compression"
                    )
                if pin:
                    self._pins[name] += 1
                evicted = self._evict(keep=name)
            made = Materialized(
                name, folder, tuple(info["weights"]), info["rank"], info["rel_error"]
            )
            return made, evicted

    def release(self, name: str) -> None:
        """Unpin a folder `get(..., pin=True)` returned (evictable again)."""
        with self._lock:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]

    def _build_once(
        self,
        name: str,
        applied: tuple[float, ...],
        compose: Callable[[], tuple[LoraAdapter, float]],
    ) -> None:
        """Write the folder unless it exists; a caller that finds it being built waits for
        that build (and builds it itself should that one fail: it may have asked for
        exactness this caller does not need)."""
        folder = self.root / name
        while True:
            with self._lock:
                if (folder / "loraplex.json").exists():
                    return
                running = self._building.get(name)
                if running is None:
                    running = self._building[name] = Future()
                    break
            running.result()  # never raises: a failed build is the builder's to report
        try:
            adapter, error = compose()
            tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}"
            write_peft_folder(adapter, tmp)
            info = {"weights": applied, "rank": adapter.rank, "rel_error": error}
            (tmp / "loraplex.json").write_text(json.dumps(info))
            with self._lock:
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
                self.builds += 1
        finally:
            with self._lock:
                del self._building[name]
            running.set_result(None)

    def _evict(self, keep: str) -> list[str]:
        folders = sorted(
            (p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("lx-")),
            key=lambda p: p.stat().st_mtime,
        )
        evicted = []
        for old in folders[: max(0, len(folders) - self.max_entries)]:
            if old.name != keep and old.name not in self._pins:
                shutil.rmtree(old, ignore_errors=True)
                evicted.append(old.name)
        return evicted
