"""Where adapters come from: a local folder, a `.safetensors` file, or `hf://owner/name[@rev]`.

One table maps a source kind to its loader. Hub sources go through `huggingface_hub`, so its
cache (HF_HOME / HF_HUB_CACHE), token and offline mode (HF_HUB_OFFLINE) apply as usual.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from registry.adapter import LoraAdapter
from registry.errors import AdapterFormatError, AdapterNotFoundError, UnsafePathError
from registry.peft_format import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    read_peft_folder,
    read_safetensors_adapter,
)
from registry.validate import Limits

_HF = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<sub>[\w./-]+?))?(?:@(?P<rev>[\w./-]+))?$"
)
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _from_path(spec: str, limits: Limits) -> LoraAdapter:
    path = Path(spec).expanduser()
    if not path.exists():
        raise AdapterNotFoundError(f"{spec}: no such file or folder")
    if path.is_dir():
        adapter = read_peft_folder(path, limits)
    elif path.suffix == ".safetensors":
        adapter = read_safetensors_adapter(path, limits)
    elif path.suffix in _PICKLE_SUFFIXES:
        raise UnsafePathError(
            f"{spec}: pickle-based files are refused; pass the adapter folder "
            f"(a legacy {LEGACY_WEIGHTS_NAME} is read there with weights_only=True)"
        )
    else:
        raise AdapterFormatError(f"{spec}: expected an adapter folder or a .safetensors file")
    return adapter.with_meta(source=str(path.resolve()))


def _from_hub(spec: str, limits: Limits) -> LoraAdapter:
    """`hf://owner/name[/subfolder][@revision]` through the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    m = _HF.match(spec)
    if m is None or ".." in spec:
        raise UnsafePathError(f"{spec}: not a valid hf://owner/name[/subfolder][@revision] address")
    sub = m["sub"]
    patterns = [CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME]
    if sub:
        patterns = [f"{sub}/{p}" for p in patterns]
    try:
        snapshot = Path(snapshot_download(m["repo"], revision=m["rev"], allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise AdapterNotFoundError(
            f"{spec}: not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline mode or no network): {e}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise AdapterNotFoundError(f"{spec}: cannot fetch from the Hub: {e}") from None
    # Snapshot files are symlinks into the repo's blobs/: allow the repo cache folder.
    repo_root = snapshot.parent.parent
    adapter = read_peft_folder(snapshot / sub if sub else snapshot, limits, root=repo_root)
    # The snapshot folder is named by the resolved commit sha.
    return adapter.with_meta(
        source=f"hf://{m['repo']}" + (f"/{sub}" if sub else ""), revision=snapshot.name
    )


SOURCES: dict[str, Callable[[str, Limits], LoraAdapter]] = {
    "hf://": _from_hub,
    "": _from_path,
}


def load_source(spec: str, limits: Limits | None = None) -> LoraAdapter:
    """Read an adapter from a source address; checks format and limits, not values."""
    limits = limits or Limits()
    for prefix, loader in SOURCES.items():
        if spec.startswith(prefix):
            return loader(spec, limits)
    raise AdapterFormatError(f"{spec}: unknown source kind")
