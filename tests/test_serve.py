"""The OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client: what it
answers equals the in-process `Hub.generate` for the same prompt and routing, concurrent
streams do not disturb each other, and every client mistake is a 4xx in the OpenAI shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import build_model, char_tokenizer, free_port, serving

from lorahub import inference
from lorahub.hub import Hub
from lorahub.inference import Sampling
from lorahub.models import BaseModel
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.serve.validate import Limits
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import Retriever, Routing, TaskRouter, TaskRouterConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
EXAMPLES = {
    "math": ["What is 17 plus 25?", "Compute 9 times 6.", "What is 100 minus 37?"],
    "french": ["Translate 'bonjour' to English.", "How do you say dog in French?"],
    "mood": ["I hated that movie, it was awful.", "What a wonderful, happy day!"],
}
PROMPTS = ["What is 8 plus 13?", "Say cat in French.", "This film was dreadful.", "hi"]


def adapter_for(model: torch.nn.Module, seed: int, scale: float = 0.5) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {
        name: LoraModule(
            torch.randn(4, m.in_features, generator=g) * scale,
            torch.randn(m.out_features, 4, generator=g) * scale,
            8.0,
        )
        for name, m in model.named_modules()
        if name.endswith(("q_proj", "v_proj", "down_proj"))
    }
    return LoraAdapter(mods, base_model=BaseModelInfo("tiny-llama"))


def tiny_base() -> BaseModel:
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return BaseModel("tiny-llama", build_model("llama"), tok)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory, embedder) -> Path:
    root = tmp_path_factory.mktemp("serve-registry")
    model = build_model("llama")
    with Registry(root, embedder=embedder) as reg:
        for i, (name, examples) in enumerate(EXAMPLES.items()):
            reg.register(adapter_for(model, i), name=name, examples=examples)
        reg.register(adapter_for(model, 9, scale=1e25), name="broken")  # no examples: never routed
    return root


@contextmanager
def running_server(
    registry_dir: Path,
    embedder,
    config: ServeConfig | None = None,
    router=Retriever,
    base=None,
    **batching,
) -> Iterator[tuple[str, BatchingEngine]]:
    """The app under uvicorn on 127.0.0.1 in a thread; its own model (`base`, else
    `tiny_base()`) and registry handle, `router(registry)` routing."""
    reg = Registry(registry_dir, embedder=embedder)
    hub = Hub(reg, base or tiny_base(), router(reg))
    engine = BatchingEngine(hub, BatchingConfig(**batching))
    try:
        # the config names the router for the report: these hubs route with the retriever
        with serving(create_app(hub, engine, config or ServeConfig(router="retriever"))) as url:
            yield url, engine
    finally:
        reg.close()


@pytest.fixture(scope="module")
def server(registry_dir: Path, embedder) -> Iterator[tuple[str, BatchingEngine]]:
    with running_server(registry_dir, embedder, max_batch=8) as s:
        yield s


@pytest.fixture(scope="module")
def reference(registry_dir: Path, embedder) -> Iterator[Hub]:
    """An in-process hub over an identical model: the oracle the server must equal."""
    reg = Registry(registry_dir, embedder=embedder)
    yield Hub(reg, tiny_base(), Retriever(reg))
    reg.close()


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
    )


GREEDY = {"temperature": 0, "max_tokens": 10}
JSON = {"content-type": "application/json"}


def hub_text(hub: Hub, prompt: str, report: dict) -> str:
    routing = Routing.from_json(report)
    return hub.generate([prompt], routings=[routing], compose=report["compose"], max_new_tokens=10)[
        0
    ].text


# -- what the server answers equals Hub.generate ------------------------------------------------


@pytest.mark.parametrize(
    "model, extra",
    [
        ("math", None),
        ("auto:selection", None),
        ("auto:mixture", {"loraplex": {"k": 2}}),
        ("auto:fusion", {"loraplex": {"adapters": {"math": 0.7, "mood": 0.3}}}),
        ("tiny-llama", None),
    ],
)
def test_chat_equals_hub_generate_streaming_or_not(server, reference, model, extra) -> None:
    url, _ = server
    c = client(url)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=messages, extra_body=extra, **GREEDY
        )
        reply = raw.parse()
        report = reply.model_extra["loraplex"]
        assert json.loads(raw.headers["x-loraplex-routing"]) == report
        assert reply.choices[0].message.content.strip() == hub_text(reference, prompt, report)
        stream = c.chat.completions.create(
            model=model, messages=messages, extra_body=extra, stream=True, **GREEDY
        )
        streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert streamed == reply.choices[0].message.content
    if model.startswith("auto") and extra is None:
        assert report["router"] == "retriever" and report["adapters"][0]["score"] > 0


def test_the_task_router_reports_its_confidence_and_abstains_when_nothing_fits(
    registry_dir, embedder, reference
) -> None:
    fits = TaskRouter(reference.registry, TaskRouterConfig(fit_threshold=-1.0)).route(PROMPTS, 1)
    scores = sorted(r.confidence for r in fits)
    threshold = (scores[0] + scores[-1]) / 2  # some prompts fit, some do not

    def task_router(reg: Registry) -> TaskRouter:
        return TaskRouter(reg, TaskRouterConfig(fit_threshold=threshold, broad_threshold=-1.0))

    config = ServeConfig(router="task")
    with running_server(registry_dir, embedder, config, router=task_router) as (url, _):
        c = client(url)
        for prompt, fit in zip(PROMPTS, fits, strict=True):
            raw = c.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}], **GREEDY
            )
            reply = raw.parse()
            report = reply.model_extra["loraplex"]
            assert report["router"] == "task"
            assert report["confidence"] == pytest.approx(fit.confidence, abs=1e-5)
            if fit.confidence < threshold:  # nothing fits: the base model answers, and says so
                assert report["adapters"] == [] and "no adapter fits" in report["note"]
                want = reference.generate([prompt], compose="none", max_new_tokens=10)[0].text
            else:
                assert report["adapters"][0]["name"] == fit.adapters[0]
                want = hub_text(reference, prompt, report)
            assert reply.choices[0].message.content.strip() == want
        scraped = httpx.get(f"{url}/metrics").text
        abstained = sum(f.confidence < threshold for f in fits)
        assert f"loraplex_routed_to_base_total {float(abstained)}" in scraped


def raw_answer(hub: Hub, prompt: str, routing: Routing) -> str:
    """The oracle of a completion: the prompt as raw text (no chat template) under
    `routing`."""
    with hub.composed([routing]) as applied:
        return inference.generate(hub.base, [prompt], applied, Sampling(10), formatted=True)[0]


def prompt_logprobs_of(hub: Hub, ids: list[int], routing: Routing) -> list[float]:
    """The oracle of echo's logprobs: one forward of the prompt under `routing`, its
    log-softmax in float64 at each position that predicts a prompt token."""
    with (
        torch.inference_mode(),
        hub.composed([routing]) as applied,
        applied.rows(torch.tensor([0])),
    ):
        logits = hub.base.model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_completions_read_the_prompt_as_raw_text(server, reference) -> None:
    """/v1/completions reads the prompt as raw text, as OpenAI's and vLLM's do (few-shot
    prompts, the harness); only chat completions apply the chat template."""
    url, _ = server
    c = client(url)
    templated = 0
    for prompt in PROMPTS:
        done = c.completions.create(model="auto", prompt=prompt, **GREEDY)
        routing = Routing.from_json(done.model_extra["loraplex"])
        assert done.choices[0].text.strip() == raw_answer(reference, prompt, routing)
        chat = c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": prompt}], **GREEDY
        )
        templated += done.choices[0].text != chat.choices[0].message.content
        streamed = c.completions.create(model="auto", prompt=prompt, stream=True, **GREEDY)
        assert "".join(ch.choices[0].text for ch in streamed) == done.choices[0].text
    assert templated  # the template changes answers: the raw equality above is not the chat's


def test_token_id_prompts_and_prompt_lists_answer_each_prompt_in_order(server, reference) -> None:
    url, _ = server
    c = client(url)
    tok = reference.base.tokenizer
    texts = PROMPTS[:3]
    alone = [c.completions.create(model="auto", prompt=t, **GREEDY) for t in texts]
    reports = [a.model_extra["loraplex"] for a in alone]
    assert len({r["adapters"][0]["name"] for r in reports}) > 1  # each prompt routed alone
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for prompt in (texts, ids):
        together = c.completions.create(model="auto", prompt=prompt, **GREEDY)
        assert [ch.index for ch in together.choices] == [0, 1, 2]
        assert [ch.text for ch in together.choices] == [a.choices[0].text for a in alone]
        for ch, report in zip(together.choices, reports, strict=True):  # batched embedding
            got = ch.model_extra["loraplex"]["adapters"]
            assert [a["name"] for a in got] == [a["name"] for a in report["adapters"]]
            assert [a["weight"] for a in got] == pytest.approx(
                [a["weight"] for a in report["adapters"]], abs=1e-4
            )
        assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    one = c.completions.create(model="auto", prompt=ids[1], **GREEDY)
    assert one.choices[0].text == alone[1].choices[0].text


@pytest.mark.parametrize(
    "model, extra",
    [("math", None), ("auto:mixture", {"loraplex": {"adapters": {"math": 0.7, "mood": 0.3}}})],
)
def test_echo_gives_the_prompt_logprobs_of_the_composed_forward(
    server, reference, model, extra
) -> None:
    """echo + logprobs (what lm-evaluation-harness sends to score options): the prompt's
    logprobs come from the request's own composition, then the answer's (max_tokens 1),
    or none (max_tokens 0), in OpenAI's legacy shape (vLLM's: null for the first token)."""
    url, _ = server
    c = client(url)
    prompt = "What is 8 plus 13? 21"
    ids = reference.base.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = len(ids)
    args = {"model": model, "prompt": prompt, "logprobs": 2, "temperature": 0, "extra_body": extra}
    plain = c.completions.create(max_tokens=1, **args).choices[0]
    for max_tokens in (0, 1):
        reply = c.completions.create(echo=True, max_tokens=max_tokens, **args)
        choice, lp = reply.choices[0], reply.choices[0].logprobs
        routing = Routing.from_json(reply.model_extra["loraplex"])
        want = prompt_logprobs_of(reference, ids, routing)
        assert lp.tokens[:n] == [reference.base.tokenizer.decode([i]) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:n] == pytest.approx(want, abs=1e-5)
        for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
            assert len(top) <= 3 and max(top.values()) >= chosen  # the token and the top 2
        offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert lp.text_offset == offsets
        if max_tokens == 0:
            assert choice.text == prompt and len(lp.tokens) == n
            assert reply.usage.completion_tokens == 0 and choice.finish_reason == "length"
        else:
            assert choice.text == prompt + plain.text and len(lp.tokens) == n + 1
            assert lp.token_logprobs[n] == plain.logprobs.token_logprobs[0]
    base = prompt_logprobs_of(reference, ids, Routing())
    assert base != pytest.approx(want, abs=1e-3)  # the composition shows in the logprobs


def test_tokenize_detokenize_and_tokenizer_info_in_vllms_shapes(server, reference) -> None:
    url, _ = server
    tok = reference.base.tokenizer
    ids = tok("hi there")["input_ids"]
    body = httpx.post(f"{url}/tokenize", json={"prompt": "hi there", "return_token_strs": True})
    assert body.json() == {
        "count": len(ids),
        "max_model_len": 128,
        "tokens": ids,
        "token_strs": tok.convert_ids_to_tokens(ids),
    }
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{url}/tokenize", json={"model": "math", "messages": messages}).json()
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok(templated, add_special_tokens=False)["input_ids"]
    assert chat["token_strs"] is None
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json() == {"prompt": "hi there"}
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == CHAT_TEMPLATE
    assert info["model_max_length"] == 128
    mistakes = [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
    ]
    for path, bad, param in mistakes:
        assert error_of(httpx.post(f"{url}{path}", json=bad, timeout=30), 400)["param"] == param


def test_routing_is_reported_and_picks_the_right_adapter(server) -> None:
    url, _ = server
    reply = client(url).chat.completions.create(
        model="auto:selection",
        messages=[{"role": "user", "content": "What is 3 plus 4?"}],
        **GREEDY,
    )
    report = reply.model_extra["loraplex"]
    assert [a["name"] for a in report["adapters"]] == ["math"]
    assert report["compose"] == "selection" and report["mode"] == "mixture"


def test_stream_chunks_have_the_openai_shape(server) -> None:
    url, _ = server
    body = {
        "model": "french",
        "messages": [{"role": "user", "content": "Say dog."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **GREEDY,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["loraplex"]["adapters"][0]["name"] == "french"
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "What is 2 plus 3?"}]}),
        ("completions", {"prompt": "What is 2 plus 3?"}),
    ],
)
def test_every_stream_opens_with_its_routing_report(server, path, body) -> None:
    """Chat and completions alike: the first chunk carries the report the header carries,
    the decision included (chat's is the role's; a completion's is its first text, none
    sent before it)."""
    url, _ = server
    body = {"model": "auto", "stream": True, **body, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/{path}", json=body, timeout=30) as r:
        assert r.status_code == 200
        header = json.loads(r.headers["x-loraplex-routing"])
        lines = [ln for ln in r.iter_lines() if ln]
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[0]["loraplex"] == header and header["decision"] in ("base", "adapters")
    assert all("loraplex" not in c for c in chunks[1:])
    if path == "completions":
        assert chunks[0]["choices"][0]["text"] and chunks[0]["choices"][0]["finish_reason"] is None


def test_seed_makes_sampling_repeatable(server) -> None:
    url, _ = server
    c = client(url)
    args = {"model": "mood", "prompt": "Tell me", "max_tokens": 12, "temperature": 1.5}
    first = c.completions.create(seed=7, **args).choices[0].text
    assert c.completions.create(seed=7, **args).choices[0].text == first
    others = {c.completions.create(seed=s, **args).choices[0].text for s in (1, 2, 3)}
    assert others != {first}


def test_stop_strings_end_the_text_before_them(server, reference) -> None:
    url, _ = server
    c = client(url)
    args = {"temperature": 0, "max_tokens": 12}
    model, prompt, text = next(
        (m, p, t)
        for m in EXAMPLES
        for p in PROMPTS
        if len(t := c.completions.create(model=m, prompt=p, **args).choices[0].text) >= 6
    )
    stop = text[3:5]
    cut = c.completions.create(model=model, prompt=prompt, stop=[stop, "never"], **args)
    assert (
        cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    )


def test_logprobs_are_reported(server) -> None:
    url, _ = server
    reply = client(url).chat.completions.create(
        model="math",
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy
    entries = [*content, *(a for t in content for a in t.top_logprobs)]
    assert all(e.bytes == list(e.token.encode()) for e in entries)  # a character each here


# -- many clients ----------------------------------------------------------------------------


def test_32_concurrent_streams_each_get_their_text_alone(registry_dir: Path, embedder) -> None:
    models = ["math", "french", "mood", "auto:mixture", "auto:fusion", "tiny-llama"]
    jobs = [(models[i % len(models)], f"{PROMPTS[i % len(PROMPTS)]} #{i}") for i in range(32)]
    with running_server(registry_dir, embedder, max_batch=32) as (url, engine):
        c = client(url)
        alone = [
            c.chat.completions.create(model=m, messages=[{"role": "user", "content": p}], **GREEDY)
            .choices[0]
            .message.content
            for m, p in jobs
        ]
        sizes: list[int] = []
        engine.on_step = lambda batch, waiting, sizes=sizes, f=engine.on_step: (
            sizes.append(batch),
            f(batch, waiting),
        )

        async def one(ac: openai.AsyncOpenAI, model: str, prompt: str) -> str:
            stream = await ac.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], stream=True, **GREEDY
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        async def together() -> list[str]:
            ac = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            return await asyncio.gather(*(one(ac, m, p) for m, p in jobs))

        concurrent = asyncio.run(together())
    assert concurrent == alone
    assert max(sizes) >= 8  # they really shared decode steps


# -- mistakes and faults ----------------------------------------------------------------------

# well-formed bodies that a test spoils in one place
CHAT_X = json.dumps(
    {"model": "math", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
).encode()
AUTO_X = (
    b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], '
    b'"max_tokens": 5, "loraplex": {"adapters": {"math": WEIGHT}}}'
)


def with_field(name: str, value: object) -> bytes:
    return json.dumps({**json.loads(CHAT_X), name: value}).encode()


BAD = {
    "malformed JSON": (b'{"model": "math", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "missing messages": (json.dumps({"model": "math"}).encode(), 400, "messages"),
    "mistyped temperature": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
        400,
        "temperature",
    ),
    "temperature out of range": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "temperature": 3}).encode(),
        400,
        "temperature",
    ),
    "unknown role": (
        json.dumps({"model": "math", "messages": [{"role": "robot", "content": "x"}]}).encode(),
        400,
        "messages.0.role",
    ),
    "unknown model": (
        json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
        404,
        "model",
    ),
    "a path as model": (
        json.dumps({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}).encode(),
        404,
        "model",
    ),
    "unknown composition": (
        json.dumps({"model": "auto:magic", "messages": [{"role": "user", "content": "x"}]}).encode(),
        404,
        "model",
    ),
    "unknown adapter in a mixture": (
        json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}], "loraplex": {"adapters": {"nope": 1}}}).encode(),
        404,
        "loraplex.adapters",
    ),
    "k with a named adapter": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "loraplex": {"k": 2}}).encode(),
        400,
        "loraplex",
    ),
    "prompt longer than the context": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x" * 300}]}).encode(),
        400,
        "messages",
    ),
    "max_tokens past the context": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}).encode(),
        400,
        "max_tokens",
    ),
    "n > 1": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
        400,
        None,
    ),
    "stream as a string": (CHAT_X.replace(b"}]", b'}], "stream": "yes"', 1), 400, "stream"),
    "max_tokens as a string": (with_field("max_tokens", "8"), 400, "max_tokens"),
    "temperature as a bool": (CHAT_X.replace(b"}]", b'}], "temperature": true', 1), 400, "temperature"),
    "seed above 2^63": (CHAT_X.replace(b"}]", b'}], "seed": 9223372036854775808', 1), 400, "seed"),
    "negative seed": (CHAT_X.replace(b"}]", b'}], "seed": -1', 1), 400, "seed"),
    "NaN temperature": (CHAT_X.replace(b"}]", b'}], "temperature": NaN', 1), 400, "temperature"),
    "NaN weight": (AUTO_X.replace(b"WEIGHT", b"NaN"), 400, "loraplex.adapters.math"),
    "Infinity weight": (AUTO_X.replace(b"WEIGHT", b"Infinity"), 400, "loraplex.adapters.math"),
    "1e309 weight": (AUTO_X.replace(b"WEIGHT", b"1e309"), 400, "loraplex.adapters.math"),
    "1e308 weight": (AUTO_X.replace(b"WEIGHT", b"1e308"), 400, "loraplex.adapters"),
    "weight above the range": (AUTO_X.replace(b"WEIGHT", b"50.5"), 400, "loraplex.adapters"),
    "weight below the range": (AUTO_X.replace(b"WEIGHT", b"-0.75"), 400, "loraplex.adapters"),
    "weight as a string": (AUTO_X.replace(b"WEIGHT", b'"0.5"'), 400, "loraplex.adapters.math"),
    "lone surrogate": (CHAT_X.replace(b'"x"', b'"x\\ud800y"'), 400, None),
    "lone surrogate in an ignored field": (CHAT_X.replace(b"}]", b'}], "user": "\\udc00"', 1), 400, None),
    "seventeen stop strings": (with_field("stop", [f"s{i}" for i in range(17)]), 400, "stop"),
    "an empty stop string": (with_field("stop", [""]), 400, "stop"),
    "a null stop string": (with_field("stop", [None]), 400, "stop"),
    "a stop string of 200k characters": (with_field("stop", "s" * 200_000), 400, "stop"),
    "too many messages": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}] * 513}).encode(),
        400,
        "messages",
    ),
    "too many content parts": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 65}]}).encode(),
        400,
        "messages.0.content",
    ),
    "an image content part": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(),
        400,
        "messages",
    ),
    "top_logprobs without logprobs": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).encode(),
        400,
        "top_logprobs",
    ),
    "min_tokens over max_tokens": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "min_tokens": 10}).encode(),
        400,
        "min_tokens",
    ),
    "min_tokens over the server's default max_tokens": (
        json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "min_tokens": 10**6}).encode(),
        400,
        "min_tokens",
    ),
    "too many adapters": (
        json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}], "loraplex": {"adapters": {f"a{i}": 1.0 for i in range(17)}}}).encode(),
        400,
        "loraplex.adapters",
    ),
    **{
        f"unsupported {name}": (with_field(name, value), 400, name)
        for name, value in [
            ("tools", [{"type": "function", "function": {"name": "f"}}]),
            ("tool_choice", "auto"),
            ("functions", [{"name": "f"}]),
            ("response_format", {"type": "json_object"}),
            ("logit_bias", {"5": 10}),
            ("best_of", 2),
            ("top_k", 5),
            ("echo", True),
        ]
    },
    **{
        f"misspelt {name}": (with_field(name, value), 400, name)
        for name, value in [("temprature", 0), ("max_token", 3), ("Loraplex", {"k": 1}), ("stops", ["x"])]
    },
}  # fmt: skip


COMPLETION_X = {"model": "math", "prompt": "x", "max_tokens": 5}
BAD_COMPLETIONS = {
    "a token id past the vocabulary": ({"prompt": [5, 10**6]}, "prompt", "invalid_token_id"),
    "a negative token id": ({"prompt": [-1]}, "prompt", "invalid_token_id"),
    "a bad token id in the second prompt": ({"prompt": [[5], [10**6]]}, "prompt.1", "invalid_token_id"),
    "a bool as a token id": ({"prompt": [True]}, "prompt", None),
    "text and token ids in one list": ({"prompt": ["x", [5]]}, "prompt", None),
    "an empty list": ({"prompt": []}, "prompt", None),
    "an empty token list in a list": ({"prompt": [[5], []]}, "prompt.1", "empty_prompt"),
    "token ids past the context": ({"prompt": [5] * 300}, "prompt", "context_length_exceeded"),
    "129 prompts": ({"prompt": ["x"] * 129}, "prompt", None),
    "a streamed list": ({"prompt": ["x", "y"], "stream": True}, "stream", None),
    "a streamed echo": ({"echo": True, "stream": True}, "stream", None),
    "max_tokens 0 without echo": ({"max_tokens": 0}, "max_tokens", None),
    "min_tokens over max_tokens": ({"min_tokens": 6}, "min_tokens", None),
    "min_tokens over the server's default": ({"max_tokens": None, "min_tokens": 10**6}, "min_tokens", None),
    "negative max_tokens": ({"max_tokens": -1, "echo": True}, "max_tokens", None),
    "prompt_logprobs": ({"prompt_logprobs": 1}, "prompt_logprobs", "unsupported"),
    "suffix": ({"suffix": "y"}, "suffix", "unsupported"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_COMPLETIONS))
def test_completion_mistakes_are_400_naming_the_field(server, case: str) -> None:
    url, _ = server
    change, param, code = BAD_COMPLETIONS[case]
    r = httpx.post(f"{url}/v1/completions", json={**COMPLETION_X, **change}, timeout=30)
    error = error_of(r, 400)
    assert param is None or error["param"] == param
    assert code is None or error["code"] == code


@pytest.mark.parametrize("case", sorted(BAD))
def test_client_mistakes_are_4xx_in_the_openai_shape(server, case: str) -> None:
    url, _ = server
    body, status, param = BAD[case]
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers=JSON, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert param is None or error["param"] == param
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]


def test_a_misspelt_field_is_named_with_the_field_meant_and_others_are_ignored(server) -> None:
    url, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="math", messages=[{"role": "user", "content": "x"}], extra_body={"temprature": 0}
        )
    assert (
        e.value.body["message"]
        == "temprature: unrecognized request argument (did you mean temperature?)"
    )
    assert e.value.body["code"] == "unrecognized_argument"
    plain = {"model": "math", "prompt": "x", "max_tokens": 2, "temperature": 0}
    ignored = c.completions.create(**plain, extra_body={"user_tier": "gold", "priority": 3})
    assert ignored.choices[0].text == c.completions.create(**plain).choices[0].text


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI envelope's error of a response that must have `status`."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_415(server, content_type: str | None) -> None:
    url, _ = server
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{url}/v1/chat/completions", content=CHAT_X, headers=headers, timeout=30)
    assert error_of(r, 415)["code"] == "unsupported_media_type"


def test_fields_asking_for_nothing_are_accepted(server) -> None:
    """Unsupported fields at their do-nothing values, and fields that change nothing."""
    url, _ = server
    extra = {"n": 1, "tools": [], "logit_bias": {}, "response_format": {"type": "text"}}
    reply = client(url).chat.completions.create(
        model="math", messages=[{"role": "user", "content": "hi"}], user="u1", extra_body=extra,
        seed=2**63 - 1, **GREEDY,
    )  # fmt: skip
    assert reply.usage.completion_tokens > 0


def test_bodies_over_the_limit_are_413(registry_dir: Path, embedder) -> None:
    config = ServeConfig(router="retriever", limits=Limits(max_body_bytes=4096))
    big = with_field("user", "u" * 100_000)
    with running_server(registry_dir, embedder, config) as (url, _):
        declared = httpx.post(f"{url}/v1/completions", content=big, headers=JSON, timeout=30)
        assert error_of(declared, 413)["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        streamed = httpx.post(f"{url}/v1/completions", content=chunks(), headers=JSON, timeout=30)
        assert error_of(streamed, 413)["code"] == "request_too_large"
        small = json.dumps({**json.loads(with_field("user", "u" * 100)), "max_tokens": 5})
        assert (
            httpx.post(
                f"{url}/v1/chat/completions", content=small, headers=JSON, timeout=30
            ).status_code
            == 200
        )


def plain_base() -> BaseModel:
    """tiny_base without a chat template: prompts are read as raw text."""
    base = tiny_base()
    base.tokenizer.chat_template = None
    return base


def test_an_empty_prompt_is_400_and_its_neighbours_are_answered(
    registry_dir: Path, embedder
) -> None:
    with running_server(registry_dir, embedder, base=plain_base(), max_kv_tokens=100) as (
        url,
        engine,
    ):
        c = client(url)
        alone = c.completions.create(model="tiny-llama", prompt="x", max_tokens=60, temperature=0)
        started = threading.Event()
        report = engine.on_step
        engine.on_step = lambda batch, waiting: (batch and started.set(), report(batch, waiting))
        beside: dict = {}
        args = {"model": "tiny-llama", "prompt": "x", "max_tokens": 60, "temperature": 0}
        worker = threading.Thread(target=lambda: beside.update(r=c.completions.create(**args)))
        worker.start()
        try:
            assert started.wait(60)
            for model in ("tiny-llama", "auto"):
                with pytest.raises(openai.BadRequestError) as e:
                    c.completions.create(model=model, prompt="", max_tokens=5)
                assert e.value.body["code"] == "empty_prompt"
            worker.join(120)
        finally:
            engine.on_step = report
        assert beside["r"].choices[0].text == alone.choices[0].text
        # past the engine's token budget (within the model's context): the engine says so, 4xx
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny-llama", prompt="x" * 50, max_tokens=60)
        assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("prompt", ["x", ["x", "yz", "w"]])
def test_a_non_streaming_client_that_disconnects_frees_its_rows(server, prompt) -> None:
    """One prompt or a list (a row each): a client that leaves frees every row."""
    url, engine = server
    body = {"model": "math", "prompt": prompt, "max_tokens": 105, "temperature": 0}
    full = client(url).completions.create(**body)
    rows = len(full.choices)
    assert full.usage.completion_tokens == 105 * rows  # all 105 each if nobody stopped them
    steps: list[int] = []
    started = threading.Event()
    report = engine.on_step

    def on_step(batch: int, waiting: int) -> None:
        steps.append(batch)
        if batch:
            started.set()
        report(batch, waiting)

    raw = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(raw)}\r\n\r\n"
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    engine.on_step = on_step
    try:
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head + raw)
            assert started.wait(60)  # the row is decoding; now the client leaves
        deadline = time.monotonic() + 60
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.on_step = report
    assert engine.stats()["running"] == 0
    assert sum(1 for b in steps if b) < 90  # freed long before its 105 tokens


def test_a_prompt_that_fails_fails_its_list_at_once(server) -> None:
    """One prompt of a list fails its prefill (an injected fault): the answer is that
    error, and the other prompts' rows are freed rather than decoded to the end."""
    url, engine = server
    tok = engine.tokenizer
    poison = tok("~", add_special_tokens=False)["input_ids"][0]

    def explode(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and (ids == poison).any():  # prefill passes only
            raise RuntimeError("injected fault")

    steps: list[int] = []
    report = engine.on_step
    engine.on_step = lambda batch, waiting: (steps.append(batch), report(batch, waiting))
    hook = engine.model.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        body = {"model": "math", "prompt": ["x", "~~~"], "max_tokens": 105, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        deadline = time.monotonic() + 60
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        hook.remove()
        engine.on_step = report
    assert error_of(r, 500)["code"] == "generation_failed"
    assert engine.stats()["running"] == 0
    assert sum(1 for b in steps if b) < 90  # "x" was not decoded to its 105 tokens


def test_unknown_routes_and_the_openai_client_see_the_same_envelope(server) -> None:
    url, _ = server
    r = httpx.get(f"{url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.body["code"] == "model_not_found"


def test_a_failing_adapter_fails_its_request_alone(server) -> None:
    url, engine = server
    c = client(url)

    def ask(model: str) -> str:
        return c.completions.create(model=model, prompt="hello", **GREEDY).choices[0].text

    with pytest.raises(openai.InternalServerError, match="NaN or Inf"):
        ask("broken")
    results = {}
    threads = [
        threading.Thread(target=lambda m=m: results.setdefault(m, _outcome(ask, m)))
        for m in ("broken", "math", "mood")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (
        results["broken"] == "error" and results["math"] != "error" and results["mood"] != "error"
    )
    assert ask("math") == results["math"]
    deadline = time.monotonic() + 5  # the row is dropped at the engine's next step
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0


def _outcome(ask, model: str) -> str:
    try:
        return ask(model)
    except openai.InternalServerError:
        return "error"


def test_a_client_that_disconnects_frees_its_row(server) -> None:
    url, engine = server
    steps: list[int] = []
    report = engine.on_step
    engine.on_step = lambda batch, waiting: (steps.append(batch), report(batch, waiting))
    body = {"model": "math", "prompt": "x", "stream": True, "max_tokens": 105, "temperature": 0}
    left = 'loraplex_requests_total{endpoint="/v1/completions",status="499"}'
    before = _counted(httpx.get(f"{url}/metrics", timeout=10).text, left)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first text arrived: the row is decoding
        deadline = time.monotonic() + 60
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.on_step = report
    assert engine.stats()["running"] == 0
    assert sum(1 for b in steps if b) < 90  # freed long before its 105 tokens
    after = client(url).completions.create(model="math", prompt="x", **GREEDY)
    assert after.usage.completion_tokens == 10
    # counted as the 499 it ended as, not as the 200 it began as
    deadline = time.monotonic() + 60
    while _counted(httpx.get(f"{url}/metrics", timeout=10).text, left) == before:
        assert time.monotonic() < deadline, "the closed stream was never counted as a 499"
        time.sleep(0.05)


def test_a_full_queue_answers_429_with_retry_after(registry_dir: Path, embedder) -> None:
    with running_server(registry_dir, embedder, max_batch=1, max_queue=1) as (url, _):
        body = {"model": "math", "prompt": "x", "max_tokens": 60, "temperature": 0}

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes[0] == 200 and 429 in codes and set(codes) <= {200, 429}
    busy = next(r for r in answers if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"


def test_an_api_key_is_required_when_set(registry_dir: Path, embedder) -> None:
    with running_server(registry_dir, embedder, ServeConfig(api_key="s3cret")) as (url, _):
        for key in ("none", "wrong"):
            with pytest.raises(openai.AuthenticationError):
                client(url, api_key=key).models.list()
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert [m.id for m in client(url, api_key="s3cret").models.list()][:3] == [
            "tiny-llama",
            "base",
            "auto",
        ]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key


SECRET_DIR = "/srv/loraplex-secret/registry"


class FailingRetriever(Retriever):
    """A retriever whose index read fails for prompts saying "boom" (an error naming a
    server path, as an OSError would)."""

    def route(self, prompts, k=None, exclude_each=None):
        if any("boom" in q for q in prompts):
            raise OSError(f"cannot read {SECRET_DIR}/index.faiss")
        return super().route(prompts, k, exclude_each)


def test_docs_need_the_key_500s_hide_paths_and_metrics_count_by_route(
    registry_dir: Path, embedder
) -> None:
    config = ServeConfig(api_key="s3cret", router="retriever")
    key = {"authorization": "Bearer s3cret"}
    with running_server(registry_dir, embedder, config, router=FailingRetriever) as (url, _):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert error_of(httpx.get(f"{url}{path}", timeout=10), 401)
            assert httpx.get(f"{url}{path}", headers=key, timeout=10).status_code == 200
        with pytest.raises(openai.InternalServerError) as e:
            client(url, api_key="s3cret").chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "boom"}], **GREEDY
            )
        message = e.value.body["message"]
        assert "loraplex-secret" not in message and "index.faiss" not in message
        assert "req-" in message  # the id to find the details in the server log
        for i in range(120):
            assert httpx.get(f"{url}/v1/nothing/{i}", headers=key, timeout=10).status_code == 404
        scraped = httpx.get(f"{url}/metrics", timeout=10).text
    series = [ln for ln in scraped.splitlines() if ln.startswith("loraplex_requests_total{")]
    assert 'loraplex_requests_total{endpoint="unmatched",status="404"} 120.0' in series
    assert 'loraplex_requests_total{endpoint="/v1/chat/completions",status="500"} 1.0' in series
    # refused before routing: the three docs pages without the key
    assert 'loraplex_requests_total{endpoint="unmatched",status="401"} 3.0' in series
    assert len(series) < 12  # by route template, not by path


class GatedRetriever(Retriever):
    """A retriever whose first routing (loading its index: the slow part of a router's
    start, like the task router's fit) waits for `gate`; it records the thread of each
    routing."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self.gate = threading.Event()
        self.calls: list[str] = []

    def route(self, prompts, k=None, exclude_each=None):
        if not self.calls:
            assert self.gate.wait(600)
        self.calls.append(threading.current_thread().name)
        return super().route(prompts, k, exclude_each)


def test_health_is_503_until_the_router_is_warm(registry_dir: Path, embedder) -> None:
    routers: list[GatedRetriever] = []

    def make(reg: Registry) -> GatedRetriever:
        routers.append(GatedRetriever(reg))
        return routers[-1]

    with running_server(registry_dir, embedder, router=make) as (url, _):
        (router,) = routers
        starting = httpx.get(f"{url}/health", timeout=10)
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        router.gate.set()
        deadline = time.monotonic() + 600
        while (health := httpx.get(f"{url}/health", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.05)
        assert health.json()["status"] == "ok"
        assert router.calls == ["loraplex-route_0"]  # warmed at startup, off the event loop
        reply = client(url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "What is 2 plus 2?"}], **GREEDY
        )
        assert reply.model_extra["loraplex"]["adapters"]
        assert len(router.calls) == 2  # the request routed on a router already warm


def test_every_numeric_engine_stat_is_a_gauge(server) -> None:
    url, engine = server
    scraped = httpx.get(f"{url}/metrics", timeout=10).text
    stats = engine.stats()
    assert {"running", "waiting", "prefilling"} <= set(stats)
    for name, value in stats.items():
        if isinstance(value, int | float):
            assert f"loraplex_engine_{name} {float(value)}" in scraped


def test_models_lists_base_auto_and_adapters(server) -> None:
    url, _ = server
    models = {m.id: m for m in client(url).models.list()}
    listed = {"tiny-llama", "base", "auto", "auto:selection", "auto:mixture", "auto:fusion"}
    assert listed <= set(models)
    assert {"math", "french", "mood", "broken"} <= set(models)
    assert models["math"].model_extra["parent"] == "tiny-llama"
    c = client(url)
    # every listed value is answered: `base` is the base model under its other name
    answers = {
        m: c.completions.create(model=m, prompt="hi", **GREEDY) for m in ("base", "tiny-llama")
    }
    assert answers["base"].choices[0].text == answers["tiny-llama"].choices[0].text
    assert answers["base"].model_extra["loraplex"]["adapters"] == []


def test_serving_refuses_a_per_token_router_naming_the_fix() -> None:
    """`serve --router arrow` would refuse every `auto` request (no engine applies
    per-token gates): it is refused at startup instead."""
    with pytest.raises(ValueError, match="--router task, retriever or classifier"):
        ServeConfig(router="arrow", compose="selection")
    assert ServeConfig(router="retriever", compose="selection").router == "retriever"


def test_metrics_count_requests_tokens_and_routing(server) -> None:
    url, _ = server
    client(url).completions.create(model="french", prompt="x", **GREEDY)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'loraplex_adapter_routed_total{adapter="french"}' in text
    assert 'loraplex_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in (
        "loraplex_tokens_total",
        "loraplex_batch_size_bucket",
        "loraplex_time_to_first_token_seconds_bucket",
        "loraplex_engine_waiting",
        "loraplex_engine_running",
    ):
        assert name in text
    # every auto prompt is routed exactly once, joined with others' or alone
    before = _counted(text, "loraplex_route_batch_prompts_sum")
    client(url).completions.create(model="auto", prompt=["x", "y", "z"], **GREEDY)
    after = _counted(
        httpx.get(f"{url}/metrics", timeout=10).text, "loraplex_route_batch_prompts_sum"
    )
    assert after - before == 3


def _counted(exposition: str, series: str) -> float:
    """A labelled series' value (0 before its first count)."""
    found = [ln for ln in exposition.splitlines() if ln.startswith(series + " ")]
    return float(found[0].split()[1]) if found else 0.0


# -- the process ------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_streams_then_exits(registry_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    base = tiny_base()
    base.model.save_pretrained(model_dir)
    base.tokenizer.save_pretrained(model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_API_KEY": ""}
    cmd = [sys.executable, "-m", "lorahub.cli", "serve", "--registry", str(registry_dir)]
    # the retriever: ready in seconds (the task router embeds ~2k background texts first)
    cmd += ["--base-model", str(model_dir), "--port", str(port), "--router", "retriever"]
    log = tmp_path / "server.log"  # a file, not a pipe nobody reads while it fills
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # ready once the router is fitted: slow when loaded
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        body = {"model": "math", "prompt": "x", "stream": True, "max_tokens": 100, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        assert (
            json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        )
        # uvicorn ends by re-raising the signal it drained for (so shells see 143)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        proc.kill()


def test_min_tokens_holds_the_end_of_sequence_back(registry_dir: Path, embedder) -> None:
    """A model whose head can only say end-of-sequence or '5' (opposite directions), so it
    stops early; min_tokens keeps it going to the end."""
    from lorahub.inference import Sampling
    from lorahub.serve.engine import GenerationRequest

    reg = Registry(registry_dir, embedder=embedder)
    base = tiny_base()
    w = torch.randn(base.model.config.hidden_size)
    with torch.no_grad():
        base.model.lm_head.weight.zero_()
        base.model.lm_head.weight[base.tokenizer.eos_token_id] = w
        base.model.lm_head.weight[base.tokenizer.convert_tokens_to_ids("5")] = -w
    engine = BatchingEngine(Hub(reg, base, Retriever(reg)))
    engine.start()
    try:
        lengths = {}
        for least in (0, 40):
            done = threading.Event()
            events = []
            ids = tuple(base.tokenizer("hello there")["input_ids"])
            request = GenerationRequest(
                ids, Routing(), "mixture", Sampling(40, min_new_tokens=least)
            )
            engine.submit(
                request,
                lambda ev, events=events, done=done: (
                    events.append(ev),
                    ev.kind != "token" and done.set(),
                ),
            )
            assert done.wait(30)
            lengths[least] = (events[-1].finish_reason, events[-1].usage["completion_tokens"])
    finally:
        engine.stop()
        reg.close()
    assert lengths[0][0] == "stop" and lengths[0][1] < 40
    assert lengths[40] == ("length", 40)
