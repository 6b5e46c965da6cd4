"""`loraplex serve --engine vllm` in front of REAL vLLM servers (the CPU build, in its own
virtual environment `.venv-vllm`, made by `make venv-vllm`) on 127.0.0.1, with a tiny Llama
saved locally and locally made adapters.

Greedy text through the gateway equals the built-in engine's for selection, mixture and
fusion (where float32 kernels differ, the first difference must sit at a near-tie: the
built-in engine's two top log-probabilities within 1e-3); requests for one adapter stay on
one replica; killing a replica mid-run loses no request; per-token gating is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import char_tokenizer, free_port, serving, tiny_llama
from replica_faults import FaultyProxy

from composition import Mode
from lorahub.decoding import Sampling
from lorahub.hub import Hub
from lorahub.models import BaseModel, load_base_model
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.batching import BatchingEngine
from lorahub.serve.engine import GenerationRequest, RequestError, UnsupportedCompositionError
from lorahub.serve.gateway import GatewayConfig, VllmGateway
from registry import LoraAdapter, LoraModule, Registry
from router import ArrowRouter, Retriever, Routing

VLLM_PYTHON = Path(
    os.environ.get("LORAPLEX_VLLM_PYTHON", Path(__file__).parents[1] / ".venv-vllm/bin/python")
)
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"no vLLM environment at {VLLM_PYTHON} (make venv-vllm)"
)
PROMPTS = [f"{w} {i}" for i, w in enumerate(["add", "copy", "say", "flip", "count"] * 5)]  # 25
NAMES = ("alpha", "beta", "gamma")
MAX_RANK = 16
MAX_MODEL_LEN = 192  # below the model's 256 positions: the gateway must use the replicas'
DEADLINE = 600.0  # seconds: for waits on events that do come, however loaded the machine


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, embedder) -> dict:
    """The tiny model folder, a registry of three adapters (ranks 8, 8, 4) and the PEFT
    folders `loraplex export --format vllm` writes for them."""
    from lorahub.cli import main

    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    model = tiny_llama(  # head_dim 32 for vLLM's CPU attention; peaked: few near-ties
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    ).eval()
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    reg_dir = root / "registry"
    with Registry(reg_dir, embedder=embedder) as reg:
        g = torch.Generator().manual_seed(1)
        for name, rank in zip(NAMES, (8, 8, 4), strict=True):
            mods = {
                n: LoraModule(
                    torch.randn(rank, m.in_features, generator=g) * 0.3,
                    torch.randn(m.out_features, rank, generator=g) * 0.3,
                    2.0 * rank,
                )
                for n, m in model.named_modules()
                if n.endswith(("q_proj", "v_proj"))
            }
            reg.register(LoraAdapter(mods), name=name, examples=[f"{name} example"])
    assert (
        main(["export", "--format", "vllm", str(root / "export"), "--registry", str(reg_dir)]) == 0
    )
    return {"root": root, "model": root / "model", "registry": reg_dir, "export": root / "export"}


def start_vllm(
    model: Path, log: Path, extra: list[str] = (), port: int | None = None
) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(MAX_RANK),
    ]
    cmd += ["--max-loras", "4", "--dtype", "float32", "--enforce-eager"]
    cmd += ["--max-model-len", str(MAX_MODEL_LEN)]
    cmd += ["--gpu-memory-utilization", "0.3", *extra]
    out = log.open("w")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, url: str, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"vLLM did not start in {seconds} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(world: dict) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """Two vLLM servers; the second also serves the exported adapters by name."""
    modules = (world["export"] / "lora-modules.txt").read_text().split()[1:]
    started = [
        start_vllm(world["model"], world["root"] / "vllm0.log"),
        start_vllm(world["model"], world["root"] / "vllm1.log", ["--lora-modules", *modules]),
    ]
    try:
        for i, (proc, url) in enumerate(started):
            wait_up(proc, url, world["root"] / f"vllm{i}.log")
        yield started
    finally:
        for proc, _ in started:
            stop(proc)


def tiny_base(world: dict, weights: bool) -> BaseModel:
    return load_base_model(str(world["model"]), weights=weights)


@pytest.fixture(scope="module")
def builtin(world: dict, embedder) -> Iterator[str]:
    reg = Registry(world["registry"], embedder=embedder)
    hub = Hub(reg, tiny_base(world, True), Retriever(reg))
    with serving(create_app(hub, BatchingEngine(hub))) as url:
        yield url
    reg.close()


@pytest.fixture(scope="module")
def gateway(world: dict, replicas, embedder) -> Iterator[tuple[str, VllmGateway]]:
    reg = Registry(world["registry"], embedder=embedder)
    hub = Hub(reg, tiny_base(world, False), Retriever(reg))
    config = GatewayConfig(tuple(url for _, url in replicas), world["root"] / "folders", MAX_RANK)
    engine = VllmGateway(hub, config)
    with serving(create_app(hub, engine)) as url:
        yield url, engine
    reg.close()


def complete(
    url: str, model: str, prompt: str, extra: dict | None = None, tokens: int = 12
) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "logprobs": 2,
        **(extra or {}),
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


COMPOSITIONS = {
    "selection": ("alpha", None),
    "mixture": ("auto:mixture", {"loraplex": {"adapters": {"alpha": 0.6, "gamma": 0.4}}}),
    "fusion": ("auto:fusion", {"loraplex": {"adapters": {"beta": 0.7, "gamma": 0.3}}}),
    "base": (None, None),
}


def differs_at_a_near_tie(want: dict, text: str) -> bool:
    """Does `text` leave `want` (a choice with logprobs) where its top two log-probabilities
    were within 1e-3?"""
    lp = want["logprobs"]
    pairs = enumerate(zip(want["text"], text, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(text), len(want["text"])))
    seen = 0
    for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        seen += len(token)
        if seen > at:
            best = sorted(top.values(), reverse=True)
            return best[0] - best[1] < 1e-3
    return False


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
def test_gateway_text_equals_the_builtin_engine(composition, world, gateway, builtin) -> None:
    url, _ = gateway
    model, extra = COMPOSITIONS[composition]
    model = model or str(world["model"])
    same = 0
    for prompt in PROMPTS:
        ours, theirs = complete(builtin, model, prompt, extra), complete(url, model, prompt, extra)
        same += same_or_near_tie(ours, theirs, prompt)
    assert same >= len(PROMPTS) - 3
    if composition != "base":
        assert theirs["loraplex"]["applied"]["rel_error"] == 0.0


def same_or_near_tie(ours: dict, theirs: dict, prompt: str) -> bool:
    """True when the tokens are the same; False when they first differ at a near-tie of
    the built-in engine's (its two top log-probabilities within 1e-3); else it fails."""
    mine, other = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
    if mine["tokens"] == other["tokens"]:
        return True
    pairs = enumerate(zip(mine["tokens"], other["tokens"], strict=False))
    first = next((i for i, (a, b) in pairs if a != b), None)
    assert first is not None, (prompt, mine["tokens"], other["tokens"])  # one ended early
    top = sorted(mine["top_logprobs"][first].values(), reverse=True)
    assert top[0] - top[1] < 1e-3, (prompt, first, mine["tokens"], other["tokens"], top)
    return False


