"""The OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client: what it
answers equals the in-process `Hub.generate` for the same prompt and routing, concurrent
streams do not disturb each other, and every client mistake is a 4xx in the OpenAI shape."""

from __future__ import annotations

import asyncio
import json
import os
import signal
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

from lorahub.hub import Hub
from lorahub.models import BaseModel
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.batching import BatchingConfig, BatchingEngine
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
    registry_dir: Path, embedder, config: ServeConfig | None = None, router=Retriever, **batching
) -> Iterator[tuple[str, BatchingEngine]]:
    """The app under uvicorn on 127.0.0.1 in a thread; its own model and registry handle,
    `router(registry)` routing."""
    reg = Registry(registry_dir, embedder=embedder)
    hub = Hub(reg, tiny_base(), router(reg))
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


def test_completions_equal_chat_with_one_user_turn(server) -> None:
    url, _ = server
    c = client(url)
    for prompt in PROMPTS:
        done = c.completions.create(model="auto", prompt=prompt, **GREEDY)
        chat = c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": prompt}], **GREEDY
        )
        assert done.choices[0].text == chat.choices[0].message.content
        assert done.usage.completion_tokens == chat.usage.completion_tokens > 0
        streamed = c.completions.create(model="auto", prompt=prompt, stream=True, **GREEDY)
        assert "".join(ch.choices[0].text for ch in streamed) == done.choices[0].text


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
}  # fmt: skip


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
    body = {"model": "math", "prompt": "x", "stream": True, "max_tokens": 110, "temperature": 0}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # the first chunk arrived: the row is decoding
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.on_step = report
    assert engine.stats()["running"] == 0
    assert sum(1 for b in steps if b) < 100  # freed long before its 110 tokens
    after = client(url).completions.create(model="math", prompt="x", **GREEDY)
    assert after.usage.completion_tokens == 10


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
        assert [m.id for m in client(url, api_key="s3cret").models.list()][:2] == [
            "tiny-llama",
            "auto",
        ]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key


def test_models_lists_base_auto_and_adapters(server) -> None:
    url, _ = server
    models = {m.id: m for m in client(url).models.list()}
    assert {"tiny-llama", "auto", "auto:selection", "auto:mixture", "auto:fusion"} <= set(models)
    assert {"math", "french", "mood", "broken"} <= set(models)
    assert models["math"].model_extra["parent"] == "tiny-llama"


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


# -- the process ------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_streams_then_exits(registry_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    base = tiny_base()
    base.model.save_pretrained(model_dir)
    base.tokenizer.save_pretrained(model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_API_KEY": ""}
    cmd = [sys.executable, "-m", "lorahub.cli", "serve", "--registry", str(registry_dir)]
    cmd += ["--base-model", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
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
