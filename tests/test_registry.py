"""Registry behaviour: storage, dedup, removal, search, persistence across processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from registry import (
    AdapterMeta,
    AdapterNotFoundError,
    BaseModelInfo,
    IndexKind,
    LoraAdapter,
    LoraModule,
    Registry,
    VectorIndex,
    write_peft_folder,
)


def random_adapter(seed: int, rank: int = 4, base: str = "tiny", dim: int = 16) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        f"model.layers.{i}.self_attn.q_proj": LoraModule(
            torch.randn(rank, dim, generator=g), torch.randn(dim, rank, generator=g), 8.0
        )
        for i in range(2)
    }
    return LoraAdapter(modules, base_model=BaseModelInfo(base))


def test_identical_adapters_are_stored_once(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        a = reg.register(random_adapter(0), name="a")
        b = reg.register(random_adapter(0), name="b", description="same weights, other name")
        c = reg.register(random_adapter(1), name="c")
    assert a.sha256 == b.sha256 != c.sha256
    assert len(list((tmp_path / "blobs").rglob("*.safetensors"))) == 2


def test_remove_keeps_a_shared_blob_and_drops_an_unused_one(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        a = reg.register(random_adapter(0), name="a")
        reg.register(random_adapter(0), name="b")
        reg.remove("a")
        assert reg.blob_path(a.sha256).exists() and reg.names() == ["b"]
        reg.remove("b")
        assert not reg.blob_path(a.sha256).exists() and len(reg) == 0
        with pytest.raises(AdapterNotFoundError):
            reg.remove("b")


def test_replace_swaps_weights_and_collects_the_old_blob(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        old = reg.register(random_adapter(0), name="a")
        new = reg.register(random_adapter(1), name="a", replace=True)
        assert reg.load("a").sha256() == new.sha256 != old.sha256
        assert not reg.blob_path(old.sha256).exists()


def test_load_returns_the_registered_tensors(tmp_path: Path) -> None:
    adapter = random_adapter(3)
    with Registry(tmp_path) as reg:
        reg.register(adapter, name="a", tags=["x"], task="t")
        back = reg.load("a")
    for name, m in adapter.modules.items():
        assert torch.equal(m.lora_A, back.modules[name].lora_A)
        assert torch.equal(m.lora_B, back.modules[name].lora_B)
    assert back.meta.tags == ("x",) and back.meta.task == "t"


def test_opening_reads_no_weights(tmp_path: Path) -> None:
    """Listing and metadata come from the catalogue alone: blobs may even be absent."""
    with Registry(tmp_path) as reg:
        for i in range(5):
            reg.register(random_adapter(i), name=f"a{i}", task=f"task{i}")
    for blob in (tmp_path / "blobs").rglob("*.safetensors"):
        blob.unlink()
    with Registry(tmp_path) as reg:
        assert [r.meta.task for r in reg.list()] == [f"task{i}" for i in range(5)]
        assert reg.get("a2").rank == 4


def test_a_second_process_sees_what_the_first_registered(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        reg.register(random_adapter(0), name="first")
    code = (
        "import sys; from registry import Registry; r = Registry(sys.argv[1]); "
        "print(','.join(r.names())); print(r.load('first').sha256())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["first", random_adapter(0).sha256()]


def test_search_ranks_adapters_by_their_examples(tmp_path: Path, embedder) -> None:
    tasks = {
        "arithmetic": ["What is 17 plus 25?", "Compute 9 times 6.", "What is 100 minus 37?"],
        "translation": ["Translate 'bonjour' to English.", "How do you say dog in Spanish?"],
        "sentiment": ["I hated that movie.", "What a wonderful, happy day!"],
        "geography": ["What is the capital of France?", "Which river flows through Cairo?"],
    }
    with Registry(tmp_path, embedder=embedder) as reg:
        for i, (task, ex) in enumerate(tasks.items()):
            reg.register(random_adapter(i), name=task, examples=ex)
        assert reg.search("What is 8 plus 13?", k=1)[0][0] == "arithmetic"
        assert reg.search("Translate 'cat' into French.", k=1)[0][0] == "translation"
        assert reg.search("What is the capital of Japan?", k=1)[0][0] == "geography"
        hits = reg.search("What is 8 plus 13?", k=4)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        assert "arithmetic" not in [n for n, _ in reg.search("8 + 13", k=3, exclude=["arithmetic"])]
        assert len(reg.search("anything", k=10)) == 4


def test_adapter_embedding_is_the_normalized_mean_of_its_examples(tmp_path: Path, embedder) -> None:
    examples = ["What is 2 plus 2?", "Compute 3 times 5."]
    with Registry(tmp_path, embedder=embedder) as reg:
        reg.register(random_adapter(0), name="a", examples=examples)
        _, vecs = reg.embeddings()
    mean = embedder.encode(examples).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(vecs[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_index_is_rebuilt_when_missing_or_stale(tmp_path: Path, embedder) -> None:
    with Registry(tmp_path, embedder=embedder) as reg:
        reg.register(random_adapter(0), name="math", examples=["What is 1 plus 1?"])
        reg.search("2 + 2", k=1)
    for f in tmp_path.glob("index.*.faiss"):
        f.unlink()
    with Registry(tmp_path, embedder=embedder) as other:
        other.register(random_adapter(1), name="french", examples=["Translate to French: hi"])
    with Registry(tmp_path, embedder=embedder) as reg:
        assert reg.search("Translate to French: cat", k=1)[0][0] == "french"
        assert len(reg.index()) == 2


def test_description_is_embedded_when_there_are_no_examples(tmp_path: Path, embedder) -> None:
    with Registry(tmp_path, embedder=embedder) as reg:
        reg.register(random_adapter(0), name="poems", description="writes poetry about the sea")
        reg.register(random_adapter(1), name="sql", description="writes SQL queries for databases")
        reg.register(random_adapter(2), name="bare")  # nothing to embed: not searchable
        assert [n for n, _ in reg.search("a short poem about waves", k=3)] == ["poems", "sql"]


@pytest.mark.parametrize("kind", [IndexKind.flat, IndexKind.hnsw])
def test_faiss_search_matches_brute_force(kind: IndexKind, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((2000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    ids = np.arange(10, 2010)
    index = VectorIndex.build(ids, vecs, "s", kind)
    index.save(tmp_path)
    index = VectorIndex.load(tmp_path, "s")
    _, got = index.search(queries, 5)
    truth = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :5]]
    recall = np.mean([len(set(g) & set(t)) / 5 for g, t in zip(got, truth, strict=True)])
    assert recall == 1.0 if kind == IndexKind.flat else recall >= 0.98


def test_metadata_overrides_at_registration(tmp_path: Path) -> None:
    adapter = random_adapter(0).with_meta(task="old", tags=("a",))
    with Registry(tmp_path) as reg:
        rec = reg.register(adapter, name="x", task="new", examples=["e1", "e2"])
    assert rec.meta.task == "new" and rec.meta.tags == ("a",) and rec.meta.examples == ("e1", "e2")
    assert rec.to_json()["base_model"] == "tiny" and isinstance(rec.meta, AdapterMeta)


def test_doctor_finds_and_repairs_crash_debris_without_touching_entries(
    tmp_path: Path, embedder
) -> None:
    with Registry(tmp_path, embedder=embedder) as reg:
        kept = reg.register(random_adapter(0), name="kept", examples=["x"])
        reg.search("x", k=1)
        assert reg.doctor() == []
        (tmp_path / "tmp" / "half-written.safetensors").write_bytes(b"partial")
        orphan = reg.blob_path("ab" * 32)
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"orphan")
        (tmp_path / "index.0000000000000000.faiss").write_bytes(b"old")
        problems = reg.doctor(repair=True)
        assert len(problems) == 3 and reg.doctor() == []
        assert reg.load("kept").sha256() == kept.sha256
        tampered = reg.blob_path(kept.sha256)
        data = bytearray(tampered.read_bytes())
        data[-1] ^= 0xFF
        tampered.write_bytes(bytes(data))
        assert any("does not match its sha256" in p for p in reg.doctor(repair=True))
        assert reg.names() == ["kept"]


def test_adapter_cache_is_bounded_in_bytes_lru_first(tmp_path: Path) -> None:
    from registry import AdapterCache

    with Registry(tmp_path) as reg:
        for i in range(4):
            reg.register(random_adapter(i), name=f"a{i}")
        one = reg.load("a0").nbytes
        cache = AdapterCache(reg, max_bytes=2 * one)
        first = cache.get("a0")
        cache.get("a1")
        assert cache.get("a0") is first  # a hit, and now the most recent
        cache.get("a2")  # over budget: a1, the least recently used, goes
        assert len(cache) == 2 and cache.nbytes <= 2 * one
        assert cache.get("a0") is first


def test_refused_duplicate_name_leaves_no_blob_behind(tmp_path: Path) -> None:
    from registry import DuplicateNameError

    with Registry(tmp_path) as reg:
        reg.register(random_adapter(0), name="a")
        blobs = sorted((tmp_path / "blobs").rglob("*"))
        with pytest.raises(DuplicateNameError, match="'a'"):
            reg.register(random_adapter(1), name="a")  # other weights, same name
        assert sorted((tmp_path / "blobs").rglob("*")) == blobs
        assert reg.doctor() == []


def test_removed_adapters_no_longer_constrain_shapes(tmp_path: Path) -> None:
    from registry import AdapterShapeError

    with Registry(tmp_path) as reg:
        reg.register(random_adapter(0, dim=16), name="narrow")
        with pytest.raises(AdapterShapeError):
            reg.register(random_adapter(1, dim=24), name="wide")
        reg.remove("narrow")
        assert reg.shapes("tiny") == {}
        reg.register(random_adapter(1, dim=24), name="wide")
        assert set(reg.shapes("tiny").values()) == {(24, 24)}


def make_old_registry(
    root: Path, n: int, missing: tuple[str, ...] = ()
) -> dict[str, dict[str, tuple[int, int]]]:
    """A registry as loraplex before 0.2 left it (one stale `module_shapes` table per base
    model, no per-adapter shapes, catalogue version 0), the blobs of `missing` deleted;
    returns each adapter's shapes."""
    import sqlite3

    with Registry(root) as reg:
        for i in range(n):
            reg.register(random_adapter(i, dim=16 + 8 * (i % 2), base=f"b{i % 2}"), name=f"a{i}")
        shapes = {f"a{i}": reg.adapter_shapes(f"a{i}") for i in range(n)}
        for name in missing:
            reg.blob_path(reg.get(name).sha256).unlink()
    db = sqlite3.connect(root / "catalogue.sqlite")
    db.executescript(
        "DELETE FROM adapter_modules; CREATE TABLE module_shapes (base_model TEXT, "
        "module TEXT, d_in INTEGER, d_out INTEGER); INSERT INTO module_shapes "
        "VALUES ('b0', 'gone.q_proj', 99, 99); PRAGMA user_version = 0;"
    )
    db.close()
    return shapes


