"""Read and write the PEFT layout: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys look like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
loraplex's own metadata (task, examples, ...) travels in the safetensors header under the
key `loraplex`, so a single `.safetensors` file carries it too and PEFT ignores it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from pathlib import Path
from zipfile import BadZipFile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from registry.adapter import AdapterMeta, BaseModelInfo, LoraAdapter, LoraModule
from registry.errors import AdapterFormatError, AdapterShapeError, UnsafePathError
from registry.validate import Limits, check_pair, check_size

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
META_KEY = "loraplex"
_PREFIX = "base_model.model."
# `<module>.lora_A.weight`, optionally with an adapter name (`lora_A.default.weight`).
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose full name
    ends with it (as a regex), the first matching key wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def parse_config(config: dict, where: str) -> dict:
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {peft_type!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{where}: DoRA adapters (use_dora=true) are not supported")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterFormatError(f"{where}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterFormatError(f"{where}: 'lora_alpha' must be a positive number, got {alpha!r}")
    patterns = {k: config.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}
    for key, pat in patterns.items():
        if not isinstance(pat, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in pat.values()
        ):
            raise AdapterFormatError(f"{where}: '{key}' must map patterns to positive numbers")
        for p in pat:
            try:
                re.compile(p)
            except re.error as e:
                raise AdapterFormatError(f"{where}: bad pattern {p!r} in '{key}': {e}") from None
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterFormatError(f"{where}: 'use_rslora' must be true or false")
    base = config.get("base_model_name_or_path") or "unknown"
    if not isinstance(base, str):
        raise AdapterFormatError(f"{where}: 'base_model_name_or_path' must be a string")
    return {"r": r, "lora_alpha": float(alpha), "use_rslora": use_rslora, "base": base, **patterns}


def read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: missing ({CONFIG_NAME} is required)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path}: unreadable: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: malformed JSON: {e}") from None
    parsed = parse_config(raw, str(path))
    parsed["task_type"] = raw.get("task_type")
    return parsed


def _pair_tensors(tensors: dict[str, Tensor], where: str) -> dict[str, tuple[Tensor, Tensor]]:
    halves: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFormatError(f"{where}: unsupported tensor key {key!r}")
        module = m["module"].removeprefix(_PREFIX)
        if m["ab"] in halves.setdefault(module, {}):
            raise AdapterFormatError(f"{where}: {module} has two lora_{m['ab']} tensors")
        halves[module][m["ab"]] = t
    pairs = {}
    for module, ab in halves.items():
        missing = {"A", "B"} - ab.keys()
        if missing:
            raise AdapterFormatError(f"{where}: {module} has no lora_{missing.pop()} tensor")
        check_pair(module, ab["A"], ab["B"])
        pairs[module] = (ab["A"], ab["B"])
    if not pairs:
        raise AdapterFormatError(f"{where}: no LoRA tensors found")
    return pairs


def adapter_from_tensors(
    tensors: dict[str, Tensor], config: dict, meta: dict | None = None, where: str = "adapter"
) -> LoraAdapter:
    """Build a `LoraAdapter` from PEFT-style tensors and a parsed config (`_parse_config`)."""
    modules = {}
    for name, (a, b) in sorted(_pair_tensors(tensors, where).items()):
        rank = pattern_value(config["rank_pattern"], name, config["r"])
        if a.shape[0] != rank:
            raise AdapterShapeError(
                f"{where}: {name} has rank {a.shape[0]} but the config says r={rank}"
            )
        alpha = float(pattern_value(config["alpha_pattern"], name, config["lora_alpha"]))
        modules[name] = LoraModule(a, b, alpha)
    meta = dict(meta or {})
    base = BaseModelInfo(
        name=meta.pop("base_model", None) or config["base"],
        architecture=meta.pop("architecture", None),
    )
    if config.get("task_type"):
        meta.setdefault("extra", {})["task_type"] = config["task_type"]
    return LoraAdapter(modules, config["use_rslora"], base, AdapterMeta.from_json(meta))


def _safe_file(path: Path, root: Path) -> Path:
    """`path` itself, after checking that it (and any symlink it is) stays inside `root`."""
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise UnsafePathError(f"{path}: resolves to {real}, outside {real_root}")
    return path


def read_safetensors(path: Path, limits: Limits) -> tuple[dict[str, Tensor], dict]:
    """Tensors and loraplex metadata of one safetensors file. The header's declared sizes
    are checked against `limits` before any tensor is read."""
    try:
        with safe_open(path, framework="pt") as f:
            header_meta = f.metadata() or {}
            declared, keys = 0, list(f.keys())
            for key in keys:
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                declared += n * _DTYPES.get(sl.get_dtype(), 8)
            check_size(declared, limits)
            tensors = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        meta = json.loads(header_meta.get(META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: malformed '{META_KEY}' metadata: {e}") from None
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{path}: '{META_KEY}' metadata must be a JSON object")
    return tensors, meta


def module_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """Module -> (d_in, d_out) of a PEFT safetensors file, from its header alone (no
    tensor is read)."""
    shapes: dict[str, list[int]] = {}
    try:
        with safe_open(path, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            for key in names:
                m = _KEY.match(key)
                if m is not None:
                    shape = f.get_slice(key).get_shape()  # A: (r, d_in), B: (d_out, r)
                    dims = shapes.setdefault(m["module"].removeprefix(_PREFIX), [0, 0])
                    if m["ab"] == "A":
                        dims[0] = shape[1]
                    else:
                        dims[1] = shape[0]
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: {e}") from None
    return {name: (dims[0], dims[1]) for name, dims in shapes.items()}


def read_legacy_bin(path: Path, limits: Limits) -> dict[str, Tensor]:
    """Legacy `adapter_model.bin`: tensors only, never code (`weights_only=True`)."""
    check_size(path.stat().st_size, limits)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, BadZipFile) as e:
        raise UnsafePathError(f"{path}: refused (not a plain tensor file): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path}: expected a dict of tensors")
    return state


def read_peft_folder(folder: Path, limits: Limits, root: Path | None = None) -> LoraAdapter:
    """Read a PEFT adapter folder. Every file read must resolve inside `root` (default:
    the folder itself), so a symlink cannot pull in files from elsewhere."""
    root = root or folder
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a folder")
    config = read_config(_safe_file(folder / CONFIG_NAME, root))
    weights = folder / WEIGHTS_NAME
    if weights.exists() or weights.is_symlink():
        tensors, meta = read_safetensors(_safe_file(weights, root), limits)
    elif (folder / LEGACY_WEIGHTS_NAME).exists():
        tensors, meta = read_legacy_bin(_safe_file(folder / LEGACY_WEIGHTS_NAME, root), limits), {}
    else:
        raise AdapterFormatError(f"{folder}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    return adapter_from_tensors(tensors, config, meta, str(folder))


def read_safetensors_adapter(path: Path, limits: Limits) -> LoraAdapter:
    """A bare `.safetensors` file. Its PEFT config may sit in the header's metadata
    (`loraplex` -> `config`); otherwise alpha = r (scaling 1) is assumed."""
    tensors, meta = read_safetensors(path, limits)
    raw_config = meta.pop("config", None)
    if raw_config is None:
        ranks = Counter(int(t.shape[0]) for k, t in tensors.items() if ".lora_A" in k)
        r = ranks.most_common(1)[0][0] if ranks else 1
        raw_config = {"r": r, "lora_alpha": r, "rank_pattern": {}}
        raw_config["rank_pattern"] = {
            re.escape(_KEY.match(k)["module"].removeprefix(_PREFIX)): int(t.shape[0])
            for k, t in tensors.items()
            if _KEY.match(k) and ".lora_A" in k and t.ndim == 2 and t.shape[0] != r
        }
    config = parse_config(raw_config, f"{path} (config in header)")
    config["task_type"] = raw_config.get("task_type") if isinstance(raw_config, dict) else None
    return adapter_from_tensors(tensors, config, meta, str(path))


def peft_config(adapter: LoraAdapter) -> dict:
    """An `adapter_config.json` that PEFT loads: most common rank/alpha at the top level,
    the others as exact-name patterns; targets listed by full module name."""
    ranks = Counter(m.rank for m in adapter.modules.values())
    alphas = Counter(m.alpha for m in adapter.modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    exact = {name: re.escape(name) for name in adapter.modules}
    return {
        "peft_type": "LORA",
        "task_type": adapter.meta.extra.get("task_type"),
        "base_model_name_or_path": adapter.base_model.name,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {exact[n]: m.rank for n, m in adapter.modules.items() if m.rank != r},
        "alpha_pattern": {
            exact[n]: m.alpha for n, m in adapter.modules.items() if m.alpha != alpha
        },
        "use_rslora": adapter.use_rslora,
        "target_modules": sorted(adapter.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }


def peft_tensors(adapter: LoraAdapter) -> dict[str, Tensor]:
    out = {}
    for name, m in adapter.modules.items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        out[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    return out


def header_metadata(adapter: LoraAdapter, with_config: bool = False) -> dict[str, str]:
    meta = adapter.meta.to_json()
    meta["base_model"] = adapter.base_model.name
    meta["architecture"] = adapter.base_model.architecture
    if with_config:
        meta["config"] = peft_config(adapter)
    return {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)}


def write_safetensors_atomic(
    tensors: dict[str, Tensor], metadata: dict[str, str], path: Path
) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_peft_folder(adapter: LoraAdapter, folder: Path | str) -> Path:
    """Save `adapter` as a PEFT folder (loads with `PeftModel.from_pretrained`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(peft_tensors(adapter), header_metadata(adapter), folder / WEIGHTS_NAME)
    tmp = folder / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(peft_config(adapter), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CONFIG_NAME)
    return folder
