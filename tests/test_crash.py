"""Crash safety: a registration loop killed with SIGKILL at random moments. The registry
always opens, every registration that returned is intact, and `doctor --repair` clears
whatever debris the kill left without losing a committed entry."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from registry import Registry

LOOP = """
import sys, torch
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
root, start = sys.argv[1], int(sys.argv[2])
reg = Registry(root)
print("ready", flush=True)
for i in range(start, start + 10_000):
    g = torch.Generator().manual_seed(i)
    mods = {f"m.{j}": LoraModule(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 8.0)
            for j in range(8)}
    reg.register(LoraAdapter(mods, base_model=BaseModelInfo("tiny")), name=f"a{i}")
    print(f"a{i}", flush=True)
"""


def kill_loop(root: Path, rounds: int, seed: int = 0) -> set[str]:
    """Run the loop `rounds` times, each killed after a random delay; the names whose
    register() returned (printed after it did)."""
    rng = random.Random(seed)
    done: set[str] = set()
    for r in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", LOOP, str(root), str(r * 10_000)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        done |= {line for line in out.split() if line.startswith("a")}
    return done


def test_sigkill_during_registration_loses_nothing_committed(tmp_path: Path) -> None:
    Registry(tmp_path).close()
    returned = kill_loop(tmp_path, rounds=8)
    assert returned, "no registration finished before the kills: raise the delays"
    with Registry(tmp_path) as reg:
        names = set(reg.names())
        assert returned <= names  # a registration that returned is committed
        for problem in reg.doctor(repair=True):
            assert problem.startswith(("orphan blob", "temp file")), problem
        assert reg.doctor() == []
        for name in names:
            reg.load(name)  # and intact: its sha256 verifies