def test_gateway_logprobs_are_the_builtin_engines_entries(world, gateway, builtin) -> None:
    """Chat logprobs through vLLM carry each token's text and bytes as the built-in engine
    gives them (the gateway asks vLLM for token ids and names them itself)."""
    url, _ = gateway
    body = {
        "model": str(world["model"]),
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    compared = 0
    for prompt in PROMPTS[:5]:
        body["messages"] = [{"role": "user", "content": prompt}]
        ours, theirs = (
            httpx.post(f"{u}/v1/chat/completions", json=body, timeout=120).json()
            for u in (builtin, url)
        )
        mine, other = (r["choices"][0]["logprobs"]["content"] for r in (ours, theirs))
        assert all("bytes" in e and len(e["top_logprobs"]) >= 2 for e in other)
        for a, b in zip(mine, other, strict=False):
            if a["bytes"] != b["bytes"]:  # a near-tie the two engines broke apart
                break
            assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) < 1e-2
            best = {t["token"]: t["bytes"] for t in b["top_logprobs"]}
            assert best[a["token"]] == a["bytes"]  # greedy: the chosen token is among the top
            compared += 1
    assert compared >= 20  # most tokens of the five answers agree


def test_base_rows_beside_adapter_rows_get_the_base_model(
    world, replicas, builtin, embedder
) -> None:
    """vLLM's CPU LoRA kernels pick a row's adapter by indexing the slot stack with its
    slot, and a row without an adapter has slot -1: the LAST slot. Once every slot
    (--max-loras 4) has held an adapter, a base request batched beside an adapter's must
    still get the base model's answer."""
    reg = Registry(world["registry"], embedder=embedder)
    hub = Hub(reg, tiny_base(world, False), Retriever(reg))
    config = GatewayConfig((replicas[0][1],), world["root"] / "folders-slots", MAX_RANK)
    base = str(world["model"])
    long = {"max_tokens": 150, "min_tokens": 150, "temperature": 0, "stream": True}
    same = 0
    with serving(create_app(hub, VllmGateway(hub, config))) as url:
        for w in (0.2, 0.4, 0.6, 0.8, 0.9):  # five distinct adapters through four slots
            mix = {"loraplex": {"adapters": {"alpha": w, "beta": round(1 - w, 3)}}}
            complete(url, "auto:mixture", "add 1", mix, tokens=2)
        for prompt in PROMPTS[:8]:
            want = complete(builtin, base, prompt)
            body = {"model": "alpha", "prompt": prompt, **long}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=DEADLINE) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))  # it is running
                got = complete(url, base, prompt)  # batched beside it
                for _ in lines:
                    pass
            same += same_or_near_tie(want, got, prompt)
    reg.close()
    assert same >= 6


