"""Several processes writing one registry at once, and readers during the writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from registry import Registry

WRITER = """
import sys, torch
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import SentenceEmbedder
root, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Registry(root, embedder=SentenceEmbedder()) as reg:
    for i in range(n):
        g = torch.Generator().manual_seed(worker * 1000 + i)
        mods = {"m.q": LoraModule(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 4.0)}
        reg.register(LoraAdapter(mods, base_model=BaseModelInfo("tiny")), name=f"w{worker}-{i}",
                     description=f"adapter {i} of writer {worker}: {DESCRIPTIONS[(worker + i) % 4]}")
"""

DESCRIPTIONS = ["adds numbers", "translates to French", "writes haiku", "answers chess puzzles"]
WRITER = WRITER.replace("DESCRIPTIONS", repr(DESCRIPTIONS))


def check_index(root: Path, expected: set[str]) -> None:
    """The faiss index, rebuilt from the catalogue, holds exactly one vector per adapter."""
    from router import SentenceEmbedder

    with Registry(root, embedder=SentenceEmbedder()) as reg:
        ids, _ = reg.embeddings()
        index = reg.index()
        assert len(index) == len(ids) == len(expected)
        assert set(reg._names_by_id(ids.tolist()).values()) == expected
        name, score = reg.search(f"adapter 3 of writer 1: {DESCRIPTIONS[(1 + 3) % 4]}", k=1)[0]
        assert name == "w1-3" and score > 0.99


READER = """
import sys, time
from registry import Registry
root, target, deadline = sys.argv[1], int(sys.argv[2]), time.time() + 300
seen, count = 0, 0
while count < target and time.time() < deadline:  # until the writers are done
    with Registry(root) as reg:
        records = reg.list()
        for rec in records:
            reg.load(rec.name)  # every listed entry must load and verify its sha256
            seen += 1
        count = len(records)
print(seen)
"""


def test_four_writers_and_a_reader_lose_nothing(tmp_path: Path) -> None:
    n = 15
    Registry(tmp_path).close()
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path), str(4 * n)], stdout=subprocess.PIPE, text=True
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), str(n)])
        for w in range(4)
    ]
    assert all(p.wait(timeout=300) == 0 for p in writers)
    out, _ = reader.communicate(timeout=300)
    assert reader.returncode == 0 and int(out) > 0
    with Registry(tmp_path) as reg:
        assert sorted(reg.names()) == sorted(f"w{w}-{i}" for w in range(4) for i in range(n))
        for name in reg.names():
            reg.load(name)
    blobs = list((tmp_path / "blobs").rglob("*.safetensors"))
    assert len(blobs) == 4 * n and not list((tmp_path / "tmp").iterdir())
    check_index(tmp_path, {f"w{w}-{i}" for w in range(4) for i in range(n)})