def tables(reg: Registry) -> set[str]:
    return {r[0] for r in reg._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_registries_with_the_old_shape_table_are_migrated(tmp_path: Path) -> None:
    expected = make_old_registry(tmp_path, 3)
    with Registry(tmp_path) as reg:
        assert {n: reg.adapter_shapes(n) for n in reg.names()} == expected
        assert reg.shapes("b0") == expected["a0"]  # the stale row is gone with its table
        assert "module_shapes" not in tables(reg)


def test_migration_skips_and_names_an_adapter_whose_blob_is_missing(tmp_path: Path) -> None:
    expected = make_old_registry(tmp_path, 3, missing=("a1",))
    with pytest.warns(UserWarning, match=r"a1: module shapes not migrated: blob \w+ is missing"):
        reg = Registry(tmp_path)
    with reg:
        assert reg.adapter_shapes("a1") == {}  # unknown, so never offered as fitting
        assert [reg.adapter_shapes(n) for n in ("a0", "a2")] == [expected["a0"], expected["a2"]]
        assert "module_shapes" not in tables(reg)
        assert any(p.startswith("a1: blob") and "missing" in p for p in reg.doctor())
    with Registry(tmp_path) as again:  # migrated once: no second warning, nothing to redo
        assert again._db.execute("PRAGMA user_version").fetchone()[0] >= 1


def test_migration_reads_headers_not_weights(tmp_path: Path, monkeypatch) -> None:
    import registry.peft_format
    import registry.store

    make_old_registry(tmp_path, 2)

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("a migration read adapter weights")

    for module in (registry.peft_format, registry.store):
        monkeypatch.setattr(module, "read_safetensors", no_weights)
    with Registry(tmp_path) as reg:
        assert reg.adapter_shapes("a0")


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from registry import Registry
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
with Registry(sys.argv[1]) as reg:
    print(sorted((n, sorted(reg.adapter_shapes(n).items())) for n in reg.names()))
"""


def test_processes_opening_an_old_registry_at_once_migrate_it_once(tmp_path: Path) -> None:
    root, go = tmp_path / "reg", tmp_path / "go"
    expected = make_old_registry(root, 4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, str(root), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()  # released together, so their opens overlap
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    want = str(sorted((n, sorted(s.items())) for n, s in expected.items()))
    assert [out.strip() for out, _ in outs] == [want] * 4


def test_other_threads_read_and_load_through_their_own_connection(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Registry(tmp_path) as reg:
        reg.register(random_adapter(0), name="a")
        with ThreadPoolExecutor(4) as pool:
            loaded = list(pool.map(lambda _: reg.load("a").sha256(), range(8)))
        assert set(loaded) == {reg.get("a").sha256}


class CountingEmbedder:
    """The real embedder, counting its `encode` calls and texts."""

    def __init__(self, inner) -> None:
        self.inner, self.id, self.dim = inner, inner.id, inner.dim
        self.calls: list[int] = []

    def encode(self, texts):
        self.calls.append(len(texts))
        return self.inner.encode(texts)


def bulk_folders(root: Path, n: int) -> list[Path]:
    """n PEFT folders carrying their examples, each its own weights."""
    folders = []
    for i in range(n):
        examples = (f"What is {i} plus {i + 1}?", f"Translate item {i} into French.")
        adapter = random_adapter(i).with_meta(examples=examples, task=f"task{i % 3}")
        folders.append(write_peft_folder(adapter, root / f"ad{i}"))
    return folders


def registry_state(reg: Registry) -> dict[str, tuple]:
    """name -> (sha256, embedding) and the blob files: what registration leaves."""
    ids, vecs = reg.embeddings()
    by_id = {r.id: r for r in reg.list()}
    return {by_id[int(i)].name: (by_id[int(i)].sha256, v) for i, v in zip(ids, vecs, strict=True)}


def test_register_many_equals_one_by_one_and_skips_the_bad_source(tmp_path: Path, embedder) -> None:
    folders = bulk_folders(tmp_path / "src", 12)
    corrupt = folders[5] / "adapter_model.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # truncated
    wide = write_peft_folder(random_adapter(99, dim=24), tmp_path / "src" / "wide")
    sources = [*folders, wide, folders[2]]  # shapes contradict; a name given twice

    with Registry(tmp_path / "oracle", embedder=embedder) as oracle:
        for folder in folders[:5] + folders[6:]:
            oracle.register(folder)
        expected = registry_state(oracle)
        expected_blobs = sorted(p.name for p in (tmp_path / "oracle" / "blobs").rglob("*.*"))

    counting = CountingEmbedder(embedder)
    with Registry(tmp_path / "bulk", embedder=counting) as reg:
        generation = reg.generation()
        results = reg.register_many(sources, batch_size=16)
        assert counting.calls == [16, 6]  # 22 texts across 11 adapters, batches of 16
        assert reg.generation() == generation + 1  # one transaction
        got = registry_state(reg)
        assert len(reg.search("What is 3 plus 4?", k=20)) == 11
    assert [r.ok for r in results] == [i != 5 for i in range(12)] + [False, False]
    assert results[5].name == "ad5" and "ad5" in results[5].source
    assert "contradicts" in str(results[12].error) and results[12].name == "wide"
    assert "given to two sources" in str(results[13].error)
    assert [r.record.name for r in results if r.ok] == [f"ad{i}" for i in range(12) if i != 5]
    assert sorted(got) == sorted(expected)
    for name, (sha, vec) in expected.items():
        assert got[name][0] == sha
        np.testing.assert_allclose(got[name][1], vec, atol=1e-5)
    blobs = sorted(p.name for p in (tmp_path / "bulk" / "blobs").rglob("*.*"))
    assert blobs == expected_blobs  # nothing of the bad sources stored
    assert not list((tmp_path / "bulk" / "tmp").iterdir())


def test_an_interrupted_register_many_stores_nothing(tmp_path: Path, embedder) -> None:
    folders = bulk_folders(tmp_path / "src", 4)

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "embed":
            raise KeyboardInterrupt

    with Registry(tmp_path / "reg", embedder=embedder) as reg:
        reg.register(random_adapter(50), name="kept", examples=["x"])
        generation = reg.generation()
        with pytest.raises(KeyboardInterrupt):
            reg.register_many(folders, progress=interrupt)
        assert reg.names() == ["kept"] and reg.generation() == generation
    assert len(list((tmp_path / "reg" / "blobs").rglob("*.safetensors"))) == 1