def test_the_applied_weights_are_reported_and_rank_limits_hold(gateway) -> None:
    url, _ = gateway
    three = {"loraplex": {"adapters": {"alpha": 0.5004, "beta": 0.3, "gamma": 0.2}}}  # rank 20 > 16
    reply = complete(url, "auto:mixture", "add 1", three)
    applied = reply["loraplex"]["applied"]
    assert applied["weights"] == [0.5, 0.3, 0.2] and applied["rank"] == MAX_RANK
    assert 0 < applied["rel_error"] < 1
    exact = {"loraplex": {**three["loraplex"], "exact": True}}
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "auto:mixture", "prompt": "add 1", "max_tokens": 4, **exact},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_composition"


def test_per_token_gating_is_refused_never_downgraded(world, replicas, embedder) -> None:
    """`serve` refuses a per-token router at startup; the gateway itself refuses a
    per-token routing whoever submits it, before anything reaches a replica."""
    reg = Registry(world["registry"], embedder=embedder)
    hub = Hub(reg, tiny_base(world, False), ArrowRouter(reg))
    config = GatewayConfig(tuple(url for _, url in replicas), world["root"] / "folders", MAX_RANK)
    with pytest.raises(ValueError, match="per token"):
        create_app(hub, VllmGateway(hub, config), ServeConfig(router="arrow"))
    gateway = VllmGateway(hub, config)
    gateway.start()
    try:
        (routing,) = hub.route(["x"])
        assert routing.per_token is not None
        request = GenerationRequest((5, 6), routing, Mode.mixture, Sampling(4))
        with pytest.raises(UnsupportedCompositionError, match="per_token"):
            gateway.submit(request, lambda event: None)
        assert gateway.stats()["running"] == 0
    finally:
        gateway.stop()
        reg.close()


def test_exported_adapters_serve_without_the_gateway(replicas) -> None:
    _, url = replicas[1]  # started with the --lora-modules line `loraplex export` wrote
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200 and r.json()["model"] == "beta"


def test_requests_for_one_adapter_stay_on_one_replica(gateway) -> None:
    url, engine = gateway
    for name in NAMES:
        for prompt in PROMPTS[:4]:
            complete(url, name, prompt, tokens=2)
    holders = {}
    for u in engine.upstreams:
        for model in u.used - {u.model}:
            holders.setdefault(model, []).append(u.url)
    assert len(holders) >= len(NAMES) and all(len(h) == 1 for h in holders.values())
    # a replica that serves an adapter by name gets that name, not a second copy
    named = engine.upstreams[1]
    copies = {
        engine.folders.get([engine.hub.adapters.get(n)], [1.0], Mode.mixture, MAX_RANK)[0].name
        for n in NAMES
    }
    assert not copies & named.used
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert [u["up"] for u in health["upstreams"]] == [True, True]


def test_the_context_is_the_replicas_not_the_model_configs(gateway) -> None:
    _, engine = gateway
    prompt = tuple(range(5, 15))

    def request(tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt, Routing(), Mode.mixture, Sampling(tokens))

    with pytest.raises(RequestError, match=f"context of {MAX_MODEL_LEN}") as refused:
        engine.submit(request(MAX_MODEL_LEN - len(prompt) + 1), lambda ev: None)
    assert refused.value.code == "context_length_exceeded" and refused.value.status == 400
    ended, events = threading.Event(), []

    def emit(ev) -> None:
        events.append(ev)
        if ev.kind != "token":
            ended.set()

    engine.submit(request(MAX_MODEL_LEN - len(prompt)), emit)  # exactly the context: served
    assert ended.wait(DEADLINE) and events[-1].kind == "done", events[-1]


