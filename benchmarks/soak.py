"""Soak and fault benchmark: minutes of mixed traffic over the zoo on 127.0.0.1 while
faults are injected, against the built-in engine on the real SmolLM2 base.

The server runs in this process (uvicorn in a thread, as `loraplex serve` runs it), so the
benchmark can count every request's terminal events at the engine and inject an engine
fault. Traffic, all bounded in count and time:
- well-formed: C clients cycling through zoo prompts x (auto, base, the prompt's own
  adapter, an explicit mixture), streaming and not, greedy; each answer is compared with
  the same request answered alone before the soak (near-tie rule below);
- client mistakes (wrong types, NaN weights, huge seeds, empty prompts, unknown models,
  unsupported fields): each must be a 4xx;
- clients that leave: a stream closed after its first chunk, a non-streaming request
  whose client times out;
- long prompts (about 6k tokens) now and then: the short requests sent while one
  prefills are timed (their time to first token against the unloaded one);
- registry churn: an adapter registered, asked for by name, replaced by another's weights,
  removed; an adapter made for another base model registered with zoo-like examples;
- an engine fault: a prompt whose prefill raises (a forward hook), which must fail alone.
Near-tie rule: an answer that differs from its solo reference is accepted only if, at the
first token where they differ, the reference's top two log-probabilities are within 0.05
(float noise of a different batch can flip a near tie, nothing else).

    python benchmarks/soak.py [--seconds 240] [--clients 8] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import target, write_result

from lorahub.hub import Hub
from lorahub.models import DEFAULT_MODEL
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.zoo import register_zoo
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import SentenceEmbedder

NEAR_TIE = 0.05
MARKER = "zqxj-injected-fault"  # a prompt holding this fails its prefill on purpose
BAD_BODIES = [
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"},
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
    {"model": "auto", "messages": [], "max_tokens": 4},
    {"model": "nobody", "messages": [{"role": "user", "content": "hi"}]},
    {"model": DEFAULT_MODEL, "prompt": "", "max_tokens": 4},
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "n": 3},
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}},
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 100_000]},
    {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
]
RAW_BAD = [  # bodies no JSON encoder would write
    '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], '
    '"loraplex": {"adapters": {"a": NaN}}}',
    '{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "not json",
]


@dataclass
class Tally:
    """Client-side outcomes, by kind of traffic."""

    outcomes: Counter = field(default_factory=Counter)
    mismatches: list = field(default_factory=list)
    ttft_during_long: list = field(default_factory=list)
    long_windows: list = field(default_factory=list)  # (sent, first token) of long prompts
    samples: list = field(default_factory=list)  # (t, rss MB, metric series)

    def note(self, kind: str, outcome: str) -> None:
        self.outcomes[f"{kind}:{outcome}"] += 1


class TerminalCount:
    """Wraps the engine's submit: counts each request's terminal events."""

    def __init__(self, engine: BatchingEngine) -> None:
        self.counts: dict[int, int] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        submit = engine.submit

        def counted(request, emit):
            rid = next(self.ids)
            with self.lock:
                self.counts[rid] = 0

            def emit_counted(ev):
                if ev.kind != "token":
                    with self.lock:
                        self.counts[rid] += 1
                emit(ev)

            return submit(request, emit_counted)

        engine.submit = counted


def body(model: str, prompt: str, stream: bool, max_tokens: int = 16, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": stream,
        **extra,
    }


async def call(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    """One request -> {status, text, tokens, top, ttft, report}; streams parsed to the end.
    A connection the server broke is status 0 (a fault as bad as a 5xx); a client timeout
    raises."""
    try:
        return await _call(client, url, req)
    except httpx.TimeoutException:
        raise
    except httpx.TransportError:
        return {"status": 0, "text": "", "tokens": [], "top": [], "ttft": None, "done": False}


async def _call(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    sent = time.perf_counter()
    out = {"status": 0, "text": "", "tokens": [], "top": [], "ttft": None, "done": False}
    if not req.get("stream"):
        r = await client.post(f"{url}/v1/chat/completions", json=req)
        out["status"] = r.status_code
        if r.status_code == 200:
            choice = r.json()["choices"][0]
            out["text"] = choice["message"]["content"]
            for lp in (choice.get("logprobs") or {}).get("content") or []:
                out["tokens"].append(lp["token"])
                out["top"].append([a["logprob"] for a in lp["top_logprobs"]])
            out["report"] = r.json().get("loraplex", {})
        out["done"] = True
        return out
    async with client.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            out["done"] = True
            return out
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                out["status"] = 500
                continue
            out.setdefault("report", chunk.get("loraplex", {}))
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") or ""
                if text and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - sent
                out["text"] += text
                for lp in (choice.get("logprobs") or {}).get("content") or []:
                    out["tokens"].append(lp["token"])
                    out["top"].append([a["logprob"] for a in lp["top_logprobs"]])
    return out


def agrees(got: dict, ref: dict) -> bool:
    """Equal text, or a first difference at a near tie of the reference."""
    if got["text"] == ref["text"]:
        return True
    for i, (a, b) in enumerate(zip(got["tokens"], ref["tokens"], strict=False)):
        if a != b:
            top = ref["top"][i]
            return len(top) == 2 and abs(top[0] - top[1]) <= NEAR_TIE
    return False


async def well_formed(url, bodies, refs, tally, deadline, seed) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300) as client:
        while time.monotonic() < deadline:
            i = rng.randrange(len(bodies))
            req = {**bodies[i], "stream": rng.random() < 0.5}
            sent = time.perf_counter()
            try:
                got = await call(client, url, req)
            except httpx.TimeoutException:
                tally.note("well_formed", "hang")
                continue
            if got["status"] != 200 or not got["done"]:
                tally.note("well_formed", f"status_{got['status']}")
                continue
            tally.note("well_formed", "ok")
            if not agrees(got, refs[i]):
                tally.mismatches.append(
                    {"body": bodies[i], "got": got["text"], "want": refs[i]["text"]}
                )
            prefilling = any(s <= sent and (f is None or sent < f) for s, f in tally.long_windows)
            if req["stream"] and got["ttft"] is not None and prefilling:
                tally.ttft_during_long.append(got["ttft"])


async def mistakes(url, tally, deadline) -> None:
    headers = {"content-type": "application/json"}
    raw = [json.dumps(b) for b in BAD_BODIES] + RAW_BAD
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            for content in raw:
                try:
                    r = await client.post(
                        f"{url}/v1/chat/completions", content=content, headers=headers
                    )
                    status = r.status_code
                except httpx.TransportError:
                    status = 0
                tally.note("mistake", "4xx" if 400 <= status < 500 else f"{status}")
            await asyncio.sleep(2)


async def leavers(url, prompt, tally, deadline) -> None:
    """Clients that go away: after a stream's first chunk, and by a client timeout."""
    while time.monotonic() < deadline:
        req = body("auto", prompt, True, max_tokens=200, min_tokens=200)
        try:
            async with (
                httpx.AsyncClient(timeout=300) as client,
                client.stream("POST", f"{url}/v1/chat/completions", json=req) as r,
            ):
                async for _ in r.aiter_lines():
                    break
            tally.note("leaver", "stream_closed")
        except httpx.TransportError:
            tally.note("leaver", "transport_error")
        try:
            async with httpx.AsyncClient(timeout=0.5) as client:
                await client.post(
                    f"{url}/v1/chat/completions",
                    json=body("auto", prompt, False, max_tokens=200, min_tokens=200),
                )
            tally.note("leaver", "finished_before_leaving")
        except httpx.TimeoutException:
            tally.note("leaver", "timed_out")
        await asyncio.sleep(5)


