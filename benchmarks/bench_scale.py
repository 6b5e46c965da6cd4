"""Many adapters behind one engine: throughput as the number of distinct adapters in the
traffic grows, and host memory against the adapter bytes held.

The built-in engine on the real SmolLM2 base, driven in process (no HTTP: this measures
paging, not the wire). Synthetic adapters of the zoo's shape (rank 8 on q_proj and v_proj
of every layer) are registered once; each request names one adapter, drawn uniformly or
by Zipf(1.0) popularity from the first N. Closed loop: C clients, each submitting its next
request when the last one ends; every answer is exactly `tokens` long (min_tokens).
Reported per N: output tokens/s, adapter loads (host-cache misses), RSS; the target is the
throughput at the largest N over the throughput with one adapter (same run).

    python benchmarks/bench_scale.py [--quick] [--adapters 1,16,64,256,1024]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, target, write_result

from composition import Mode
from lorahub.hub import Hub
from lorahub.inference import Sampling
from lorahub.models import DEFAULT_MODEL, load_base_model
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.serve.engine import GenerationRequest
from lorahub.serve.stack import PagerConfig
from lorahub.zoo import read_manifest
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import Retriever, Routing


def synthetic(model: torch.nn.Module, seed: int, rank: int = 8) -> LoraAdapter:
    """An adapter of the zoo's shape with small random weights."""
    g = torch.Generator().manual_seed(seed)
    mods = {
        name: LoraModule(
            torch.randn(rank, m.in_features, generator=g) * 0.01,
            torch.randn(m.out_features, rank, generator=g) * 0.01,
            16.0,
        )
        for name, m in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }
    return LoraAdapter(mods, base_model=BaseModelInfo(DEFAULT_MODEL))


def register_synthetic(registry: Registry, model: torch.nn.Module, n: int) -> list[str]:
    names = [f"syn{i:05d}" for i in range(n)]
    for i, name in enumerate(names):
        if name not in registry:
            registry.register(synthetic(model, i), name=name)
    return names


def draw(names: list[str], popularity: str, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if popularity == "uniform":
        return [rng.choice(names) for _ in range(count)]
    weights = [1.0 / (i + 1) for i in range(len(names))]  # Zipf(1.0)
    return rng.choices(names, weights, k=count)


def closed_loop(engine: BatchingEngine, prompts: list[tuple[int, ...]], adapters, clients, tokens):
    """C threads, each submitting its next request when the last ends -> (seconds, tokens)."""
    queue = list(zip(prompts, adapters, strict=True))
    lock = threading.Lock()
    made = [0]

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                ids, name = queue.pop()
            done = threading.Event()
            count = [0]

            def emit(ev, done=done, count=count) -> None:
                if ev.kind == "token":
                    count[0] += 1
                else:
                    done.set()

            sampling = Sampling(tokens, min_new_tokens=tokens)
            routing = Routing((name,), (1.0,))
            engine.submit(GenerationRequest(ids, routing, Mode.mixture, sampling), emit)
            assert done.wait(600), "a request never ended"
            with lock:
                made[0] += count[0]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, made[0]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--adapters", default="1,16,64,256,1024")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="per run")
    ap.add_argument("--host-mb", type=int, default=512, help="the pager's host cache")
    ap.add_argument("--registry", type=Path, help="reuse a registry of synthetic adapters")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.requests, args.clients = "1,64,256", 64, 16
    counts = [int(x) for x in args.adapters.split(",")]
    base = load_base_model(DEFAULT_MODEL)
    registry = Registry(args.registry or Path(tempfile.mkdtemp()) / "registry")
    t0 = time.perf_counter()
    names = register_synthetic(registry, base.model, max(counts))
    print(f"{len(names)} adapters registered in {time.perf_counter() - t0:.0f} s", flush=True)
    hub = Hub(registry, base, Retriever(registry))
    tok = base.tokenizer
    demo = [d["input"] for e in read_manifest() for d in e["demo"]]
    prompts = [
        tuple(tok(base.format_prompt(p), add_special_tokens=False)["input_ids"]) for p in demo
    ]
    rows = []
    for popularity in ("uniform", "zipf"):
        for n in counts:
            config = BatchingConfig(
                max_batch=args.clients, pager=PagerConfig(host_bytes=args.host_mb << 20)
            )
            engine = BatchingEngine(hub, config)
            engine.start()
            rng = random.Random(n)
            batch = [prompts[rng.randrange(len(prompts))] for _ in range(args.requests)]
            adapters = draw(names[:n], popularity, args.requests, seed=n)
            closed_loop(
                engine, batch[: args.clients], adapters[: args.clients], args.clients, args.tokens
            )  # warm
            loads = engine.stack.loads
            seconds, made = closed_loop(engine, batch, adapters, args.clients, args.tokens)
            row = {
                "popularity": popularity,
                "adapters": n,
                "tokens_per_s": made / seconds,
                "loads": engine.stack.loads - loads,
                "host_mb": engine.stack.host_bytes / 2**20,
                "rss_mb": rss_mb(),
            }
            engine.stop()
            rows.append(row)
            print(row, flush=True)
    print_table(rows, ["popularity", "adapters", "tokens_per_s", "loads", "host_mb", "rss_mb"])
    one = {r["popularity"]: r["tokens_per_s"] for r in rows if r["adapters"] == counts[0]}
    top = max(counts)
    targets = [
        target(
            f"{p}_throughput_{top}_over_{counts[0]}_adapters", r["tokens_per_s"] / one[p], 0.7, ">="
        )
        for p in ("uniform", "zipf")
        for r in rows
        if r["popularity"] == p and r["adapters"] == top
    ]
    host = [r["host_mb"] for r in rows]
    targets.append(target("host_cache_mb_over_configured", max(host) / args.host_mb, 1.0, "<="))
    rss = [r["rss_mb"] for r in rows]
    config = {k: v for k, v in vars(args).items() if k != "registry"} | {
        "rss_spread_mb": float(np.ptp(rss)),
    }
    write_result("scale", config, {"runs": rows}, targets, args.quick)


if __name__ == "__main__":
    main()
