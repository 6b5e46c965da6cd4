"""A server that keeps running while its registry changes: adapters registered (by another
process), replaced and removed are served as the registry holds them now, never as it held
them at start. The real `openai` client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import build_model
from test_hub import REGISTER_ELSEWHERE
from test_serve import EXAMPLES, PROMPTS, adapter_for, client, running_server, tiny_base

from lorahub.hub import Hub
from registry import Registry
from router import Retriever, Routing

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture
def registry_dir(tmp_path: Path, embedder) -> Path:
    model = build_model("llama")
    with Registry(tmp_path, embedder=embedder) as reg:
        for i, (name, examples) in enumerate(EXAMPLES.items()):
            reg.register(adapter_for(model, i), name=name, examples=examples)
    return tmp_path


@pytest.fixture
def url(registry_dir: Path, embedder) -> Iterator[str]:
    with running_server(registry_dir, embedder, max_batch=4) as (url, _):
        yield url


def ask(url: str, model: str, prompt: str, **extra) -> tuple[str, dict]:
    reply = client(url).chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], extra_body=extra, **GREEDY
    )
    return reply.choices[0].message.content, reply.model_extra["loraplex"]


def models(url: str) -> set[str]:
    return {m.id for m in client(url).models.list()}


def test_an_adapter_for_another_base_registered_while_serving_is_never_offered(
    url: str, registry_dir: Path, embedder
) -> None:
    assert "math" in models(url) and ask(url, "auto", PROMPTS[0])[1]["adapters"]
    subprocess.run(
        [sys.executable, "-c", REGISTER_ELSEWHERE, str(registry_dir), *PROMPTS], check=True
    )  # another process; its examples are the prompts, so the retriever ranks it high
    with Registry(registry_dir, embedder=embedder) as reg:
        assert any(n == "g" for p in PROMPTS for n, _ in reg.search(p, k=3))
    assert "g" not in models(url)
    with pytest.raises(openai.NotFoundError):
        ask(url, "g", PROMPTS[0])
    with pytest.raises(openai.NotFoundError):
        ask(url, "auto", PROMPTS[0], loraplex={"adapters": {"g": 1.0}})
    for prompt in PROMPTS:
        _, report = ask(url, "auto", prompt, loraplex={"k": 3})
        assert report["adapters"] and "g" not in {a["name"] for a in report["adapters"]}


def test_an_adapter_replaced_while_serving_answers_with_its_new_weights(
    url: str, registry_dir: Path, embedder
) -> None:
    old_text, old = ask(url, "math", PROMPTS[0])
    with Registry(registry_dir, embedder=embedder) as reg:
        sha = reg.register(
            adapter_for(build_model("llama"), 7),
            name="math",
            examples=EXAMPLES["math"],
            replace=True,
        ).sha256
        hub = Hub(reg, tiny_base(), Retriever(reg))
        routing = [Routing(("math",), (1.0,))]
        want = hub.generate(PROMPTS[:1], routings=routing, compose="selection", max_new_tokens=8)
    text, report = ask(url, "math", PROMPTS[0])
    assert old["applied"]["sha256"]["math"] != sha == report["applied"]["sha256"]["math"]
    assert text.strip() == want[0].text != old_text.strip()


def test_an_adapter_removed_while_serving_is_gone_from_every_path(
    url: str, registry_dir: Path, embedder
) -> None:
    assert "mood" in models(url) and ask(url, "mood", PROMPTS[2])[1]["adapters"]
    with Registry(registry_dir, embedder=embedder) as reg:
        reg.remove("mood")
    assert "mood" not in models(url)
    with pytest.raises(openai.NotFoundError):
        ask(url, "mood", PROMPTS[2])
    for prompt in PROMPTS:
        _, report = ask(url, "auto", prompt, loraplex={"k": 3})
        assert "mood" not in {a["name"] for a in report["adapters"]}
