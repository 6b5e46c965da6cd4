"""Registry speed: registration throughput, open time, and search latency (flat vs HNSW).

    python benchmarks/bench_registry.py [--quick] [--processes N]

Bulk registration (issues 22 and 23): the 24-adapter zoo registered by one `loraplex
register` process per folder (before; N processes timed, the rest extrapolated from their
mean, since each loads the embedder again) against one `loraplex register` call over all
folders (after); and adapters per second for 1,000 synthetic PEFT folders with examples in
one `Registry.register_many` call against `register` one at a time (100 timed).

Registration goes through the public API (validate, hash, blob write + fsync, one SQLite
transaction each). The 10k/100k catalogues for open/search are filled by bulk SQL with
copies of one real row and random unit embeddings, since only the row count matters there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, machine, print_table, target, write_result

from registry import (
    BaseModelInfo,
    IndexKind,
    LoraAdapter,
    LoraModule,
    Registry,
    write_peft_folder,
)
from router import SentenceEmbedder

ZOO = Path(__file__).resolve().parents[1] / "lorahub" / "zoo"
LORAPLEX = [sys.executable, "-m", "lorahub.cli"]


def small_adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        f"model.layers.{i}.self_attn.{p}": LoraModule(
            torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g), 16.0
        )
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    return LoraAdapter(modules, base_model=BaseModelInfo("bench"))


def bench_register(n: int, embedder: SentenceEmbedder | None) -> float:
    """Registrations per second into a fresh registry."""
    adapters = [small_adapter(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp, Registry(tmp, embedder=embedder) as reg:
        start = time.perf_counter()
        for i, a in enumerate(adapters):
            reg.register(a, name=f"a{i}", description=f"adapter number {i} for task {i % 37}")
        elapsed = time.perf_counter() - start
        assert len(reg) == n
    return n / elapsed


def zoo_folders() -> list[Path]:
    return sorted(p for p in ZOO.iterdir() if (p / "adapter_config.json").exists())


def timed_register(sources: list[Path], registry: Path) -> float:
    """Seconds for one `loraplex register SOURCE...` process, from start to exit."""
    start = time.perf_counter()
    cmd = [*LORAPLEX, "register", *map(str, sources), "--registry", str(registry)]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def bench_zoo(processes: int) -> dict:
    """The zoo: one process per folder (the first `processes` timed) vs one call."""
    folders = zoo_folders()
    with tempfile.TemporaryDirectory() as tmp:
        per_folder = [timed_register([f], Path(tmp) / "one") for f in folders[:processes]]
        one_call = timed_register(folders, Path(tmp) / "bulk")
        with Registry(Path(tmp) / "bulk") as reg:
            assert len(reg) == len(folders)
    before = float(np.mean(per_folder)) * len(folders)
    return {
        "adapters": len(folders),
        "processes_timed": len(per_folder),
        "seconds_per_process": per_folder,
        "before_s": before,
        "before_extrapolated": len(per_folder) < len(folders),
        "after_s": one_call,
        "speedup": before / one_call,
    }


def example_texts(i: int, n: int) -> tuple[str, ...]:
    """n distinct example inputs of synthetic adapter i (one of 37 task templates)."""
    templates = [
        "What is {a} plus {b}?",
        "Translate item {a} of list {b} into French.",
        "Is review {a} of product {b} positive or negative?",
        "Convert {a} miles into kilometres, rounding to {b} places.",
        "Unscramble the letters of word number {a} in puzzle {b}.",
    ]
    return tuple(
        templates[(i + j) % len(templates)].format(a=i * 7 + j, b=i % 37 + j) for j in range(n)
    )


def synthetic_folders(root: Path, n: int, examples: int) -> list[Path]:
    """n PEFT folders of rank-8 q/v adapters (4 layers of SmolLM2's widths) with examples."""
    return [
        write_peft_folder(
            zoo_shaped(i).with_meta(examples=example_texts(i, examples)), root / f"syn{i}"
        )
        for i in range(n)
    ]


def zoo_shaped(seed: int, layers: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    dims = {"q_proj": (576, 576), "v_proj": (576, 192)}
    modules = {
        f"model.layers.{i}.self_attn.{p}": LoraModule(
            torch.randn(8, d_in, generator=g) / 24, torch.randn(d_out, 8, generator=g) / 24, 16.0
        )
        for i in range(layers)
        for p, (d_in, d_out) in dims.items()
    }
    return LoraAdapter(modules, base_model=BaseModelInfo("bench-smollm2"))


def bench_bulk(n: int, one_by_one: int, examples: int) -> dict:
    """Adapters per second: `register_many` over n folders vs `register` one at a time."""
    embedder = SentenceEmbedder()
    embedder.encode(["warm up"])
    with tempfile.TemporaryDirectory() as tmp:
        folders = synthetic_folders(Path(tmp) / "src", n, examples)
        with Registry(Path(tmp) / "single", embedder=embedder) as reg:
            start = time.perf_counter()
            for f in folders[:one_by_one]:
                reg.register(f)
            single_s = time.perf_counter() - start
        with Registry(Path(tmp) / "bulk", embedder=embedder) as reg:
            start = time.perf_counter()
            results = reg.register_many(folders)
            bulk_s = time.perf_counter() - start
            assert all(r.ok for r in results) and len(reg) == n
            start = time.perf_counter()
            reg.index()  # the one index build the next search pays
            index_s = time.perf_counter() - start
    return {
        "adapters": n,
        "examples_each": examples,
        "register_many_s": bulk_s,
        "register_many_per_s": n / bulk_s,
        "one_by_one_timed": one_by_one,
        "one_by_one_per_s": one_by_one / single_s,
        "index_build_s": index_s,
        "speedup": (n / bulk_s) / (one_by_one / single_s),
    }


class FixedEmbedder:
    """Random unit vectors: the index benchmarks measure faiss, not the encoder."""

    id, dim = "bench-random", 384

    def encode(self, texts: list[str]) -> np.ndarray:
        v = np.random.default_rng(len(texts)).standard_normal((len(texts), self.dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def embedding_like(n: int, rng: np.random.Generator, intrinsic: int = 24) -> np.ndarray:
    """Unit vectors with low intrinsic dimension, like sentence embeddings (isotropic
    384-d noise has no near neighbours and is no test of an ANN index)."""
    basis = np.random.default_rng(0).standard_normal((intrinsic, FixedEmbedder.dim))
    v = rng.standard_normal((n, intrinsic)) @ basis + 0.3 * rng.standard_normal(
        (n, FixedEmbedder.dim)
    )
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def fill_catalogue(root: Path, n: int, rng: np.random.Generator, embedder: object = None) -> None:
    """n catalogue rows (copies of one real registration) with embedding-like vectors
    stored under `embedder`'s id (default: FixedEmbedder)."""
    embedder = embedder or FixedEmbedder()
    with Registry(root, embedder=embedder) as reg:
        reg.register(small_adapter(0), name="seed")
    db = sqlite3.connect(root / "catalogue.sqlite")
    row = db.execute("SELECT * FROM adapters WHERE name = 'seed'").fetchone()
    vecs = embedding_like(n, rng)
    with db:
        db.executemany(
            "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            ((i + 2, f"a{i}", *row[2:]) for i in range(n)),
        )
        db.executemany(
            "INSERT INTO embeddings VALUES (?,?,?,?,?)",
            ((i + 2, embedder.id, embedder.dim, 1, vecs[i].tobytes()) for i in range(n)),
        )
        db.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
    db.close()


def bench_index(n: int, kind: IndexKind, queries: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fill_catalogue(root, n, np.random.default_rng(n))
        start = time.perf_counter()
        with Registry(root, embedder=FixedEmbedder(), index_kind=kind) as reg:
            reg.get(f"a{n // 2}")  # open + one lookup; no weights are read
            open_s = time.perf_counter() - start
            count = len(reg)
            start = time.perf_counter()
            reg.index()  # first build from the catalogue, saved beside it
            build_s = time.perf_counter() - start
        start = time.perf_counter()
        with Registry(root, embedder=FixedEmbedder(), index_kind=kind) as reg:
            reg.index()  # loaded from disk this time
            load_s = time.perf_counter() - start
            index = reg.index()
            index.search(queries[:10], 10)  # warm up
            start = time.perf_counter()
            for q in queries:
                index.search(q[None], 10)
            latency_ms = (time.perf_counter() - start) / len(queries) * 1000
            _, got = index.search(queries, 10)
            ids, vecs = reg.embeddings()
            truth = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :10]]
            recall = float(
                np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
            )
    return {
        "n": n,
        "rows": count,
        "kind": kind.value,
        "open_ms": open_s * 1000,
        "build_s": build_s,
        "load_index_s": load_s,
        "search_ms": latency_ms,
        "recall@10": recall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
    ap.add_argument(
        "--processes",
        type=int,
        default=24,
        help="zoo folders registered one process each (the rest extrapolated)",
    )
    ap.add_argument("--only-bulk", action="store_true", help="only the bulk registration figures")
    args = ap.parse_args()
    if args.only_bulk:
        bulk_main(args)
        return
    n_reg = 100 if args.quick else 1000
    sizes = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    rng = np.random.default_rng(0)
    queries = embedding_like(200, rng)

    reg_plain = bench_register(n_reg, None)
    reg_embed = bench_register(n_reg, SentenceEmbedder())
    rows = [
        bench_index(n, kind, queries) for n in sizes for kind in (IndexKind.flat, IndexKind.hnsw)
    ]

    print(
        f"registration: {reg_plain:.0f}/s storage only, {reg_embed:.0f}/s with embedding "
        f"({n_reg} adapters, rank 8, 4 modules)"
    )
    print_table(rows, ["n", "kind", "open_ms", "build_s", "load_index_s", "search_ms", "recall@10"])

    by = {(r["n"], r["kind"]): r for r in rows}
    big = sizes[-1]
    flat, hnsw, small = by[big, "flat"], by[big, "hnsw"], by[1000, "flat"]
    targets = [
        target(
            "hnsw_speedup_over_flat_at_largest", flat["search_ms"] / hnsw["search_ms"], 3.0, ">="
        ),
        target("hnsw_recall@10_at_largest", hnsw["recall@10"], 0.95, ">="),
        target("open_time_ratio_largest_vs_1k", flat["open_ms"] / small["open_ms"], 3.0, "<="),
    ]
    write_result(
        "registry",
        {"quick": args.quick, "n_register": n_reg, "sizes": sizes, "dim": FixedEmbedder.dim},
        {"register_per_s": reg_plain, "register_with_embedding_per_s": reg_embed, "index": rows},
        targets,
        quick=args.quick,
    )
    bulk_main(args)


def bulk_main(args: argparse.Namespace) -> None:
    """The bulk registration figures, merged into results/registry.json."""
    zoo = bench_zoo(2 if args.quick else args.processes)
    bulk = bench_bulk(50 if args.quick else 1000, 10 if args.quick else 100, 5)
    print(
        f"zoo ({zoo['adapters']} adapters): one process per folder {zoo['before_s']:.0f} s"
        f"{' (extrapolated from ' + str(zoo['processes_timed']) + ')' if zoo['before_extrapolated'] else ''}"
        f", one call {zoo['after_s']:.0f} s: {zoo['speedup']:.1f}x"
    )
    print(
        f"{bulk['adapters']} folders x {bulk['examples_each']} examples: register_many "
        f"{bulk['register_many_per_s']:.1f}/s vs one by one {bulk['one_by_one_per_s']:.1f}/s "
        f"({bulk['speedup']:.1f}x)"
    )
    path = RESULTS / "registry.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("results", {})["bulk"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
        "zoo": zoo,
        "synthetic": bulk,
    }
    data.setdefault("targets", [])
    data["targets"] = [t for t in data["targets"] if not t["name"].startswith("bulk_")] + [
        target("bulk_zoo_speedup_one_call_vs_process_per_folder", zoo["speedup"], 5.0, ">="),
        target("bulk_register_many_vs_one_by_one", bulk["speedup"], 2.0, ">="),
    ]
    if not args.quick:
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
