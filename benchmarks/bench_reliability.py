"""Reliability at scale: concurrent writers, SIGKILL crash loops, a long fuzz run, and the
memory it takes to open a registry of 100k entries.

    python benchmarks/bench_reliability.py [--quick]

The harnesses are the test suite's (tests/test_concurrency.py, test_crash.py,
test_fuzz.py), run here at full size.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import print_table, target, write_result
from bench_registry import fill_catalogue

TESTS = Path(__file__).parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from test_concurrency import READER, WRITER, check_index  # noqa: E402
from test_crash import kill_loop  # noqa: E402

from registry import Registry  # noqa: E402


def concurrency(writers: int, each: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        Registry(tmp).close()
        start = time.perf_counter()
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, tmp, str(writers * each)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, tmp, str(w), str(each)])
            for w in range(writers)
        ]
        ok = all(p.wait() == 0 for p in procs)
        seconds = time.perf_counter() - start
        reads = int(reader.communicate()[0] or 0) if reader.wait() == 0 else -1
        with Registry(tmp) as reg:
            names = set(reg.names())
            expected = {f"w{w}-{i}" for w in range(writers) for i in range(each)}
            for n in names:
                reg.load(n)
            problems = reg.doctor()
        check_index(Path(tmp), expected)  # raises if the index disagrees with the catalogue
    return {
        "writers": writers,
        "entries": len(names),
        "lost": len(expected - names),
        "writers_ok": ok,
        "verified_reads_during_writes": reads,
        "doctor_problems": len(problems),
        "seconds": seconds,
    }


def crashes(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        Registry(tmp).close()
        returned = kill_loop(Path(tmp), rounds)
        with Registry(tmp) as reg:
            names = set(reg.names())
            repaired = reg.doctor(repair=True)
            bad = [p for p in repaired if not p.startswith(("orphan blob", "temp file"))]
            for n in names:
                reg.load(n)
            clean = reg.doctor() == []
    return {
        "kills": rounds,
        "returned": len(returned),
        "lost": len(returned - names),
        "debris_repaired": len(repaired) - len(bad),
        "unrepairable": len(bad),
        "clean_after": clean,
    }


def fuzz(examples: int) -> dict:
    env = {**os.environ, "LORAPLEX_FUZZ_EXAMPLES": str(examples)}
    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(TESTS / "test_fuzz.py"),
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", out.stdout)) else 0
    return {
        "properties": 4,
        "inputs_tried": 4 * examples,
        "properties_passed": passed,
        "escaped_errors": 4 - passed,
        "seconds": time.perf_counter() - start,
    }


MEMORY = """
import sys
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
from registry import Registry
imported = rss_kb()
reg = Registry(sys.argv[1])
n = len(reg); rec = reg.get("a500"); names = reg.names()
print(imported, rss_kb(), n)
"""


def memory(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fill_catalogue(Path(tmp), n, np.random.default_rng(0))
        imported, after, count = map(
            int,
            subprocess.run(
                [sys.executable, "-c", MEMORY, tmp], capture_output=True, text=True, check=True
            ).stdout.split(),
        )
    return {"entries": count, "open_list_get_mb": (after - imported) / 1024, "budget_mb": 64}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    conc = concurrency(4, 25 if args.quick else 250)
    crash = crashes(8 if args.quick else 50)
    fz = fuzz(100 if args.quick else 1000)
    mem = memory(10_000 if args.quick else 100_000)
    for title, row in (("concurrency", conc), ("crash loop", crash), ("fuzz", fz), ("memory", mem)):
        print(title)
        print_table([row], list(row))
    targets = [
        target("concurrent_entries", conc["entries"], 4 * (25 if args.quick else 250), ">="),
        target("concurrent_lost", conc["lost"], 0, "<="),
        target("crash_kills", crash["kills"], 8 if args.quick else 50, ">="),
        target("crash_lost", crash["lost"] + crash["unrepairable"], 0, "<="),
        target("fuzz_escaped_errors", fz["escaped_errors"], 0, "<="),
        target("open_100k_extra_mb", mem["open_list_get_mb"], mem["budget_mb"], "<="),
    ]
    write_result(
        "reliability",
        {"quick": args.quick},
        {"concurrency": conc, "crash": crash, "fuzz": fz, "memory": mem},
        targets,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
