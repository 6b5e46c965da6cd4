"""`Registry`: a folder holding an SQLite catalogue, content-addressed adapter blobs and a
faiss index of adapter embeddings.

    registry/
      catalogue.sqlite   names, metadata, module shapes, embeddings (WAL mode)
      blobs/ab/<sha256>.safetensors
      index.<stamp>.faiss   cache of the embeddings, rebuilt when its stamp is stale
      tmp/               temp files; anything left here is debris from a crash

Writes are atomic: a blob is written to tmp/, fsynced and renamed into place, then the
row is inserted in one transaction. Opening reads no adapter weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from registry.adapter import AdapterMeta, LoraAdapter
from registry.catalogue import SCHEMA, AdapterRecord, check_name, record_from_row
from registry.derived import cached_tensors
from registry.doctor import doctor
from registry.embedding import Embedder, examples_key, mean_embedding, meta_texts
from registry.errors import (
    AdapterError,
    AdapterNotFoundError,
    DuplicateNameError,
    IntegrityError,
)
from registry.index import IndexKind, VectorIndex
from registry.migrations import migrate
from registry.peft_format import (
    adapter_from_tensors,
    header_metadata,
    parse_config,
    peft_tensors,
    read_safetensors,
    write_safetensors_atomic,
)
from registry.sources import load_source
from registry.validate import Limits, check_shapes_match, validate


class Registry:
    """A persistent, searchable collection of LoRA adapters.

    >>> reg = Registry("my-registry", embedder=SentenceEmbedder())   # doctest: +SKIP
    >>> reg.register("path/to/peft-folder", name="math", examples=["2+2="])  # doctest: +SKIP
    >>> reg.search("what is 3+4?", k=3)   # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        embedder: Embedder | None = None,
        limits: Limits | None = None,
        index_kind: IndexKind = IndexKind.auto,
    ) -> None:
        self.root = Path(root)
        self.embedder = embedder
        self.limits = limits or Limits()
        self.index_kind = IndexKind(index_kind)
        for sub in ("blobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # One SQLite connection per thread (a server routes, loads and formats from several);
        # WAL lets them read while one writes.
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._index: VectorIndex | None = None
        with self._write() as db:  # one transaction: two processes opening at once are safe
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            skipped = migrate(db, self.blob_path)
        if skipped:
            warnings.warn(
                f"{self.root}: {'; '.join(skipped)}; `loraplex doctor` reports these",
                stacklevel=2,
            )

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.root / "catalogue.sqlite",
                timeout=60,
                isolation_level=None,
                check_same_thread=False,  # used by its thread only; closed by close()
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    # -- transactions ---------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock (other writers wait)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection."""
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------
    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        return self._row(str(name)) is not None

    def _row(self, name: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()

    def get(self, name: str) -> AdapterRecord:
        row = self._row(name)
        if row is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
        return record_from_row(row)

    def list(self) -> list[AdapterRecord]:
        return [
            record_from_row(r) for r in self._db.execute("SELECT * FROM adapters ORDER BY name")
        ]

    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM adapters ORDER BY name")]

    def blob_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise IntegrityError(f"malformed sha256 {sha256!r} in the catalogue")
        return self.root / "blobs" / sha256[:2] / f"{sha256}.safetensors"

    def load(self, name: str, verify: bool = True, sha256: str | None = None) -> LoraAdapter:
        """The adapter's weights, read from its blob; `verify` re-hashes them. With
        `sha256`, that version only: AdapterNotFoundError, before any blob is read, once
        the name holds other content (replaced)."""
        rec = self.get(name)
        if sha256 is not None and rec.sha256 != sha256:
            raise AdapterNotFoundError(
                f"{name}: version {sha256[:12]} is no longer registered "
                f"(replaced by {rec.sha256[:12]})"
            )
        path = self.blob_path(rec.sha256)
        if not path.exists():
            raise IntegrityError(f"{name}: blob {path} is missing")
        tensors, header = read_safetensors(path, self.limits)
        config = parse_config(header.pop("config", None), str(path))
        adapter = adapter_from_tensors(tensors, config, header, str(path))
        adapter = LoraAdapter(adapter.modules, adapter.use_rslora, rec.base_model, rec.meta)
        if verify and adapter.sha256() != rec.sha256:
            raise IntegrityError(f"{name}: blob {path} does not match its sha256 (tampered?)")
        return adapter

    def adapter_shapes(self, name: str) -> dict[str, tuple[int, int]]:
        """Module -> (d_in, d_out) of one adapter, from the catalogue (no blob read); empty
        when unknown (a migration that found its blob missing)."""
        rows = self._db.execute(
            "SELECT module, d_in, d_out FROM adapter_modules "
            "JOIN adapters ON adapters.id = adapter_id WHERE name = ?",
            (name,),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def shapes(self, base_model: str) -> dict[str, tuple[int, int]]:
        """Module -> (d_in, d_out) established by the current adapters of `base_model`."""
        rows = self._db.execute(
            "SELECT DISTINCT module, d_in, d_out FROM adapter_modules "
            "JOIN adapters ON adapters.id = adapter_id WHERE base_model = ?",
            (base_model,),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- writing --------------------------------------------------------------------
    def register(
        self,
        source: str | Path | LoraAdapter,
        name: str | None = None,
        *,
        examples: Sequence[str] | None = None,
        description: str | None = None,
        tags: Sequence[str] | None = None,
        task: str | None = None,
        replace: bool = False,
    ) -> AdapterRecord:
        """Validate and store an adapter; embed it if it has examples or a description.

        `source`: a `LoraAdapter`, a PEFT folder, a `.safetensors` file or `hf://owner/name`.
        Arguments given here override the adapter's own metadata. Nothing is changed
        if any check fails.
        """
        adapter = (
            source if isinstance(source, LoraAdapter) else load_source(str(source), self.limits)
        )
        name = check_name(_default_name(source) if name is None else name)
        changes = {
            k: v
            for k, v in dict(
                examples=tuple(examples) if examples is not None else None,
                description=description,
                tags=tuple(tags) if tags is not None else None,
                task=task,
            ).items()
            if v is not None
        }
        adapter = adapter.with_meta(**changes)
        validate(adapter, self.limits)
        check_shapes_match(adapter, self.shapes(adapter.base_model.name), adapter.base_model.name)
        if not replace and name in self:
            raise DuplicateNameError(
                f"an adapter named {name!r} exists; pass replace=True (--replace)"
            )
        embedding = self._embed(adapter.meta) if self.embedder else None
        sha = adapter.sha256()
        self._write_blob(adapter, sha)
        try:
            row_id, old, generation = self._commit(name, sha, adapter, embedding, replace)
        except AdapterError:
            self._collect_blob(sha)  # refused under the lock: leave no orphan blob
            raise
        self._update_index(generation, add=(row_id, embedding), remove=old and old["id"])
        if old is not None and old["sha256"] != sha:
            self._collect_blob(old["sha256"])
        return self.get(name)

    def _commit(
        self,
        name: str,
        sha: str,
        adapter: LoraAdapter,
        embedding: tuple[np.ndarray, int] | None,
        replace: bool,
    ) -> tuple[int, sqlite3.Row | None, int]:
        """The row, in one transaction: (new id, the row it replaced, new generation)."""
        with self._write() as db:
            # Checked again under the write lock: another process may have just written.
            check_shapes_match(
                adapter, self.shapes(adapter.base_model.name), adapter.base_model.name
            )
            old = db.execute("SELECT id, sha256 FROM adapters WHERE name = ?", (name,)).fetchone()
            if old is not None and not replace:
                raise DuplicateNameError(
                    f"an adapter named {name!r} exists; pass replace=True (--replace)"
                )
            if old is not None:
                db.execute("DELETE FROM adapters WHERE id = ?", (old["id"],))
            if not self.blob_path(sha).exists():  # removed by a concurrent remove
                self._write_blob(adapter, sha)
            row_id = self._insert(db, name, sha, adapter, embedding)
            return row_id, old, self._bump(db)

    def remove(self, name: str) -> None:
        """Forget an adapter; its blob goes too unless another name shares it."""
        with self._write() as db:
            row = db.execute("SELECT id, sha256 FROM adapters WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
            db.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
            generation = self._bump(db)
        self._update_index(generation, add=None, remove=row["id"])
        self._collect_blob(row["sha256"])

    def doctor(self, repair: bool = False, verify: bool = True) -> list[str]:
        """Problems found, one line each (see registry.doctor); `repair` removes debris."""
        return doctor(self, repair, verify)

    def _collect_blob(self, sha: str) -> None:
        """Delete a blob no row refers to. Runs under the write lock, so a concurrent
        register of the same content either sees the file gone (and rewrites it) or
        commits its row first (and the blob stays)."""
        with self._write() as db:
            used = db.execute("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()
            if used is None:
                self.blob_path(sha).unlink(missing_ok=True)

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        db.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
        return db.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()[0]

    def _write_blob(self, adapter: LoraAdapter, sha: str) -> None:
        path = self.blob_path(sha)
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True)
        tmp = self.root / "tmp" / f"{sha}.{os.getpid()}.safetensors"
        write_safetensors_atomic(
            peft_tensors(adapter), header_metadata(adapter, with_config=True), tmp
        )
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _insert(
        self,
        db: sqlite3.Connection,
        name: str,
        sha: str,
        adapter: LoraAdapter,
        embedding: tuple[np.ndarray, int] | None,
    ) -> int:
        base = adapter.base_model
        cur = db.execute(
            "INSERT INTO adapters (name, sha256, base_model, architecture, rank, targets, "
            "n_modules, n_params, nbytes, meta, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                name,
                sha,
                base.name,
                base.architecture,
                adapter.rank,
                json.dumps(adapter.targets),
                len(adapter.modules),
                adapter.num_parameters,
                adapter.nbytes,
                json.dumps(adapter.meta.to_json()),
                time.time(),
            ),
        )
        db.executemany(
            "INSERT INTO adapter_modules VALUES (?,?,?,?)",
            [(cur.lastrowid, m, d_in, d_out) for m, (d_in, d_out) in adapter.shapes().items()],
        )
        if embedding is not None:
            vec, n = embedding
            db.execute(
                "INSERT INTO embeddings VALUES (?,?,?,?,?)",
                (
                    cur.lastrowid,
                    self.embedder.id,
                    vec.shape[0],
                    n,
                    vec.astype(np.float32).tobytes(),
                ),
            )
        return cur.lastrowid

    def cached_tensors(self, key: str, make: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Derived tensors (e.g. Arrow prototypes) under cache/ (see registry.derived)."""
        return cached_tensors(self.root / "cache", key, make)

    def unembedded(self) -> list[str]:
        """Adapters with no embedding from the current embedder (not searchable)."""
        rows = self._db.execute(
            "SELECT name FROM adapters WHERE id NOT IN "
            "(SELECT adapter_id FROM embeddings WHERE embedder = ?) ORDER BY name",
            (self._embedder().id,),
        )
        return [r[0] for r in rows]

    def embed_missing(self) -> list[str]:
        """Embed, with the current embedder, every adapter that lacks its embedding and has
        examples or a description (after switching embedders). Returns the names done."""
        done = []
        for name in self.unembedded():
            made = self._embed(self.get(name).meta)
            if made is not None:
                self.set_embedding(name, *made)
                done.append(name)
        return done

    def example_vectors(self, meta: AdapterMeta) -> np.ndarray | None:
        """The current embedder's vectors (n, dim) of an adapter's example inputs (else its
        description), cached under cache/ by embedder and texts; None without texts."""
        texts = meta_texts(meta)
        if not texts:
            return None
        embedder = self._embedder()
        made = self.cached_tensors(
            examples_key(embedder, texts),
            lambda: {"vectors": torch.from_numpy(np.asarray(embedder.encode(texts), np.float32))},
        )
        return made["vectors"].numpy()

    def _embed(self, meta: AdapterMeta) -> tuple[np.ndarray, int] | None:
        """An adapter's embedding and how many texts made it."""
        vectors = self.example_vectors(meta)
        return None if vectors is None else (mean_embedding(vectors), len(vectors))

    def set_embedding(self, name: str, vector: np.ndarray, n_texts: int) -> None:
        """Store (or replace) an adapter's embedding made by the registry's embedder."""
        rec = self.get(name)
        vec = np.asarray(vector, np.float32).reshape(-1)
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?,?)",
                (rec.id, self._embedder().id, vec.shape[0], n_texts, vec.tobytes()),
            )
            generation = self._bump(db)
        self._update_index(generation, add=None, remove=None)

    # -- search ---------------------------------------------------------------------
    def _embedder(self) -> Embedder:
        if self.embedder is None:
            raise AdapterError("this registry was opened without an embedder; pass embedder=")
        return self.embedder

    def _stamp(self, generation: int) -> str:
        key = f"{self._embedder().id}|{self.index_kind.value}|{generation}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def index_stamp(self) -> str:
        """The stamp of the index file that matches the catalogue now."""
        return self._stamp(self.generation())

    def generation(self) -> int:
        """A counter that every change to the catalogue bumps, in the same transaction, so
        any process holding the registry open sees it: cheap to poll (one indexed row)."""
        return self._db.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()[0]

    def _update_index(
        self,
        generation: int,
        add: tuple[int, tuple[np.ndarray, int] | None] | None,
        remove: int | None,
    ) -> None:
        """Keep a loaded index in step with our own write; anything else invalidates it."""
        index = self._index
        if index is None or self.embedder is None or index.stamp != self._stamp(generation - 1):
            self._index = None
            return
        if remove is not None and not index.remove(remove):
            self._index = None
            return
        if add is not None and add[1] is not None:
            index.add(add[0], add[1][0])
        index.stamp = self._stamp(generation)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """ids (n,) and vectors (n, dim) made by the current embedder."""
        emb = self._embedder()
        rows = self._db.execute(
            "SELECT adapter_id, dim, vector FROM embeddings WHERE embedder = ? ORDER BY adapter_id",
            (emb.id,),
        ).fetchall()
        for r in rows:
            if r["dim"] != emb.dim:
                raise AdapterError(
                    f"stored embeddings have dimension {r['dim']} but embedder "
                    f"{emb.id!r} gives {emb.dim}"
                )
        ids = np.array([r[0] for r in rows], np.int64)
        vecs = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), emb.dim)
        return ids, vecs

    def index(self) -> VectorIndex:
        """The faiss index for the current catalogue: in memory, else from disk, else rebuilt."""
        stamp = self._stamp(self.generation())
        if self._index is None or self._index.stamp != stamp:
            self._index = VectorIndex.load(self.root, stamp)
        if self._index is None:
            ids, vecs = self.embeddings()
            self._index = VectorIndex.build(ids, vecs, stamp, self.index_kind)
            self._index.save(self.root)
        return self._index

    def save_index(self) -> None:
        """Persist the in-memory index if the file for its stamp is not there yet."""
        if (
            self._index is not None
            and not (self.root / f"index.{self._index.stamp}.faiss").exists()
        ):
            self._index.save(self.root)

    def search(
        self, query: str | np.ndarray, k: int = 5, exclude: Sequence[str] = ()
    ) -> list[tuple[str, float]]:
        """Top-k adapters by cosine similarity to `query` (text or a unit vector)."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        vec = (
            self._embedder().encode([query])
            if isinstance(query, str)
            else np.asarray(query, np.float32)
        )
        vec = vec.reshape(1, -1)
        index = self.index()
        if vec.shape[1] != index.dim and len(index):
            raise AdapterError(f"query has dimension {vec.shape[1]}, the index {index.dim}")
        if not len(index):
            return []
        excluded = set(exclude)
        scores, ids = index.search(vec, min(k + len(excluded), len(index)))
        names = self._names_by_id([int(i) for i in ids[0] if i >= 0])
        hits = zip(ids[0].tolist(), scores[0].tolist(), strict=True)
        return [(names[i], s) for i, s in hits if i in names and names[i] not in excluded][:k]

    def _names_by_id(self, ids: list[int]) -> dict[int, str]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT id, name FROM adapters WHERE id IN ({marks})", ids)
        return {r[0]: r[1] for r in rows}


def _default_name(source: object) -> str:
    if isinstance(source, LoraAdapter):
        raise AdapterError("a name is required when registering an in-memory adapter")
    spec = (
        str(source).rstrip("/").split("@", 1)[0] if str(source).startswith("hf://") else str(source)
    )
    return Path(spec.rstrip("/")).stem if not Path(spec).is_dir() else Path(spec).resolve().name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
