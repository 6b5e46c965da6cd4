"""The handlers of the `loraplex` commands: each takes the parsed arguments and returns
the exit code; a user error raises (AdapterError, ValueError, OSError) and `cli.main`
turns it into one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from registry import (
    AdapterError,
    Registration,
    Registry,
    Submission,
    UnsafePathError,
    check_name,
    write_peft_folder,
)
from registry.bulk import Progress
from router import EXAMPLES_ADVISED, SentenceEmbedder


def default_registry() -> Path:
    home = os.environ.get("LORAPLEX_HOME")
    if home:
        return Path(home) / "registry"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "loraplex" / "registry"


def read_examples(path: Path) -> list[str]:
    """Example inputs from a .txt (one per line) or .jsonl (objects with `input`)."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot read examples: {e}") from None
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}:{i}: malformed JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
            raise AdapterError(f"{path}:{i}: expected an object with a string 'input'")
        out.append(obj["input"])
    return out


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for r in [list(headers), ["-" * w for w in widths], *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def open_registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry, embedder=SentenceEmbedder())


def cmd_register(args: argparse.Namespace) -> int:
    sources = expand_sources(args.source)
    if args.name and len(sources) > 1:
        raise AdapterError(f"--name names one adapter, but {len(sources)} sources were given")
    examples = tuple(read_examples(Path(args.examples))) if args.examples else None
    tags = tuple(t.strip() for t in args.tags.split(",") if t.strip()) if args.tags else None
    items = [Submission(s, args.name, examples, args.description, tags) for s in sources]
    start = time.perf_counter()
    with open_registry(args) as reg, _progress_bar(len(items)) as progress:
        results = reg.register_many(items, replace=args.replace, progress=progress)
        reg.save_index()
    seconds = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"loraplex: error: {_failure_line(r)}", file=sys.stderr)
    for r in results:
        if r.ok and len(r.record.meta.examples) < EXAMPLES_ADVISED:
            print(
                f"loraplex: warning: {r.record.name}: {len(r.record.meta.examples)} example "
                f"input(s); below {EXAMPLES_ADVISED} the task router (the default) sends more "
                "of its own prompts to the base model (--examples FILE, --replace)",
                file=sys.stderr,
            )
    if args.json:
        shown = [r.record.to_json() if r.ok else r.to_json() for r in results]
        single = list(args.source) == sources and len(sources) == 1  # no glob: as before
        print(json.dumps(shown[0] if single else shown))
    else:
        for r in results:
            if r.ok:
                rec = r.record
                print(
                    f"registered {rec.name} (rank {rec.rank}, {rec.n_modules} modules, "
                    f"sha256 {rec.sha256[:12]})"
                )
        if len(results) > 1:
            print(
                f"registered {len(results) - len(failed)} of {len(results)} adapters in "
                f"{seconds:.1f} s ({len(failed)} failed)"
            )
    return 1 if failed else 0


def expand_sources(specs: Sequence[str]) -> list[str]:
    """Sources as given, with glob patterns (quoted past the shell) expanded, sorted; a
    pattern that matches nothing is an error. `hf://` ids are never globbed."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith("hf://") or not glob.has_magic(spec):
            out.append(spec)
            continue
        matches = sorted(glob.glob(os.path.expanduser(spec)))
        if not matches:
            raise AdapterError(f"{spec}: no file or folder matches")
        out += matches
    return out


def _failure_line(r: Registration) -> str:
    message = " ".join(str(r.error).split()) or type(r.error).__name__
    return message if message.startswith(r.source) else f"{r.source}: {message}"


@contextmanager
def _progress_bar(total: int) -> Iterator[Progress]:
    """A bar on stderr per stage (reading sources, embedding texts), shown for several
    sources on a terminal only."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    labels = {"read": "reading", "embed": "embedding"}

    def update(stage: str, done: int, n: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(
                total=n, desc=labels.get(stage, stage), unit="", disable=None if total > 1 else True
            )
        bars[stage].update(done - bars[stage].n)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def cmd_list(args: argparse.Namespace) -> int:
    with Registry(args.registry) as reg:
        records = reg.list()
    if args.json:
        print(json.dumps([r.to_json() for r in records]))
        return 0
    rows = [
        (r.name, r.rank, ",".join(r.targets), r.base_model.name, r.meta.task or "", r.sha256[:12])
        for r in records
    ]
    print_table(rows, ["name", "rank", "targets", "base_model", "task", "sha256"])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with Registry(args.registry) as reg:
        rec = reg.get(args.name)
    info = rec.to_json()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:12} {value}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with Registry(args.registry) as reg:
        reg.remove(args.name)
    print(f"removed {args.name}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise AdapterError("search text is empty")
    with open_registry(args) as reg:
        hits = reg.search(args.text, k=args.k)
        reg.save_index()
    if args.json:
        print(json.dumps([{"name": n, "score": s} for n, s in hits]))
    else:
        print_table([(n, f"{s:.3f}") for n, s in hits], ["name", "score"])
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from composition import MergeConfig, merge

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    with Registry(args.registry) as reg:
        adapters = [reg.load(name) for name in args.names]
    result = merge(
        adapters,
        weights,
        args.method,
        MergeConfig(rank=args.rank, density=args.density, seed=args.seed),
    )
    write_peft_folder(result.adapter, args.out)
    worst = max(result.rel_error.values())
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "method": args.method,
                    "rank": result.adapter.rank,
                    "max_rel_error": worst,
                    "rel_error": result.rel_error,
                }
            )
        )
    else:
        print(
            f"wrote {args.out} ({args.method}, rank {result.adapter.rank}, "
            f"max relative error {worst:.2e} over {len(result.rel_error)} modules)"
        )
    return 0


