"""Tensors derived from adapters (Arrow's prototypes), cached beside the registry. A key
names the content it derives from (a sha256), so an entry never goes stale; a damaged
entry is recomputed."""

from __future__ import annotations

import contextlib
import glob
import re
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from registry.errors import UnsafePathError
from registry.peft_format import write_safetensors_atomic


def cached_tensors(
    folder: Path, key: str, make: Callable[[], dict[str, Tensor]], replaces: str = ""
) -> dict[str, Tensor]:
    """folder/<key>.safetensors if readable, else `make()` written there atomically. With
    `replaces` (a prefix of `key`), writing removes the other entries under that prefix:
    for tables of which only the latest is read (the task router's heads at 10,000
    adapters are about 310 MB, written again for every change to the catalogue)."""
    found = read_cached(folder, key)
    if found is not None:
        return found
    if not key.startswith(replaces):
        raise ValueError(f"cache key {key!r} does not start with {replaces!r}")
    tensors = make()
    folder.mkdir(exist_ok=True)
    path = _path(folder, key)
    write_safetensors_atomic({k: v.contiguous() for k, v in tensors.items()}, {}, path)
    if replaces:
        for old in folder.glob(f"{glob.escape(replaces)}*.safetensors"):
            if old != path:
                with contextlib.suppress(OSError):  # open elsewhere (Windows): left for later
                    old.unlink(missing_ok=True)
    return tensors


def read_cached(folder: Path, key: str) -> dict[str, Tensor] | None:
    """folder/<key>.safetensors, or None when absent or damaged (then removed)."""
    path = _path(folder, key)
    if not path.exists():
        return None
    try:
        return load_file(path)
    except (OSError, SafetensorError):
        path.unlink(missing_ok=True)
        return None


def _path(folder: Path, key: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", key):
        raise UnsafePathError(f"invalid cache key {key!r}")
    return folder / f"{key}.safetensors"