async def long_prompts(url, text, tally, deadline, every: float) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.sleep(every / 2)
        while time.monotonic() < deadline - every / 2:
            window = [time.perf_counter(), None]
            tally.long_windows.append(window)
            got = await call(client, url, body(DEFAULT_MODEL, text, True, max_tokens=4))
            window[1] = window[0] + (got["ttft"] or 0.0)
            tally.note("long", "ok" if got["status"] == 200 and got["done"] else f"{got['status']}")
            await asyncio.sleep(every)


async def engine_faults(url, prompt, tally, deadline) -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        while time.monotonic() < deadline:
            await asyncio.sleep(10)
            got = await call(client, url, body("auto", f"{prompt} {MARKER}", False))
            tally.note(
                "engine_fault", "failed_alone" if got["status"] == 500 else f"{got['status']}"
            )


async def churn(url, registry_dir, manifest, refs_by_adapter, prompt, tally, deadline) -> None:
    """Register an adapter, ask for it by name, replace its weights, remove it; ask for the
    adapter made for another base model (registered before the server started)."""
    loop = asyncio.get_running_loop()
    reg = Registry(registry_dir)
    a, b = manifest[0]["name"], manifest[1]["name"]
    # copies without examples or description: the router never picks them, so `auto`
    # answers stay comparable with their references
    copies = {n: bare(reg.load(n)) for n in (a, b)}

    async def put(name: str) -> None:
        await loop.run_in_executor(
            None, lambda: reg.register(copies[name], name="soak-temp", replace=True)
        )

    async with httpx.AsyncClient(timeout=300) as client:
        while time.monotonic() < deadline - 20:
            for name, step in ((a, "registered"), (b, "replaced")):
                await put(name)
                got = await call(client, url, body("soak-temp", prompt, False))
                ok = got["status"] == 200 and agrees(got, refs_by_adapter[name])
                tally.note("churn", f"{step}_ok" if ok else f"{step}_{got['status']}")
            await loop.run_in_executor(None, lambda: reg.remove("soak-temp"))
            got = await call(client, url, body("soak-temp", prompt, False))
            tally.note(
                "churn", "removed_404" if got["status"] == 404 else f"removed_{got['status']}"
            )
            got = await call(client, url, body("soak-foreign", prompt, False))
            tally.note(
                "churn", "foreign_404" if got["status"] == 404 else f"foreign_{got['status']}"
            )
            await asyncio.sleep(5)
    reg.close()


