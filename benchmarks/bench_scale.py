"""Many adapters behind one server: engine throughput as the number of distinct adapters in
the traffic grows, host memory against the adapter bytes held, bulk registration, and
routing quality under 1,000 distractor adapters.

Parts (each resumable: every finished measurement is saved at once in
results/scale.parts.json, a rerun skips what is there, and results/scale.json is rewritten
from whatever is there, so a partial run still reports figures):
- throughput: the built-in engine on the real SmolLM2 base, driven in process (no HTTP:
  this measures paging, not the wire). Synthetic adapters of the zoo's shape (rank 8 on
  q_proj and v_proj of every layer); each request names one, drawn uniformly or by
  Zipf(1.0) popularity from the first N. Closed loop: C clients, each submitting its next
  request when the last one ends; every answer is exactly `tokens` long (min_tokens).
  Per N: output tokens/s, adapter loads (host-cache misses), host cache bytes, RSS. Each
  run in a process of its own (the model loaded again), so RSS is one engine's.
- registration: the zoo registered into a registry with the default embedder, then 1,000
  PEFT folders (synthetic weights, examples from the train splits of dev tasks outside the
  zoo) registered in one process; adapters per second.
- quality: the default (task) router's top-1 on the zoo's test prompts, and its open-world
  decision (an adapter or the base), before and after those 1,000 distractors; also the
  zoo alone under the router's at-scale path (per-adapter heads and a shortlist, which it
  takes past 64 adapters), to tell the distractors' cost from the change of algorithm; and
  where the prompts that the distractors moved went.
- heads-validation: the at-scale router's shortlist size and covariance shrinkage beside the
  distractors, on the zoo's validation prompts (the knobs one would tune; never the test).
Routing latency at 100 / 1,000 / 10,000 adapters is measured by bench_route.py; its
figures are copied from results/route.json when present.

    python benchmarks/bench_scale.py [--quick] [--parts throughput,quality,heads-validation]
    # quality includes registration; heads-validation reads the quality part's registry
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, print_table, target, write_result

from composition import Mode
from lorahub.hub import Hub
from lorahub.inference import Sampling
from lorahub.models import DEFAULT_MODEL, load_base_model
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.serve.engine import GenerationRequest
from lorahub.serve.stack import PagerConfig
from lorahub.tasks import SplitConfig, dev_tasks, fetch_bigbench, load_task
from lorahub.zoo import read_manifest, register_zoo
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry, write_peft_folder
from router import ArrowRouter, RouterOptions, Routing, SentenceEmbedder, make_router
from router.heads import ShortlistConfig
from router.task import TaskRouterConfig


def synthetic(shapes: dict[str, tuple[int, int]], seed: int, rank: int = 8) -> LoraAdapter:
    """An adapter of the zoo's shape with small random weights; shapes: module ->
    (d_in, d_out)."""
    g = torch.Generator().manual_seed(seed)
    mods = {
        name: LoraModule(
            torch.randn(rank, d_in, generator=g) * 0.01,
            torch.randn(d_out, rank, generator=g) * 0.01,
            16.0,
        )
        for name, (d_in, d_out) in shapes.items()
    }
    return LoraAdapter(mods, base_model=BaseModelInfo(DEFAULT_MODEL))


def zoo_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }


def register_synthetic(
    registry: Registry, names: list[str], shapes: dict[str, tuple[int, int]]
) -> None:
    """The synthetic adapters not yet registered, 128 per bulk call where the registry has
    `register_many` (one transaction each), else one by one."""
    todo = [(i, name) for i, name in enumerate(names) if name not in registry]
    if not hasattr(registry, "register_many"):
        for i, name in todo:
            registry.register(synthetic(shapes, i), name=name)
        return
    from registry.bulk import Submission

    for start in range(0, len(todo), 128):
        batch = [Submission(synthetic(shapes, i), name=n) for i, n in todo[start : start + 128]]
        failed = [r for r in registry.register_many(batch) if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} synthetic adapters refused: {failed[0].error}")


def rss_mb() -> float:
    """Resident memory after handing freed heap back to the OS (so it shows what is held)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Parts:
    """results/scale.parts.json: every finished measurement, written as it lands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def get(self, part: str, key: str) -> dict | None:
        return self.data.get(part, {}).get(key)

    def reload(self) -> None:
        """What other processes have written since (parts run as separate processes)."""
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def put(self, part: str, key: str, value: dict) -> None:
        value = value | {"load": os.getloadavg(), "at": time.strftime("%H:%M:%S", time.gmtime())}
        self.reload()
        self.data.setdefault(part, {})[key] = value
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(part, key, {k: v for k, v in value.items() if k not in ("routed", "top")}, flush=True)


# -- throughput ---------------------------------------------------------------------------------


def draw(names: list[str], popularity: str, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if popularity == "uniform":
        return [rng.choice(names) for _ in range(count)]
    weights = [1.0 / (i + 1) for i in range(len(names))]  # Zipf(1.0)
    return rng.choices(names, weights, k=count)


def closed_loop(engine: BatchingEngine, work: list[tuple[tuple[int, ...], str]], clients, tokens):
    """C threads, each submitting its next request when the last ends -> (seconds, tokens)."""
    queue = list(reversed(work))
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
            assert done.wait(1800), "a request never ended"
            with lock:
                made[0] += count[0]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, made[0]


def pending_runs(args, parts: Parts) -> list[str]:
    """The throughput runs not yet in the parts file, as "popularity/N". The one-adapter run
    and the largest first, side by side: the target's ratio sees the same load, and a run cut
    short still has it. One adapter is one traffic whatever the popularity: measured once."""
    counts = [int(x) for x in args.adapters.split(",")]
    order = [counts[0], *sorted(counts[1:], reverse=True)]
    runs = [f"{p}/{n}" for n in order for p in ("uniform", "zipf") if n > 1 or p == "uniform"]
    return [r for r in runs if not measured(parts, r, args)]


def run_config(args: argparse.Namespace) -> dict:
    """What a throughput row depends on besides its popularity and size."""
    return {k: getattr(args, k) for k in ("clients", "tokens", "requests", "host_mb")}


def measured(parts: Parts, run: str, args: argparse.Namespace) -> bool:
    """Whether `run` is in the parts file, measured under this config."""
    return (parts.get("throughput", run) or {}).get("config") == run_config(args)


def throughput_in_processes(args: argparse.Namespace, parts: Parts) -> None:
    """Each run in a process of its own, so its RSS shows what one engine holds with N
    adapters, not what the engines run before it in the same process left in the heap. The
    synthetic adapters are registered first, here, so that no measured process does it. A
    run that fails is reported and the others go on."""
    runs = pending_runs(args, parts)
    if runs:
        register_synthetic(
            Registry(args.work / "synthetic"),
            synthetic_names(args),
            zoo_shapes(load_base_model(DEFAULT_MODEL).model),
        )
    for run in runs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--parts", "throughput", "--run", run]
        if subprocess.run(cmd).returncode:
            print(f"throughput {run}: failed (see above); going on", flush=True)
    parts.reload()


def synthetic_names(args: argparse.Namespace) -> list[str]:
    return [f"syn{i:05d}" for i in range(max(int(x) for x in args.adapters.split(",")))]


def throughput_run(args: argparse.Namespace, parts: Parts) -> None:
    """The run args.run (popularity/N) in this process."""
    if measured(parts, args.run, args):
        return
    popularity, size = args.run.split("/")
    n = int(size)
    base = load_base_model(DEFAULT_MODEL)
    registry = Registry(args.work / "synthetic")
    names = synthetic_names(args)
    register_synthetic(registry, names, zoo_shapes(base.model))  # done before: a no-op
    hub = Hub(registry, base, ArrowRouter(registry))  # unused: every request names its adapter
    tok = base.tokenizer
    demo = [d["input"] for e in read_manifest() for d in e["demo"]]
    prompts = [
        tuple(tok(base.format_prompt(p), add_special_tokens=False)["input_ids"]) for p in demo
    ]
    idle_rss = rss_mb()
    config = BatchingConfig(
        max_batch=args.clients, pager=PagerConfig(host_bytes=args.host_mb << 20)
    )
    engine = BatchingEngine(hub, config)
    engine.start()
    rng = random.Random(n)
    batch = [prompts[rng.randrange(len(prompts))] for _ in range(args.requests)]
    work = list(zip(batch, draw(names[:n], popularity, args.requests, seed=n), strict=True))
    closed_loop(engine, work[: args.clients], args.clients, args.tokens)  # warm
    loads = engine.stack.loads
    seconds, made = closed_loop(engine, work, args.clients, args.tokens)
    row = {
        "tokens_per_s": made / seconds,
        "seconds": seconds,
        "tokens": made,
        "distinct_in_traffic": len({name for _, name in work}),
        "loads": engine.stack.loads - loads,
        "host_mb": engine.stack.host_bytes / 2**20,
        "rss_mb": rss_mb(),
        "idle_rss_mb": idle_rss,
        "config": run_config(args),
    }
    engine.stop()
    parts.put("throughput", args.run, row)


# -- registration and routing quality --------------------------------------------------------


def distractor_examples(n: int, per: int, zoo_tasks: set[str]) -> list[tuple[str, list[str]]]:
    """n (task, examples) from the train splits of dev tasks outside the zoo, round robin
    over tasks, each adapter a different slice of its task's train split."""
    pools = []
    for name in sorted(dev_tasks() - zoo_tasks):
        inputs = [ex.input for ex in load_task(name).splits(SplitConfig()).train]
        if len(inputs) >= per:
            pools.append((name, inputs))
        if len(pools) * (len(inputs) // per) >= n and len(pools) >= min(n, 100):
            break
    out, i = [], 0
    while len(out) < n:
        name, inputs = pools[i % len(pools)]
        start = (i // len(pools)) * per % max(1, len(inputs) - per + 1)
        out.append((name, inputs[start : start + per]))
        i += 1
    return out


def zoo_prompts(limit: int, split: str = "test") -> list[tuple[str, str]]:
    """(adapter, prompt) for the first `limit` inputs of `split` of every zoo task."""
    out = []
    for e in read_manifest():
        examples = getattr(load_task(e["task"]).splits(SplitConfig(**e["split"])), split)
        out += [(e["name"], ex.input) for ex in examples[:limit]]
    return out


def scale_heads_on(pool: int) -> RouterOptions:
    """The router past `ShortlistConfig.candidates` adapters (per-adapter heads over a
    shortlist), for a pool of `pool` adapters: a shortlist one short makes it take that path."""
    return RouterOptions(task=TaskRouterConfig(shortlist=ShortlistConfig(candidates=pool - 1)))


def route_quality(
    registry: Registry, prompts: list[tuple[str, str]], options: RouterOptions | None = None
) -> dict:
    router = make_router("task", registry, options)
    start = time.perf_counter()
    routings = router.route([p for _, p in prompts], k=1)
    seconds = time.perf_counter() - start
    top = [r.adapters[0] if r.adapters else None for r in routings]
    right = sum(t == want for t, (want, _) in zip(top, prompts, strict=True))
    return {
        "top1": right / len(prompts),
        "prompts": len(prompts),
        "top": top,
        "routed": [t is not None for t in top],
        "route_seconds_incl_fit": seconds,
    }


def register_all(registry: Registry, folders: list[Path]) -> tuple[str, int]:
    """Every folder registered -> (how: the bulk API where the registry has it, failures)."""
    if hasattr(registry, "register_many"):
        return "register_many", sum(not r.ok for r in registry.register_many(folders))
    for folder in folders:
        registry.register(folder, name=folder.name)
    return "register in a loop", 0


def quality_keys(args) -> tuple[str, str, str]:
    """The routing-quality measurements of one size (the same prompts in all): the zoo
    alone, the zoo alone under the at-scale router, the zoo beside the distractors."""
    size = f"{args.test_prompts}_prompts_per_task"
    return (
        f"zoo_only/{size}",
        f"zoo_only_scale_heads/{size}",
        f"with_{args.distractors}_distractors/{size}",
    )


def registration_and_quality(args, parts: Parts) -> None:
    zoo_only, zoo_heads, crowded = quality_keys(args)
    if all(parts.get("quality", k) for k in (zoo_only, zoo_heads, crowded)):
        return
    fetch_bigbench(sorted(dev_tasks()))  # the zoo's and the distractors' tasks
    prompts = zoo_prompts(args.test_prompts)
    root = args.work / "routing"
    registry = Registry(root / "registry", embedder=SentenceEmbedder())
    manifest = register_zoo(registry)
    for key, options in ((zoo_only, None), (zoo_heads, scale_heads_on(len(manifest)))):
        if not parts.get("quality", key):
            if len(registry.list()) != len(manifest):
                raise SystemExit(f"{root} holds more than the zoo: measure {key} in a new --work")
            parts.put("quality", key, route_quality(registry, prompts, options))
    if parts.get("quality", crowded):
        return
    folders = []
    shapes = {n: (m.d_in, m.d_out) for n, m in registry.load(manifest[0]["name"]).modules.items()}
    made = distractor_examples(args.distractors, args.examples, {e["task"] for e in manifest})
    for i, (task, examples) in enumerate(made):
        folder = root / "folders" / f"distractor{i:05d}"
        if not (folder / "adapter_config.json").exists():
            adapter = synthetic(shapes, 10**6 + i).with_meta(examples=tuple(examples), task=task)
            write_peft_folder(adapter, folder)
        folders.append(folder)
    todo = [f for f in folders if f.name not in registry]  # all of them in a new work dir
    start = time.perf_counter()
    how, failed = register_all(registry, todo)
    seconds = time.perf_counter() - start
    if len(todo) == args.distractors and not parts.get("registration", "bulk"):
        row = {"adapters": len(todo), "failed": failed, "seconds": seconds}
        row |= {"per_s": len(todo) / seconds, "how": how, "examples_each": args.examples}
        parts.put("registration", "bulk", row)
    crowd = route_quality(registry, prompts)
    zoo = {e["name"] for e in manifest}
    task_of = {r.name: r.meta.task or r.name for r in registry.list() if r.name not in zoo}
    crowd["lost_to"] = lost_to(
        parts.get("quality", zoo_heads)["top"], crowd["top"], prompts, task_of
    )
    parts.put("quality", crowded, crowd)


def heads_on_validation(args: argparse.Namespace, parts: Parts) -> None:
    """The at-scale router's knobs (shortlist size, the heads' covariance shrinkage) beside
    the distractors, on the zoo's validation prompts (never the test): whether either would
    keep 0.95 of the classifier's top-1 on the zoo alone. Needs the quality part's registry."""
    if parts.get("heads_validation", "top1"):
        return
    prompts = zoo_prompts(args.test_prompts, "validation")
    crowded = Registry(args.work / "routing" / "registry", embedder=SentenceEmbedder())
    alone = Registry(args.work / "validation-zoo" / "registry", embedder=SentenceEmbedder())
    register_zoo(alone)
    row = {"prompts": len(prompts), "classifier_zoo_alone": route_quality(alone, prompts)["top1"]}
    knobs = [("candidates", c) for c in (32, 64, 128, 256, 512)]
    knobs += [("shrink", x) for x in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)]
    for knob, value in knobs:
        options = RouterOptions(task=TaskRouterConfig(shortlist=ShortlistConfig(**{knob: value})))
        row[f"{knob}={value}"] = route_quality(crowded, prompts, options)["top1"]
    parts.put("heads_validation", "top1", row)


def lost_to(
    alone: list[str | None],
    crowded: list[str | None],
    prompts: list[tuple[str, str]],
    task_of: dict[str, str],
) -> dict[str, int]:
    """Prompts routed right alone and wrong beside the distractors (by the same router),
    counted by where they went: a distractor's task, another zoo adapter, the base model."""
    lost = Counter(
        task_of.get(now, "zoo adapter") if now else "base model"
        for before, now, (want, _) in zip(alone, crowded, prompts, strict=True)
        if before == want != now
    )
    return dict(lost.most_common())


# -- the summary ---------------------------------------------------------------------------------


def missing(name: str, goal: float, op: str, why: str) -> dict:
    return target(name, float("nan"), goal, op) | {"met": False, "why": why}


def summarize(args, parts: Parts) -> None:
    counts = [int(x) for x in args.adapters.split(",")]
    runs = parts.data.get("throughput", {})
    rows = [{"run": k, **v} for k, v in runs.items()]
    print_table(rows, ["run", "tokens_per_s", "distinct_in_traffic", "loads", "host_mb", "rss_mb"])
    targets = []
    top = max(counts)
    for p in ("uniform", "zipf"):
        one = runs.get(f"{p}/{counts[0]}") or runs.get(f"uniform/{counts[0]}")
        big = runs.get(f"{p}/{top}")
        name = f"{p}_throughput_{top}_over_{counts[0]}_adapters"
        if one and big:
            targets.append(target(name, big["tokens_per_s"] / one["tokens_per_s"], 0.7, ">="))
        else:
            targets.append(missing(name, 0.7, ">=", "not measured in this run"))
    base = runs.get(f"uniform/{counts[0]}")
    if base:  # each run's RSS rise over its idle process, above the one-adapter run's
        host = max(r["host_mb"] for r in runs.values())
        rise = {k: r["rss_mb"] - r["idle_rss_mb"] for k, r in runs.items()}
        growth = max(rise.values()) - rise[f"uniform/{counts[0]}"]
        targets.append(target("host_cache_mb_over_configured", host / args.host_mb, 1.0, "<="))
        targets.append(
            target(
                "rss_over_one_adapter_mb_over_configured_cache", growth / args.host_mb, 1.0, "<="
            )
        )
    q0, heads, q1 = (parts.get("quality", k) for k in quality_keys(args))
    if q0 and q1:
        same = sum(a == b for a, b in zip(q0["routed"], q1["routed"], strict=True))
        top1 = target("top1_with_distractors_over_without", q1["top1"] / q0["top1"], 0.95, ">=")
        if heads:
            top1["why"] = (
                f"past {ShortlistConfig().candidates} adapters the router scores per-adapter "
                f"heads over a shortlist: on the zoo alone they get {heads['top1']:.3f} (the "
                f"classifier {q0['top1']:.3f}), beside the distractors "
                f"{q1['top1'] / heads['top1']:.3f} of that; the prompts they route right alone "
                f"and wrong beside the distractors, by where they went: {q1.get('lost_to')}"
            )
        targets.append(top1)
        decision = target("open_world_decision_unchanged", same / len(q0["routed"]), 1.0, ">=")
        if heads:
            kept = sum(a == b for a, b in zip(heads["routed"], q1["routed"], strict=True))
            decision["why"] = (
                f"the at-scale router decides alike alone and beside the distractors for {kept} "
                f"of {len(q1['routed'])} prompts; the rest differ between the two algorithms"
            )
        targets.append(decision)
    else:
        why = "not measured: the distractors' registration did not finish on the shared machine"
        targets.append(missing("top1_with_distractors_over_without", 0.95, ">=", why))
    latency, route_targets = route_latency()
    targets += route_targets
    results = {
        "throughput": runs,
        "registration": parts.data.get("registration", {}),
        "quality": {
            k: {x: y for x, y in v.items() if x not in ("routed", "top")}
            for k, v in parts.data.get("quality", {}).items()
        },
        "heads_validation": parts.get("heads_validation", "top1"),
        "routing_latency": latency,
    }
    config = {k: v for k, v in vars(args).items() if k not in ("parts", "work", "run")}
    write_result("scale", config, results, targets, args.quick)


def route_latency() -> tuple[dict, list[dict]]:
    """bench_route.py's routing latency by number of adapters and its scale targets, where
    results/route.json has them (measured there, not twice)."""
    path = RESULTS / "route.json"
    if not path.exists():
        return {"note": "results/route.json is missing"}, []
    data = json.loads(path.read_text())
    scale = data.get("results", {}).get("scale")
    if scale is None:
        return {"note": "results/route.json holds no latency by number of adapters"}, []
    targets = [
        t | {"from": "route.json"} for t in data["targets"] if t["name"].startswith("scale_")
    ]
    return {"from": "results/route.json", "by_adapters": scale}, targets


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", default="throughput,quality,heads-validation")
    ap.add_argument("--adapters", default="1,16,64,256,1024")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="per throughput run")
    ap.add_argument("--host-mb", type=int, default=512, help="the pager's host cache")
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=16, help="per distractor adapter")
    ap.add_argument("--test-prompts", type=int, default=50, help="per zoo task")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-scale")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # one throughput run: set for a child
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.requests, args.clients = "1,64,256", 64, 16
        args.distractors, args.test_prompts = 50, 5
        args.work = args.work.with_name(args.work.name + "-quick")
    args.work.mkdir(parents=True, exist_ok=True)
    parts = Parts(RESULTS / ("scale.quick.parts.json" if args.quick else "scale.parts.json"))
    if args.run:
        throughput_run(args, parts)
        return
    chosen = args.parts.split(",")
    if "throughput" in chosen:
        throughput_in_processes(args, parts)
    if "quality" in chosen:
        registration_and_quality(args, parts)
    if "heads-validation" in chosen:
        heads_on_validation(args, parts)
    summarize(args, parts)


if __name__ == "__main__":
    main()
