"""Serving throughput and latency: `loraplex serve` under closed-loop clients.

The real SmolLM2 base and the zoo; prompts are the zoo tasks' held-out demo prompts, mixed;
answers are 32-64 tokens, the same fixed sequence of lengths for every run (min_tokens =
max_tokens, greedy), so runs do the same work and clients do not finish in lockstep. In
one run:
  (a) `auto` mixed traffic (the server's router, mixture of k=3, per row),
  (b) every request on the base model,
  (c) one request at a time, switching PEFT adapters per request (each prompt's own
      adapter; in process, no HTTP: a generous baseline),
  (d) `transformers serve --continuous-batching` on the base model (the anchor, no adapters).
Closed loop: C clients, each sending its next request when the last one ends. Reported:
output tokens/s, time to first token (TTFT) and inter-token latency (ITL), p50/p95.
(a), (b) and (d) take turns, --rounds times, with every server up throughout: this
machine's speed swings from one minute to the next, so each ratio is taken within a round
and its median over the rounds reported.
With --engine vllm (results/serve_vllm.json), the gateway in front of a real vLLM server
(.venv-vllm) against clients that name the right adapter to vLLM themselves; see run_vllm.

    python benchmarks/bench_serve.py [--quick] [--clients 1,8,32] [--engine vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, print_table, target, write_result

from lorahub.models import BUILTIN, DEFAULT_MODEL
from lorahub.zoo import ZOO_DIR, read_manifest, register_zoo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 900  # the router's first fit: minutes on a loaded machine
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()  # never leave a server behind
        raise RuntimeError(f"server exited or not ready in 900 s: see {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: when it was sent, when each content chunk came, its tokens."""
    sent = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {"sent": sent, "stamps": stamps, "tokens": tokens, "end": time.perf_counter()}


async def closed_loop(url: str, bodies: list[dict], clients: int) -> list[dict]:
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> list[dict]:
            done = []
            while queue:
                done.append(await _one(client, url, queue.pop()))
            return done

        results = await asyncio.gather(*(worker() for _ in range(clients)))
    return [r for rs in results for r in rs]


def summarize(records: list[dict]) -> dict:
    start = min(r["sent"] for r in records)
    end = max(r["end"] for r in records)
    ttft = [r["stamps"][0] - r["sent"] for r in records if r["stamps"]]
    itl = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "seconds": end - start,
        "tokens_per_s": tokens / (end - start),
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p95": float(np.percentile(ttft, 95)),
        "itl_p50": float(np.percentile(itl, 50)) if itl else float("nan"),
        "itl_p95": float(np.percentile(itl, 95)) if itl else float("nan"),
    }


def answer_length(i: int) -> int:
    """Request i's answer length: 32-64 tokens, spread (the same in every run)."""
    return 32 + (i * 13) % 33


def bodies_for(model, prompts: list[str], n: int, extra) -> list[dict]:
    """`model`: a name, or request index -> name; `extra(tokens)`: the engine's way of
    asking for exactly `tokens` tokens."""
    return [
        {
            "model": model(i) if callable(model) else model,
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "max_tokens": answer_length(i),
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra(answer_length(i)),
        }
        for i in range(n)
    ]