def bare(adapter: LoraAdapter) -> LoraAdapter:
    return LoraAdapter(adapter.modules, adapter.use_rslora, adapter.base_model)


def foreign_adapter() -> LoraAdapter:
    """An adapter made for another base model (other names and widths)."""
    g = torch.Generator().manual_seed(0)
    mods = {
        f"model.layers.{i}.self_attn.q_proj": LoraModule(
            torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g), 16.0
        )
        for i in range(2)
    }
    return LoraAdapter(mods, base_model=BaseModelInfo("some-other-model"))


async def sampler(url, tally, deadline) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        start = time.monotonic()
        while time.monotonic() < deadline:
            text = (await client.get(f"{url}/metrics")).text
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            tally.samples.append((time.monotonic() - start, rss_mb(), series))
            await asyncio.sleep(5)


def rss_mb() -> float:
    """Resident memory after handing freed heap back to the OS: a long prompt's transient
    working set (its KV cache, attention) otherwise stays in glibc's arenas and reads as
    growth; what is still held after a trim is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def references(url, bodies) -> tuple[list[dict], list[float]]:
    """Each body answered alone (streamed, so its time to first token is unloaded too)."""
    refs, ttft = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        for b in bodies:
            got = await call(client, url, {**b, "stream": True})
            assert got["status"] == 200 and got["done"], f"reference failed: {b}"
            refs.append(got)
            ttft.append(got["ttft"])
    return refs, ttft


def fault_hook(hub: Hub):
    # as it tokenizes after a space, inside the prompt
    marker = hub.base.tokenizer(f" {MARKER}", add_special_tokens=False)["input_ids"]
    n = len(marker)

    def explode(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] < n:
            return
        windows = ids.unfold(1, n, 1)  # (b, positions, n)
        if (windows == torch.tensor(marker)).all(-1).any():
            raise RuntimeError("injected engine fault")

    return hub.base.model.register_forward_pre_hook(explode, with_kwargs=True)


def serve_in_thread(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800  # ready: the router fitted (first run: embeddings)
    while not (server.started and httpx.get(f"{url}/health", timeout=30).status_code == 200):
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not become ready")
        time.sleep(1)
    return server, thread, url


def traffic(manifest: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The well-formed bodies: 8 zoo prompts x (auto, base, own adapter, a mixture)."""
    rows = [(e["name"], d["input"]) for e in manifest for d in e["demo"][:1]]
    random.Random(0).shuffle(rows)
    rows = rows[:8]
    mates = {name: rows[(i + 1) % len(rows)][0] for i, (name, _) in enumerate(rows)}
    bodies = [
        b
        for name, prompt in rows
        for b in (
            body("auto", prompt, True),
            body(DEFAULT_MODEL, prompt, True),
            body(name, prompt, True),
            body("auto", prompt, True, loraplex={"adapters": {name: 0.6, mates[name]: 0.4}}),
        )
    ]
    return bodies, rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--registry", type=Path, help="a zoo registry to reuse (made if missing)")
    ap.add_argument(
        "--quick", action="store_true", help="60 s, 4 clients (results/soak.quick.json)"
    )
    ap.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="vllm: the gateway over two real vLLM replicas (.venv-vllm), a replica killed "
        "and restarted, an upstream answering 400 (results/soak_vllm.json)",
    )
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.clients = 60, 4
    torch.manual_seed(0)
    registry_dir = args.registry or Path(tempfile.mkdtemp()) / "registry"
    with Registry(registry_dir, embedder=SentenceEmbedder()) as reg:
        manifest = register_zoo(reg)
        if "soak-foreign" not in reg:  # with zoo-like examples: the router must skip it
            examples = [d["input"] for d in manifest[0]["demo"]]
            reg.register(foreign_adapter(), name="soak-foreign", examples=examples)
    hub = Hub.open(registry=registry_dir)
    bodies, rows = traffic(manifest)
    if args.engine == "vllm":
        from _soak_gateway import soak_gateway

        results, targets = soak_gateway(
            hub, bodies, args.seconds, args.clients, Path(tempfile.mkdtemp())
        )
        config = {"seconds": args.seconds, "clients": args.clients, "engine": "vllm"}
        write_result("soak_vllm", config, results, targets, args.quick)
        return
    engine = BatchingEngine(hub, BatchingConfig(max_batch=16))
    counter = TerminalCount(engine)
    server, thread, url = serve_in_thread(create_app(hub, engine, ServeConfig()))
    hook = fault_hook(hub)
    probe = rows[0][1]
    print(f"references for {len(bodies)} requests ...", flush=True)
    refs, unloaded_ttft = asyncio.run(references(url, bodies))
    by_adapter = {
        a: asyncio.run(references(url, [body(a, probe, False)]))[0][0]
        for a in (manifest[0]["name"], manifest[1]["name"])
    }
    long_text = " ".join(d["input"] for e in manifest for d in e["demo"]) * 3
    ids = hub.base.tokenizer(long_text, add_special_tokens=False)["input_ids"][:6000]
    long_text = hub.base.tokenizer.decode(ids)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.seconds

    async def soak() -> None:
        await asyncio.gather(
            *(
                well_formed(url, bodies, refs, tally, deadline, seed)
                for seed in range(args.clients)
            ),
            mistakes(url, tally, deadline),
            leavers(url, probe, tally, deadline),
            long_prompts(url, long_text, tally, deadline, every=max(30.0, args.seconds / 4)),
            engine_faults(url, probe, tally, deadline),
            churn(url, registry_dir, manifest, by_adapter, probe, tally, deadline),
            sampler(url, tally, deadline),
        )

    print(f"soak: {args.seconds:.0f} s, {args.clients} clients ...", flush=True)
    asyncio.run(soak())
    drain = time.monotonic() + 300
    while engine.stats()["running"] + engine.stats()["waiting"] + engine.stats()["prefilling"]:
        if time.monotonic() > drain:
            break
        time.sleep(0.5)
    hook.remove()
    server.should_exit = True
    thread.join(timeout=120)
    report(args, tally, counter, unloaded_ttft, time.monotonic() - start)