def _routings_table(prompts: list[str], routings: list, texts: list[str] | None = None) -> None:
    """Per prompt: the decision, the router's confidence (`-`: it gives none), the adapters
    with their weights (else the note, why none)."""
    rows = []
    for i, (p, r) in enumerate(zip(prompts, routings, strict=True)):
        chosen = ", ".join(f"{n} {w:.2f}" for n, w in zip(r.adapters, r.weights, strict=True))
        fit = "-" if r.confidence is None else f"{r.confidence:.3f}"
        row = [_clip(p, 40), r.decision, fit, chosen or _clip(r.note, 48) or "-"]
        rows.append(row + ([_clip(texts[i], 40)] if texts else []))
    headers = ["prompt", "decision", "confidence", "adapters"]
    print_table(rows, headers + (["answer"] if texts else []))


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def read_prompts(args: argparse.Namespace) -> list[str]:
    """PROMPT arguments, then `--prompts FILE` (.txt, .jsonl, or `-` for stdin, one a line)."""
    prompts = list(args.prompt)
    if args.prompts == "-":
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    elif args.prompts:
        prompts += read_examples(Path(args.prompts))
    if not prompts:
        raise AdapterError("no prompts: give PROMPT arguments or --prompts FILE (- for stdin)")
    if not all(p.strip() for p in prompts):
        raise AdapterError("a prompt is empty")
    return prompts


