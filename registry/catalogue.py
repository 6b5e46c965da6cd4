"""The catalogue's schema and rows: what the SQLite file holds about each adapter, and
the rule for adapter names (identifiers, never paths)."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass

from registry.adapter import AdapterMeta, BaseModelInfo, LoraAdapter
from registry.errors import UnsafePathError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    base_model TEXT NOT NULL,
    architecture TEXT,
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,
    n_modules INTEGER NOT NULL,
    n_params INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_sha ON adapters(sha256);
CREATE TABLE IF NOT EXISTS adapter_modules (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    module TEXT NOT NULL,
    d_in INTEGER NOT NULL,
    d_out INTEGER NOT NULL,
    PRIMARY KEY (adapter_id, module)
);
CREATE TABLE IF NOT EXISTS embeddings (
    adapter_id INTEGER PRIMARY KEY REFERENCES adapters(id) ON DELETE CASCADE,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    n_texts INTEGER NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('generation', 0);
"""


def check_name(name: str) -> str:
    """Adapter names are identifiers, never paths: letters, digits, `._+-`, no `..`."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UnsafePathError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits or ._+- "
            "(no path separators, '..', spaces or control characters)"
        )
    return name


@dataclass(frozen=True)
class AdapterRecord:
    """A catalogue row: everything about an adapter except its weights."""

    id: int
    name: str
    sha256: str
    base_model: BaseModelInfo
    rank: int
    targets: list[str]
    n_modules: int
    n_params: int
    nbytes: int
    meta: AdapterMeta
    created: float

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "base_model": self.base_model.name,
            "architecture": self.base_model.architecture,
            "rank": self.rank,
            "targets": self.targets,
            "n_modules": self.n_modules,
            "n_params": self.n_params,
            "nbytes": self.nbytes,
            "created": self.created,
            **{k: v for k, v in self.meta.to_json().items() if k != "extra"},
        }


@dataclass(frozen=True)
class Entry:
    """A row about to be inserted: what the catalogue keeps of an adapter whose blob is
    written (no tensors, so a bulk registration holds thousands at little cost)."""

    name: str
    sha256: str
    base_model: BaseModelInfo
    rank: int
    targets: tuple[str, ...]
    n_params: int
    nbytes: int
    meta: AdapterMeta
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, name: str, adapter: LoraAdapter, sha256: str) -> Entry:
        return cls(
            name,
            sha256,
            adapter.base_model,
            adapter.rank,
            tuple(adapter.targets),
            adapter.num_parameters,
            adapter.nbytes,
            adapter.meta,
            adapter.shapes(),
        )


def record_from_row(row: sqlite3.Row) -> AdapterRecord:
    return AdapterRecord(
        id=row["id"],
        name=row["name"],
        sha256=row["sha256"],
        base_model=BaseModelInfo(row["base_model"], row["architecture"]),
        rank=row["rank"],
        targets=json.loads(row["targets"]),
        n_modules=row["n_modules"],
        n_params=row["n_params"],
        nbytes=row["nbytes"],
        meta=AdapterMeta.from_json(json.loads(row["meta"])),
        created=row["created"],
    )
