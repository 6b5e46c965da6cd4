"""Registry speed: registration throughput, open time, and search latency (flat vs HNSW).

    python benchmarks/bench_registry.py [--quick]

Registration goes through the public API (validate, hash, blob write + fsync, one SQLite
transaction each). The 10k/100k catalogues for open/search are filled by bulk SQL with
copies of one real row and random unit embeddings, since only the row count matters there.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import print_table, target, write_result

from registry import BaseModelInfo, IndexKind, LoraAdapter, LoraModule, Registry
from router import SentenceEmbedder


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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
