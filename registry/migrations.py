"""Catalogue migrations. The catalogue's version is SQLite's `user_version`; step i brings
it from version i to i + 1. All pending steps run inside the transaction that opens the
registry, under SQLite's write lock, so two processes opening an old registry at once
migrate it once: the second sees the new version. No step reads adapter weights (a
blob's safetensors header at most): a missing blob is skipped and named, never fatal,
so `loraplex doctor` can open the registry and report it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from registry.errors import AdapterError
from registry.peft_format import module_shapes

BlobPath = Callable[[str], Path]  # sha256 -> the blob's path


def _shapes_per_adapter(db: sqlite3.Connection, blob_path: BlobPath) -> list[str]:
    """Registries before 0.2 kept one `module_shapes` row per base model, which outlived
    the adapters that made it; shapes now belong to each adapter's row."""
    old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'module_shapes'"
    if db.execute(old).fetchone() is None:
        return []
    skipped = []
    for row in db.execute("SELECT id, name, sha256 FROM adapters ORDER BY name").fetchall():
        try:
            path = blob_path(row["sha256"])
            if not path.exists():
                raise AdapterError(f"blob {row['sha256'][:12]} is missing")
            shapes = module_shapes(path)
        except AdapterError as e:
            skipped.append(f"{row['name']}: module shapes not migrated: {e}")
            continue
        db.executemany(
            "INSERT OR IGNORE INTO adapter_modules VALUES (?,?,?,?)",
            [(row["id"], m, d_in, d_out) for m, (d_in, d_out) in shapes.items()],
        )
    db.execute("DROP TABLE module_shapes")
    # what fits a model changed: hubs holding the registry open re-read it
    db.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")
    return skipped


MIGRATIONS: tuple[Callable[[sqlite3.Connection, BlobPath], list[str]], ...] = (
    _shapes_per_adapter,  # 0 -> 1
)


def migrate(db: sqlite3.Connection, blob_path: BlobPath) -> list[str]:
    """Run the pending steps in `db`'s open write transaction; what they skipped, a line
    each."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= len(MIGRATIONS):
        return []
    skipped = [line for step in MIGRATIONS[version:] for line in step(db, blob_path)]
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    return skipped