def peft_one_at_a_time(rows: list[tuple[str, str]]) -> dict:
    """(c): each request alone, its adapter switched in with PEFT's set_adapter."""
    import torch
    from peft import PeftModel

    from lorahub.models import load_base_model

    base = load_base_model(DEFAULT_MODEL)
    names = sorted({name for name, _ in rows})
    model = PeftModel.from_pretrained(base.model, ZOO_DIR / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(ZOO_DIR / name, adapter_name=name)
    model.eval()
    tok = base.tokenizer
    records = []
    with torch.inference_mode():
        for i, (name, prompt) in enumerate(rows):
            tokens = answer_length(i)
            sent = time.perf_counter()
            model.set_adapter(name)
            enc = tok(base.format_prompt(prompt), return_tensors="pt", add_special_tokens=False)
            stamps: list[float] = []
            out = model.generate(
                **enc,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                streamer=_Stamps(stamps),
            )
            stamps = stamps[1:]  # the streamer's first put is the prompt
            n = out.shape[1] - enc["input_ids"].shape[1]
            records.append(
                {"sent": sent, "stamps": stamps, "tokens": n, "end": time.perf_counter()}
            )
    return summarize(records)


class _Stamps:
    """A generate() streamer that only notes when each token came."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def put(self, value: object) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure(url: str, model, prompts: list[str], clients: list[int], n_requests, extra) -> dict:
    """Closed-loop runs at each C (after a warm-up of C requests): {C: summary}."""
    out = {}
    for c in clients:
        bodies = bodies_for(model, prompts, n_requests(c), extra)
        asyncio.run(closed_loop(url, bodies[:c], c))  # warm up
        out[c] = summarize(asyncio.run(closed_loop(url, bodies, c))) | {"load": os.getloadavg()}
        print(c, out[c], flush=True)
    return out


def min_tokens(t: int) -> dict:
    return {"min_tokens": t}


def loraplex_serve(registry: Path, port: int, *options: str) -> list[str]:
    cmd = [sys.executable, "-m", "lorahub.cli", "serve", "--registry", str(registry)]
    return [*cmd, "--port", str(port), "--max-batch", "32", "--max-queue", "1024", *options]


def run_builtin(args, clients, rows, model_dir, tmp, n_requests) -> tuple[dict, list]:
    """(a), (b) and (d) in turn, `args.rounds` times (see the module docstring); (c) once."""
    prompts = [p for _, p in rows]
    ends = sorted({clients[0], clients[-1]})
    rounds: dict[str, list[dict]] = {}
    with ExitStack() as up:
        port = free_port()
        ours = up.enter_context(
            Server(loraplex_serve(tmp / "registry", port), port, tmp / "loraplex.log")
        )
        contenders = [
            ("a_auto", ours.url, "auto", clients, min_tokens),
            ("b_base", ours.url, DEFAULT_MODEL, clients, min_tokens),
        ]
        if not args.quick:
            port = free_port()
            hf = up.enter_context(Server(transformers_serve(model_dir, port), port, tmp / "hf.log"))
            contenders.append(("d_transformers", hf.url, str(model_dir), ends, generation_config))
        for r in range(1 if args.quick else args.rounds):
            for label, url, model, cs, extra in contenders:
                print(f"round {r + 1}: {label}", flush=True)
                for c, summary in measure(url, model, prompts, cs, n_requests, extra).items():
                    rounds.setdefault(f"{label}_c{c}", []).append(summary)
        c1 = peft_one_at_a_time(rows[: 8 if args.quick else 24])
    print("c", c1, flush=True)
    results = {name: median_summary(rs) for name, rs in rounds.items()}
    results["c_peft_one_at_a_time"] = c1
    top, low = clients[-1], clients[0]
    auto, base = rounds[f"a_auto_c{top}"], rounds[f"b_base_c{top}"]
    targets = [
        target(f"auto_over_base_throughput_c{top}", median_ratio(auto, base), 0.9, ">="),
        target(
            f"auto_over_peft_one_at_a_time_c{top}",
            results[f"a_auto_c{top}"]["tokens_per_s"] / c1["tokens_per_s"],
            4.0,
            ">=",
        ),
    ]
    if low != top:  # a single C would compare its TTFT with itself
        ratio = results[f"a_auto_c{top}"]["ttft_p50"] / results[f"a_auto_c{low}"]["ttft_p50"]
        targets.append(target(f"auto_ttft_p50_c{top}_over_c{low}", ratio, 3.0, "<="))
    if f"d_transformers_c{top}" in rounds:
        ratio = median_ratio(base, rounds[f"d_transformers_c{top}"])
        targets.append(target(f"base_over_transformers_serve_c{top}", ratio, 1.0, ">="))
    return results, targets


def transformers_serve(model_dir: Path, port: int) -> list[str]:
    hf = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir)]
    options = ["--continuous-batching", "--device", "cpu", "--dtype", "float32"]
    return [*hf, *options, "--port", str(port)]


def generation_config(t: int) -> dict:
    config = {"max_new_tokens": t, "min_new_tokens": t, "do_sample": False}
    return {"generation_config": json.dumps(config)}


def median_summary(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds, and every round's throughput."""
    fields = [k for k, v in rounds[0].items() if isinstance(v, int | float)]
    out = {k: float(np.median([r[k] for r in rounds])) for k in fields}
    return out | {"rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]}


def median_ratio(num: list[dict], den: list[dict]) -> float:
    """The median over rounds of one round's throughput over another's in the same round."""
    pairs = zip(num, den, strict=True)
    return float(np.median([n["tokens_per_s"] / d["tokens_per_s"] for n, d in pairs]))


def run_vllm(args, clients, rows, model_dir, tmp, n_requests) -> tuple[dict, list]:
    """(a) loraplex auto-routing through the gateway (selection: each request's top adapter;
    and mixture k=3, reported beside it), (b) clients naming the right adapter straight to
    vLLM (the anchor), (c) the built-in engine, auto selection."""
    vllm_python = Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"
    if not vllm_python.exists():
        raise SystemExit("no .venv-vllm: make venv-vllm")
    from lorahub.cli import main as cli

    cli(["export", "--format", "vllm", str(tmp / "export"), "--registry", str(tmp / "registry")])
    modules = (tmp / "export" / "lora-modules.txt").read_text().split()[1:]
    prompts = [p for _, p in rows]
    own = [name for name, _ in rows]
    port = free_port()
    vllm = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    vllm += ["--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "32"]
    vllm += [
        "--max-loras",
        "32",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "2048",
    ]
    vllm += ["--gpu-memory-utilization", "0.3", "--lora-modules", *modules]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    results: dict[str, dict] = {}
    with Server(vllm, port, tmp / "vllm.log", env) as upstream:
        print("b_direct", flush=True)
        named = lambda i: own[i % len(own)]  # noqa: E731
        for c, summary in measure(
            upstream.url, named, prompts, clients, n_requests, min_tokens
        ).items():
            results[f"b_direct_named_c{c}"] = summary
        for label, compose in (
            ("a_gateway_auto_selection", "selection"),
            ("a2_gateway_auto_mixture", "mixture"),
        ):
            port = free_port()
            cmd = loraplex_serve(
                tmp / "registry", port, "--engine", "vllm", "--upstream", upstream.url
            )
            cmd += ["--compose", compose, "--max-lora-rank", "32", "--base-model", DEFAULT_MODEL]
            with Server(cmd, port, tmp / f"{label}.log") as gateway:
                print(label, flush=True)
                ends = clients if compose == "selection" else [clients[-1]]
                for c, summary in measure(
                    gateway.url, "auto", prompts, ends, n_requests, min_tokens
                ).items():
                    results[f"{label}_c{c}"] = summary
    port = free_port()
    with Server(
        loraplex_serve(tmp / "registry", port, "--compose", "selection"), port, tmp / "builtin.log"
    ) as server:
        print("c_builtin", flush=True)
        top = [clients[-1]]
        for c, summary in measure(server.url, "auto", prompts, top, n_requests, min_tokens).items():
            results[f"c_builtin_auto_selection_c{c}"] = summary
    top = clients[-1]
    a = results[f"a_gateway_auto_selection_c{top}"]
    b = results[f"b_direct_named_c{top}"]
    targets = [
        target(
            f"gateway_over_direct_throughput_c{top}",
            a["tokens_per_s"] / b["tokens_per_s"],
            0.95,
            ">=",
        )
    ]
    return results, targets


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="C in {1, 8}, fewer requests, no (d)")
    ap.add_argument("--clients", default=None, help="comma-separated (default 1,8,32)")
    ap.add_argument("--per-client", type=int, default=3, help="requests per client (C=1: 8)")
    ap.add_argument("--rounds", type=int, default=3, help="(a), (b), (d) in turn this many times")
    ap.add_argument(
        "--work", type=Path, help="a folder kept between runs (the zoo registered once)"
    )
    ap.add_argument(
        "--run",
        help="a label: writes results/serve.<run>.json, and serve.json sums up every run",
    )
    ap.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="vllm: the gateway",
    )
    args = ap.parse_args()
    clients = [int(c) for c in (args.clients or ("1,8" if args.quick else "1,8,32")).split(",")]
    per_client = 2 if args.quick else args.per_client

    manifest = read_manifest()
    rows = [(e["name"], d["input"]) for e in manifest for d in e["demo"]]
    random.Random(0).shuffle(rows)
    model_dir = BUILTIN[DEFAULT_MODEL]()  # the cached safetensors copy of SmolLM2
    tmp = args.work or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    from registry import Registry
    from router import SentenceEmbedder

    with Registry(tmp / "registry", embedder=SentenceEmbedder()) as reg:
        register_zoo(reg)

    def n_requests(c: int) -> int:
        return max(8, c * per_client)

    if args.engine == "vllm":
        results, targets = run_vllm(args, clients, rows, model_dir, tmp, n_requests)
        name = "serve_vllm"
    else:
        results, targets = run_builtin(args, clients, rows, model_dir, tmp, n_requests)
        name = "serve"
    table = [{"run": k, **v} for k, v in results.items()]
    columns = ["run", "requests", "tokens", "seconds", "tokens_per_s"]
    print_table(table, [*columns, "ttft_p50", "ttft_p95", "itl_p50", "itl_p95"])
    config = {
        "engine": args.engine,
        "clients": clients,
        "tokens": "32-64",
        "per_client": per_client,
        "rounds": 1 if args.quick else args.rounds,
        "max_batch": 32,
        "k": 3,
    }
    if args.run and not args.quick:
        write_result(f"{name}.{args.run}", config, results, targets, args.quick)
        sum_up_runs(name)
    else:
        write_result(name, config, results, targets, args.quick)


def sum_up_runs(name: str) -> None:
    """results/<name>.json from every results/<name>.<run>.json: each target's value in
    every run, met only if met in all, its value the worst of them."""
    runs = {p.name.split(".")[1]: json.loads(p.read_text()) for p in RESULTS.glob(f"{name}.*.json")}
    runs.pop("quick", None)
    by_name: dict[str, list[dict]] = {}
    for run in runs.values():
        for t in run["targets"]:
            by_name.setdefault(t["name"], []).append(t)
    targets = []
    for tname, ts in by_name.items():
        worst = (min if ts[0]["op"] in (">=", ">") else max)(t["value"] for t in ts)
        t = target(tname, worst, ts[0]["goal"], ts[0]["op"])
        targets.append(t | {"met": all(x["met"] for x in ts), "runs": len(ts)})
    results = {
        run: {
            "date": r["date"],
            "load": r["machine"].get("load"),
            "targets": {t["name"]: t["value"] for t in r["targets"]},
            "tokens_per_s": {k: v["tokens_per_s"] for k, v in r["results"].items()},
        }
        for run, r in sorted(runs.items())
    }
    config = {"runs": sorted(runs), "each": next(iter(runs.values()))["config"]}
    write_result(name, config, results, targets, quick=False)


if __name__ == "__main__":
    main()