def report(args, tally, counter, unloaded_ttft, seconds) -> None:
    ends = Counter(counter.counts.values())
    warm = [s for s in tally.samples if s[0] >= args.seconds / 3]
    rss_growth = max(s[1] for s in warm) / warm[0][1] if warm else float("nan")
    series_growth = max(s[2] for s in warm) / warm[0][2] if warm else float("nan")
    unloaded_p99 = float(np.percentile(unloaded_ttft, 99))
    during = (
        float(np.percentile(tally.ttft_during_long, 99)) if tally.ttft_during_long else float("nan")
    )
    o = tally.outcomes
    mistakes_5xx = sum(v for k, v in o.items() if k.startswith("mistake:") and k != "mistake:4xx")
    hangs = sum(v for k, v in o.items() if k.endswith(":hang")) + ends.get(0, 0)
    results = {
        "seconds": seconds,
        "outcomes": dict(sorted(o.items())),
        "engine_requests": len(counter.counts),
        "terminal_events_per_request": {str(k): v for k, v in sorted(ends.items())},
        "mismatches": tally.mismatches[:20],
        "n_mismatches": len(tally.mismatches),
        "unloaded_ttft_p99": unloaded_p99,
        "ttft_p99_while_long_prefills": during,
        "n_ttft_while_long_prefills": len(tally.ttft_during_long),
        "samples": tally.samples,
    }
    targets = [
        target(
            "requests_not_ending_exactly_once", sum(v for k, v in ends.items() if k != 1), 0, "<="
        ),
        target("hangs", hangs, 0, "<="),
        target("well_formed_mismatches", len(tally.mismatches), 0, "<="),
        target("client_mistakes_answered_5xx", mistakes_5xx, 0, "<="),
        target("rss_growth_after_warmup", rss_growth, 1.1, "<="),
        target("metric_series_growth_after_warmup", series_growth, 1.05, "<="),
        target("ttft_p99_while_long_prefills_over_unloaded", during / unloaded_p99, 3.0, "<="),
    ]
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=1))
    config = {
        "seconds": args.seconds,
        "clients": args.clients,
        "engine": "transformers",
        "near_tie": NEAR_TIE,
    }
    write_result("soak", config, results, targets, args.quick)


if __name__ == "__main__":
    main()