def cmd_route(args: argparse.Namespace) -> int:
    from router import RouterOptions, make_router

    prompts = read_prompts(args)
    if args.router == "classifier" and not args.classifier:
        raise AdapterError("--router classifier needs --classifier DIR (a saved ClassifierRouter)")
    options = RouterOptions(classifier=Path(args.classifier) if args.classifier else None)
    with open_registry(args) as reg:
        routings = make_router(args.router, reg, options).route(prompts, k=args.k)
    if args.json:
        shown = [r.to_json() for r in routings]
        print(json.dumps(shown[0] if len(prompts) == 1 else shown))
    else:
        _routings_table(prompts, routings)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lorahub.hub import Hub
    from lorahub.inference import Sampling

    prompts = read_prompts(args)
    Sampling(args.max_new_tokens, args.temperature, args.top_p, (), args.seed)  # checked first
    hub = Hub.open(registry=args.registry, base_model=args.base_model, router=args.router)
    try:
        answers = hub.generate(
            prompts,
            k=args.k,
            compose=args.compose,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    finally:
        hub.close()
    if args.json:
        print(
            json.dumps(
                [{"prompt": a.prompt, "text": a.text, **a.routing.to_json()} for a in answers]
            )
        )
    else:
        _routings_table(prompts, [a.routing for a in answers], [a.text for a in answers])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lorahub.models import load_base_model
    from lorahub.tasks import bigbench_cache, load_task, require_dev_task
    from lorahub.train import TrainConfig, save_adapter, train_lora

    task = load_task(args.task, Path(args.tasks_dir) if args.tasks_dir else None)
    source = Path(args.task)
    if not source.exists():  # a BIG-bench task by name: only dev-list tasks may be trained on
        require_dev_task(str(args.task))
    elif source.resolve().is_relative_to(bigbench_cache().resolve()):
        require_dev_task(source.resolve().parent.relative_to(bigbench_cache().resolve()).as_posix())
    cfg = TrainConfig(
        rank=args.rank,
        alpha=args.alpha or 2.0 * args.rank,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        loraplus_ratio=args.loraplus_ratio,
        targets=tuple(args.targets.split(",")),
        seed=args.seed,
    )
    base = load_base_model(args.base_model)
    result = train_lora(
        base, list(task.examples), cfg, checkpoint_dir=Path(args.out) / "checkpoint"
    )
    adapter = result.adapter.with_meta(
        task=task.name,
        description=task.description or task.name,
        examples=tuple(ex.input for ex in task.examples[:24]),
    )
    save_adapter(adapter, Path(args.out))
    msg = {
        "out": str(args.out),
        "steps": cfg.steps,
        "final_loss": result.losses[-1],
        "seconds": round(result.seconds, 1),
    }
    print(
        json.dumps(msg)
        if args.json
        else f"wrote {args.out}: {cfg.steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} "
        f"in {result.seconds:.0f}s"
    )
    return 0


def cmd_train_retriever(args: argparse.Namespace) -> int:
    from router.training import RetrieverTrainConfig, train_retriever

    with Registry(args.registry) as reg:
        examples = {r.name: list(r.meta.examples) for r in reg.list() if len(r.meta.examples) >= 2}
    embedder = train_retriever(examples, args.out, config=RetrieverTrainConfig(epochs=args.epochs))
    print(
        f"wrote {args.out} (trained on {len(examples)} adapters); use it with "
        f"SentenceEmbedder(model={str(args.out)!r})"
        if not args.json
        else json.dumps({"out": str(args.out), "adapters": len(examples), "embedder": embedder.id})
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        problems = reg.doctor(repair=args.repair)
    if args.json:
        print(json.dumps({"problems": problems, "repaired": args.repair}))
    else:
        for p in problems:
            print(p)
        print(
            f"{len(problems)} problem(s){' repaired where possible' if args.repair and problems else ''}"
        )
    unrepairable = [p for p in problems if not p.startswith(("orphan", "temp", "stale"))]
    return 1 if unrepairable or (problems and not args.repair) else 0


def cmd_learn(args: argparse.Namespace) -> int:
    from lorahub.learn import LoraHubConfig, learn_weights
    from lorahub.models import load_base_model
    from lorahub.tasks import load_jsonl

    cfg = LoraHubConfig(steps=args.steps, mode=args.mode, optimizer=args.optimizer, seed=args.seed)
    examples = list(load_jsonl(Path(args.examples)).examples)
    names = [n.strip() for n in args.adapters.split(",") if n.strip()]
    with Registry(args.registry) as reg:
        adapters = [reg.load(n) for n in names]
    result = learn_weights(load_base_model(args.base_model), adapters, examples, cfg)
    write_peft_folder(
        result.adapter.with_meta(
            description=f"LoraHub composition of {', '.join(names)}",
            extra={
                "lorahub": {
                    "adapters": names,
                    "weights": result.weights,
                    "objective": result.objective,
                }
            },
        ),
        args.out,
    )
    info = {
        "out": str(args.out),
        "weights": dict(zip(names, result.weights, strict=True)),
        "objective": result.objective,
        "loss": result.loss,
        "evaluations": len(result.history),
        "seconds": round(result.seconds, 1),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print_table([(n, f"{w:+.3f}") for n, w in info["weights"].items()], ["adapter", "weight"])
        print(
            f"objective {result.objective:.4f} after {len(result.history)} evaluations "
            f"({result.seconds:.0f}s); wrote {args.out}"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorahub.evaluate import EvalConfig, evaluate
    from lorahub.hub import Hub
    from lorahub.report import write_report
    from lorahub.tasks import fetch_bigbench, load_task, require_dev_task

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bigbench = [n for n in names if not n.endswith(".jsonl")]
    if args.protocol == "fewshot":  # learning from a task's examples is tuning on it
        for n in bigbench:
            require_dev_task(n)
    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else None
    if tasks_dir is None:
        fetch_bigbench(bigbench)
    tasks = [load_task(n, tasks_dir) for n in names]
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    cfg = EvalConfig(
        protocol=args.protocol,
        methods=methods,
        k=args.k,
        limit=args.limit,
        shots=args.shots,
        candidates=args.candidates,
        seed=args.seed,
    )
    hub = Hub.open(registry=args.registry, base_model=args.base_model)
    try:
        out = write_report(evaluate(hub, tasks, cfg), args.out)
    finally:
        hub.close()
    summary = json.loads((out / "results.json").read_text())["summary"]
    if args.json:
        print(json.dumps({"out": str(out), "summary": summary}))
    else:
        print_table(
            [(m, f"{s.get('accuracy', float('nan')):.3f}") for m, s in summary.items()],
            ["method", "accuracy"],
        )
        print(f"report in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lorahub.demo import run_demo

    return run_demo(args.registry if args.registry_given else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from lorahub.hub import Hub
    from lorahub.models import DEFAULT_MODEL, load_base_model
    from lorahub.serve.app import ServeConfig
    from lorahub.serve.batching import BatchingConfig
    from lorahub.serve.server import EngineOptions, make_engine, serve
    from router import RouterOptions

    if args.api_key is not None and not args.api_key.strip():  # an empty LORAPLEX_API_KEY is
        raise AdapterError(  # how a shell says "no key"; `--api-key "$KEY"` says it by mistake
            "--api-key is empty (an unset variable?): give a key, or leave the flag out to "
            "serve without one"
        )
    config = ServeConfig(
        compose=args.compose,
        k=args.k,
        max_tokens=args.max_tokens,
        api_key=args.api_key or os.environ.get("LORAPLEX_API_KEY") or None,
        router=args.router,
    )
    upstreams = tuple(u.strip() for u in (args.upstream or "").split(",") if u.strip())
    if args.engine == "vllm" and not upstreams:
        raise ValueError("--engine vllm needs --upstream URL[,URL...] (vLLM OpenAI servers)")
    options = EngineOptions(
        BatchingConfig(args.max_batch, args.max_queue), upstreams, args.max_lora_rank
    )
    name = args.base_model or (_upstream_model(upstreams[0]) if upstreams else DEFAULT_MODEL)
    # the gateway only formats, tokenizes and checks shapes: no weights needed
    base = load_base_model(name, weights=args.engine != "vllm")
    hub = Hub.open(
        registry=args.registry,
        base_model=base,
        router=args.router,
        router_options=RouterOptions(classifier=Path(args.classifier) if args.classifier else None),
    )
    if not hub.catalogue().usable:
        print(
            f"loraplex: warning: {args.registry} holds no adapter for {name}: every request "
            "gets the base model (register adapters, or pass --registry)",
            file=sys.stderr,
        )
    try:
        serve(hub, make_engine(args.engine, hub, options), config, args.host, args.port)
    finally:
        hub.close()
    return 0


def _upstream_model(url: str) -> str:
    """The base model a vLLM replica serves (the gateway formats and tokenizes with it)."""
    import httpx

    try:
        data = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=10).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise ValueError(
            f"cannot ask {url} which model it serves ({e}); pass --base-model"
        ) from None
    return next(m["root"] or m["id"] for m in data if not m.get("parent"))


def _export_folder(out: Path, name: str) -> Path:
    """out/<name>: a catalogue name is data (a hand-edited or hostile catalogue may hold
    anything), so it becomes a folder only if it is a valid adapter name."""
    try:
        return out / check_name(name)
    except UnsafePathError as e:
        raise UnsafePathError(
            f"the catalogue holds an unsafe adapter name {name!r}; nothing was exported "
            f"(`loraplex remove` it, `loraplex doctor` lists such entries): {e}"
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    """Every adapter as a PEFT folder under DIR, and the vLLM --lora-modules line. Each
    folder's `loraplex.json` names the version written (its sha256), so a replica's copy
    can be told from the adapter registered now."""
    out = Path(args.dir)
    with Registry(args.registry) as reg:
        records = reg.list()
        folders = {r.name: _export_folder(out, r.name) for r in records}  # all checked first
        for rec in records:
            folder = write_peft_folder(reg.load(rec.name, sha256=rec.sha256), folders[rec.name])
            (folder / "loraplex.json").write_text(
                json.dumps({"name": rec.name, "sha256": rec.sha256}) + "\n"
            )
    names = [r.name for r in records]
    modules = " ".join(f"{n}={folders[n].resolve()}" for n in names)
    (out / "lora-modules.txt").write_text(f"--lora-modules {modules}\n")
    if args.json:
        shas = {r.name: r.sha256 for r in records}
        print(json.dumps({"out": str(out), "adapters": names, "sha256": shas}))
    else:
        print(f"wrote {len(names)} adapters to {out}; start vLLM with:")
        print(f"  vllm serve BASE --enable-lora --lora-modules {modules}")
    return 0
