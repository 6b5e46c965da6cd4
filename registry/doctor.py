"""`loraplex doctor`: what a crash or a hand edit can leave in a registry folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from registry.catalogue import check_name
from registry.errors import AdapterError

if TYPE_CHECKING:
    from registry.store import Registry


def doctor(reg: Registry, repair: bool = False, verify: bool = True) -> list[str]:
    """Problems found, one line each. Debris a crash can leave (orphan blobs, temp
    files, stale index files) is removed with `repair`; entries whose blob is missing
    or fails its sha256 are reported, never deleted. Runs under the write lock, so no
    registration is in flight while it looks."""
    problems = []
    with reg._write() as db:
        shas = {r[0] for r in db.execute("SELECT DISTINCT sha256 FROM adapters")}
        for path in sorted((reg.root / "blobs").rglob("*")):
            if path.is_file() and path.name.removesuffix(".safetensors") not in shas:
                problems.append(f"orphan blob {path.relative_to(reg.root)}")
                if repair:
                    path.unlink()
        for path in sorted((reg.root / "tmp").iterdir()):
            problems.append(f"temp file {path.relative_to(reg.root)}")
            if repair:
                path.unlink()
        if reg.embedder is not None:
            current = f"index.{reg.index_stamp()}.faiss"
            for path in sorted(reg.root.glob("index.*.faiss")):
                if path.name != current:
                    problems.append(f"stale index {path.name}")
                    if repair:
                        path.unlink()
    for rec in reg.list():
        try:
            check_name(rec.name)
            if not reg.adapter_shapes(rec.name):
                problems.append(f"{rec.name}: module shapes unknown (register it again)")
            if not reg.blob_path(rec.sha256).exists():
                problems.append(f"{rec.name}: blob {rec.sha256[:12]} is missing")
            elif verify:
                reg.load(rec.name)
        except AdapterError as e:
            problems.append(f"{rec.name}: {e}")
    return problems
