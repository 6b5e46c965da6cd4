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
from registry.bulk import Progress, Registration, Submission, encode_in_batches
from registry.catalogue import SCHEMA, AdapterRecord, Entry, check_name, record_from_row
from registry.derived import cached_tensors, read_cached
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
        item = Submission(
            source,
            name,
            tuple(examples) if examples is not None else None,
            description,
            tuple(tags) if tags is not None else None,
            task,
        )
        name, adapter = self._read(item)
        base = adapter.base_model.name
        check_shapes_match(adapter.shapes(), self.shapes(base), base)
        if not replace and name in self:
            raise _duplicate(name)
        embedding = self._embed(adapter.meta) if self.embedder else None
        entry = Entry.of(name, adapter, adapter.sha256())
        self._write_blob(adapter, entry.sha256)
        try:
            with self._write() as db:
                row_id, old = self._insert_checked(
                    db,
                    entry,
                    embedding,
                    replace,
                    lambda: self._write_blob(adapter, entry.sha256),
                    {},
                )
                generation = self._bump(db)
        except AdapterError:
            self._collect_blob(entry.sha256)  # refused under the lock: leave no orphan blob
            raise
        self._update_index(generation, _added(row_id, embedding), _removed(old))
        if old is not None and old["sha256"] != entry.sha256:
            self._collect_blob(old["sha256"])
        return self.get(name)

    def register_many(
        self,
        sources: Sequence[str | Path | LoraAdapter | Submission],
        *,
        replace: bool = False,
        batch_size: int = 256,
        progress: Progress | None = None,
    ) -> list[Registration]:
        """Register many adapters in one call; one `Registration` per source, in order.

        Each source is read and validated on its own: a bad one is reported (its
        `Registration.error` names it) and skipped, and the others go on. The good ones'
        texts are embedded `batch_size` at a time across adapters (one `encode` call per
        batch), then every good one is committed in ONE transaction: one generation bump,
        one index update. A source refused at any stage leaves no row and no blob, and an
        interrupted call (an exception, Ctrl-C) commits nothing. `sources` items are paths,
        `hf://` ids, or `Submission`s (with a name, examples, ...); in-memory adapters need
        a `Submission` with a name.
        """
        items = [s if isinstance(s, Submission) else Submission(s) for s in sources]
        staged: dict[int, Entry] = {}
        errors: dict[int, AdapterError | OSError] = {}
        try:
            known: dict[str, dict[str, tuple[int, int]]] = {}
            taken: set[str] = set()
            for i, item in enumerate(items):
                try:
                    staged[i] = self._stage(item, replace, known, taken)
                except (AdapterError, OSError) as e:
                    errors[i] = e
                if progress is not None:
                    progress("read", i + 1, len(items))
            embeddings = self._embed_many(list(staged.values()), batch_size, progress)
            errors |= self._commit_many(items, staged, embeddings, replace)
        except BaseException:
            for entry in staged.values():  # nothing was committed: leave no blob behind
                self._collect_blob(entry.sha256)
            raise
        for i in errors.keys() & staged.keys():  # refused under the lock
            self._collect_blob(staged[i].sha256)
        return [
            Registration(
                item.label(),
                staged[i].name if i in staged else _name_or_none(item),
                None if i in errors else self.get(staged[i].name),
                errors.get(i),
            )
            for i, item in enumerate(items)
        ]

    def _read(self, item: Submission) -> tuple[str, LoraAdapter]:
        """The name and the validated adapter of one source (nothing stored yet)."""
        source = item.source
        adapter = (
            source if isinstance(source, LoraAdapter) else load_source(str(source), self.limits)
        )
        name = check_name(_default_name(source) if item.name is None else item.name)
        adapter = adapter.with_meta(**item.meta_changes())
        validate(adapter, self.limits)
        return name, adapter

    def _stage(
        self,
        item: Submission,
        replace: bool,
        known: dict[str, dict[str, tuple[int, int]]],
        taken: set[str],
    ) -> Entry:
        """Read, validate and write the blob of one source of a bulk registration, checked
        against the catalogue and the sources staged before it (`known`: base -> shapes,
        `taken`: their names; both updated here)."""
        name, adapter = self._read(item)
        if name in taken:
            raise DuplicateNameError(f"the name {name!r} is given to two sources in this call")
        if not replace and name in self:
            raise _duplicate(name)
        base = adapter.base_model.name
        if base not in known:
            known[base] = self.shapes(base)
        shapes = known[base]
        check_shapes_match(adapter.shapes(), shapes, base)
        entry = Entry.of(name, adapter, adapter.sha256())
        self._write_blob(adapter, entry.sha256)
        shapes.update(entry.shapes)
        taken.add(name)
        return entry

    def _embed_many(
        self, entries: list[Entry], batch_size: int, progress: Progress | None
    ) -> list[tuple[np.ndarray, int] | None]:
        """Each entry's embedding as `_embed` makes it, the uncached texts of all entries
        encoded together; the example vectors are cached as `example_vectors` caches them."""
        if self.embedder is None:
            return [None] * len(entries)
        folder = self.root / "cache"
        texts = [meta_texts(e.meta) for e in entries]
        keys = [examples_key(self.embedder, t) if t else None for t in texts]
        cached = {k: read_cached(folder, k) for k in keys if k is not None}
        todo = [x for t, k in zip(texts, keys, strict=True) if k and cached[k] is None for x in t]
        vectors = encode_in_batches(self.embedder, todo, batch_size, progress)
        out: list[tuple[np.ndarray, int] | None] = []
        for t, k in zip(texts, keys, strict=True):
            if k is None:
                out.append(None)
                continue
            if cached[k] is None:
                made = torch.from_numpy(np.stack([vectors[x] for x in t]))
                cached[k] = cached_tensors(folder, k, lambda made=made: {"vectors": made})
            v = cached[k]["vectors"].numpy()
            out.append((mean_embedding(v), len(v)))
        return out

    def _commit_many(
        self,
        items: list[Submission],
        staged: dict[int, Entry],
        embeddings: list[tuple[np.ndarray, int] | None],
        replace: bool,
    ) -> dict[int, AdapterError]:
        """Every staged entry in one transaction, each checked again under the write lock;
        returns those refused there (another process wrote meanwhile)."""
        refused: dict[int, AdapterError] = {}
        added: list[tuple[int, np.ndarray]] = []
        removed: list[int] = []
        old_blobs: list[str] = []
        if not staged:
            return refused
        known: dict[str, dict[str, tuple[int, int]]] = {}
        with self._write() as db:
            for (i, entry), embedding in zip(staged.items(), embeddings, strict=True):
                try:
                    row_id, old = self._insert_checked(
                        db,
                        entry,
                        embedding,
                        replace,
                        lambda i=i: self._restore_blob(items[i], staged[i]),
                        known,
                    )
                except AdapterError as e:
                    refused[i] = e
                    continue
                added += _added(row_id, embedding)
                removed += _removed(old)
                if old is not None and old["sha256"] != entry.sha256:
                    old_blobs.append(old["sha256"])
            generation = self._bump(db)
        self._update_index(generation, added, removed)
        for sha in old_blobs:
            self._collect_blob(sha)
        return refused

    def _restore_blob(self, item: Submission, entry: Entry) -> None:
        """A staged blob removed meanwhile (a concurrent remove of identical weights):
        written again from its source, which must still hold the same weights."""
        adapter = self._read(item)[1]
        if adapter.sha256() != entry.sha256:
            raise IntegrityError(f"{item.label()}: changed on disk while it was registered")
        self._write_blob(adapter, entry.sha256)

    def _insert_checked(
        self,
        db: sqlite3.Connection,
        entry: Entry,
        embedding: tuple[np.ndarray, int] | None,
        replace: bool,
        restore_blob: Callable[[], None],
        known: dict[str, dict[str, tuple[int, int]]],
    ) -> tuple[int, sqlite3.Row | None]:
        """Inside a write transaction: checks again what another process may have just
        changed, then the row (new id, the row it replaced). `known` (base -> shapes) is
        read once per transaction and grows with each row, so a bulk call stays linear."""
        base = entry.base_model.name
        if base not in known:
            known[base] = self.shapes(base)
        check_shapes_match(entry.shapes, known[base], base)
        old = db.execute("SELECT id, sha256 FROM adapters WHERE name = ?", (entry.name,)).fetchone()
        if old is not None and not replace:
            raise _duplicate(entry.name)
        if not self.blob_path(entry.sha256).exists():  # removed by a concurrent remove
            restore_blob()
        if old is not None:
            db.execute("DELETE FROM adapters WHERE id = ?", (old["id"],))
        row = self._insert(db, entry, embedding)
        known[base].update(entry.shapes)
        return row, old

    def remove(self, name: str) -> None:
        """Forget an adapter; its blob goes too unless another name shares it."""
        with self._write() as db:
            row = db.execute("SELECT id, sha256 FROM adapters WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
            db.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
            generation = self._bump(db)
        self._update_index(generation, removed=[row["id"]])
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
        entry: Entry,
        embedding: tuple[np.ndarray, int] | None,
    ) -> int:
        base = entry.base_model
        cur = db.execute(
            "INSERT INTO adapters (name, sha256, base_model, architecture, rank, targets, "
            "n_modules, n_params, nbytes, meta, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                entry.name,
                entry.sha256,
                base.name,
                base.architecture,
                entry.rank,
                json.dumps(list(entry.targets)),
                len(entry.shapes),
                entry.n_params,
                entry.nbytes,
                json.dumps(entry.meta.to_json()),
                time.time(),
            ),
        )
        db.executemany(
            "INSERT INTO adapter_modules VALUES (?,?,?,?)",
            [(cur.lastrowid, m, d_in, d_out) for m, (d_in, d_out) in entry.shapes.items()],
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

    def cached_tensors(
        self, key: str, make: Callable[[], dict[str, Tensor]], replaces: str = ""
    ) -> dict[str, Tensor]:
        """Derived tensors (e.g. Arrow prototypes) under cache/ (see registry.derived)."""
        return cached_tensors(self.root / "cache", key, make, replaces)

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
        self._update_index(generation)

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
        added: Sequence[tuple[int, np.ndarray]] = (),
        removed: Sequence[int] = (),
    ) -> None:
        """Keep a loaded index in step with our own write (one generation: `added` rows
        (id, vector), `removed` ids); anything else invalidates it."""
        index = self._index
        if index is None or self.embedder is None or index.stamp != self._stamp(generation - 1):
            self._index = None
            return
        if not all(index.remove(i) for i in removed):
            self._index = None
            return
        if added:
            ids, vectors = zip(*added, strict=True)
            index.add(np.array(ids, np.int64), np.stack(vectors))
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


def _duplicate(name: str) -> DuplicateNameError:
    return DuplicateNameError(f"an adapter named {name!r} exists; pass replace=True (--replace)")


def _added(row_id: int, embedding: tuple[np.ndarray, int] | None) -> list[tuple[int, np.ndarray]]:
    return [] if embedding is None else [(row_id, embedding[0])]


def _removed(old: sqlite3.Row | None) -> list[int]:
    return [] if old is None else [old["id"]]


def _name_or_none(item: Submission) -> str | None:
    """The name a failed source would have had, for its report."""
    try:
        return item.name or _default_name(item.source)
    except AdapterError:
        return None


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