def test_an_adapter_a_replica_lost_is_loaded_again(gateway) -> None:
    """vLLM answers 404 for an adapter it no longer holds (unloaded behind the gateway's
    back): the gateway loads it again instead of waiting forever on the refusal."""
    url, engine = gateway
    extra = {"loraplex": {"adapters": {"alpha": 0.55, "beta": 0.45}}}
    first = complete(url, "auto:mixture", "say 7", extra)
    name = first["loraplex"]["applied"]["adapter"]
    (holder,) = [u for u in engine.upstreams if name in u.loaded]
    r = httpx.post(f"{holder.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    assert r.status_code == 200, r.text
    again = complete(url, "auto:mixture", "say 7", extra)
    assert again["choices"][0]["text"] == first["choices"][0]["text"] and name in holder.loaded


@pytest.fixture(scope="module")
def cutting(world: dict, replicas, embedder) -> Iterator[tuple[str, VllmGateway, FaultyProxy]]:
    """A gateway whose replicas sit behind proxies that can break one answer after exactly
    n tokens (the shared cut goes to whichever replica streams next)."""
    first = FaultyProxy(replicas[0][1])
    proxies = [first, FaultyProxy(replicas[1][1], first.cut)]
    reg = Registry(world["registry"], embedder=embedder)
    hub = Hub(reg, tiny_base(world, False), Retriever(reg))
    with serving(proxies[0].app) as p0, serving(proxies[1].app) as p1:
        config = GatewayConfig((p0, p1), world["root"] / "folders-cut", MAX_RANK, retry_after=0.2)
        engine = VllmGateway(hub, config)
        with serving(create_app(hub, engine)) as url:
            yield url, engine, proxies[0]
    reg.close()


def test_a_break_mid_answer_continues_exactly_and_finds_a_stop_across_it(cutting) -> None:
    url, engine, proxy = cutting
    at = 10  # the answer breaks off after its first 10 tokens (characters here)
    full = {"min_tokens": 40}
    want = complete(url, "alpha", "copy 3", full, tokens=40)["choices"][0]
    text = want["text"]
    retries = engine.retries
    proxy.arm(at)
    broken = complete(url, "alpha", "copy 3", full, tokens=40)["choices"][0]
    assert proxy.cut["done"].is_set() and engine.retries == retries + 1
    assert broken["text"] == text or differs_at_a_near_tie(want, broken["text"]), (broken, text)
    # a stop string whose first characters came from the replica that broke off
    start = next(i for i in range(at - 3, at) if text.find(text[i : i + 4]) == i)
    proxy.arm(at)
    stopped = complete(url, "alpha", "copy 3", {**full, "stop": [text[start : start + 4]]}, 40)
    assert proxy.cut["done"].is_set() and engine.retries == retries + 2
    choice = stopped["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text[:start], "stop")


def test_killing_a_replica_mid_run_loses_no_request(gateway, replicas, world) -> None:
    """Last: it kills a replica (and starts it again). 16 streams over every adapter; the
    replica that holds most of them is frozen, so its requests are certainly in flight
    there, then killed; every request still ends with the text it has when sent alone, and
    the gateway takes the replica back once it answers again."""
    url, engine = gateway
    jobs = [(NAMES[i % 3], PROMPTS[i]) for i in range(16)]
    full = {"min_tokens": 60}  # every answer runs its 60 tokens
    served = [u.served for u in engine.upstreams]
    alone = [complete(url, m, p, full, tokens=60)["choices"][0] for m, p in jobs]
    gained = [u.served - before for u, before in zip(engine.upstreams, served, strict=True)]
    at = gained.index(max(gained))  # rendezvous hashing: it gets the same jobs again
    victim, (proc, victim_url) = engine.upstreams[at], replicas[at]

    def stream(job: tuple[str, str]) -> tuple[str, str]:
        body = {
            "model": job[0],
            "prompt": job[1],
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
            **full,
        }
        text, finish = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=DEADLINE) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text.append(choice["text"])
                    finish = choice["finish_reason"] or finish
        return "".join(text), finish

    os.killpg(proc.pid, signal.SIGSTOP)  # its requests cannot finish before the kill
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, job) for job in jobs]
        deadline = time.monotonic() + DEADLINE
        while victim.in_flight < 1:
            assert time.monotonic() < deadline, "no request reached the frozen replica"
            time.sleep(0.01)
        stop(proc)
        results = [f.result() for f in futures]
    assert all(finish == "length" for _, finish in results)
    for (text, _), want in zip(results, alone, strict=True):
        # a retried request runs again on another replica: float32 paths differ, so a
        # difference may only start at a near-tie
        assert text == want["text"] or differs_at_a_near_tie(want, text), (text, want["text"])
    assert engine.retries >= 1
    assert not httpx.get(f"{url}/health", timeout=60).json()["upstreams"][at]["up"]
    # the replica comes back on its address: probed again, described, used again
    port = int(victim_url.rsplit(":", 1)[1])
    extra = ["--lora-modules", *(world["export"] / "lora-modules.txt").read_text().split()[1:]]
    log = world["root"] / f"vllm{at}-again.log"
    proc, _ = start_vllm(world["model"], log, extra if at == 1 else [], port=port)
    replicas[at] = (proc, victim_url)  # the fixture stops it
    wait_up(proc, victim_url, log, DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while not victim.up:
        assert time.monotonic() < deadline, "the restarted replica was never taken back"
        time.sleep(0.05)
    before = victim.served
    for m, p in jobs:
        complete(url, m, p, tokens=4)
    assert victim.served > before
