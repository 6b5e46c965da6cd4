"""Every fenced block of the README runs as written and gives what it shows, or carries a
marker comment on the line before its fence saying why it cannot run here:

    <!-- readme: skip — needs a vLLM replica -->
    <!-- readme: xfail — what is wrong, until its section is fixed -->
    <!-- readme: server — the test starts its first `loraplex serve`; the blocks below talk to it -->

Blocks run in a scratch folder holding `my-registry` (the zoo, registered once) and
`lorahub/zoo`, on the offline base model and embedder; a server block's port becomes a
free one in it and in the blocks that talk to it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme: (skip|xfail|server) — (.+?) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
RUNNERS = {"python", "bash"}
README_PORT = "8000"


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    heading: str
    marker: str | None
    reason: str | None

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z]+', '-', self.heading.lower()).strip('-')}"


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("# ")
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARKER.match(lines[i - 1]) if i else None
        blocks.append(
            Block(
                i + 1,
                fence[1],
                "\n".join(lines[i + 1 : end]) + "\n",
                heading,
                mark and mark[1],
                mark and mark[2],
            )
        )
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.marker in (None, "xfail")]


def test_every_block_is_run_or_says_why_not() -> None:
    unmarked = [f"line {b.line} ({b.lang or 'no language'})" for b in BLOCKS if b.marker is None]
    assert all(b.lang in RUNNERS for b in BLOCKS if b.marker is None), unmarked
    assert all(len(b.reason.split()) >= 3 for b in BLOCKS if b.marker), "give a reason"
    assert [b.marker for b in BLOCKS].count("server") <= 1
    assert len(RUN) >= 4  # the README keeps runnable examples


# -- the scratch folder, the server ---------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, embedder) -> Path:
    """my-registry holds the zoo (one register_many call); lorahub/zoo is the repo's."""
    from registry import Registry

    ws = tmp_path_factory.mktemp("readme")
    (ws / "lorahub").mkdir()
    (ws / "lorahub" / "zoo").symlink_to(ROOT / "lorahub" / "zoo")
    (ws / "home").mkdir()
    zoo = sorted(p for p in (ROOT / "lorahub" / "zoo").iterdir() if p.is_dir())
    with Registry(ws / "my-registry", embedder=embedder) as reg:
        assert all(r.ok for r in reg.register_many(zoo))
    (ws / "home" / "registry").symlink_to(ws / "my-registry")
    return ws


def environment(ws: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LORAPLEX_HOME": str(ws / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KEY": "readme-key",
    }


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[str]:
    """The server block's first `loraplex serve` line, started on a free port; yields that
    port once /health says ready."""
    import httpx

    block = next((b for b in BLOCKS if b.marker == "server"), None)
    if block is None:
        yield README_PORT
        return
    port = str(free_port())
    serve = next(ln for ln in block.code.splitlines() if ln.startswith("loraplex serve"))
    line = serve.split("#")[0].replace(README_PORT, port)
    log = workspace / "server.log"
    proc = subprocess.Popen(
        shlex.split(line),
        cwd=workspace,
        env=environment(workspace),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=120)


# -- what each block shows ---------------------------------------------------------------
def check_using_it(out: str, ns: dict) -> None:
    answers = ns["answers"]
    assert [a.prompt for a in answers] == ["What is the capital of France?", "normalisieren"]
    france, verb = answers
    assert "Paris" in france.text and not france.routing.adapters  # the base model answered
    assert verb.text.strip() == "normalisiert"
    assert all("past_tense" in name for name in verb.routing.adapters[:2])
    assert all(str(a.routing.as_dict()) in out for a in answers)
    assert len(ns["scores"]) == 1 and len(ns["scores"][0]) == 2


def check_registry(out: str, ns: dict) -> None:
    lines = out.splitlines()
    assert lines[0] == "['color-hcl', 'color-hex', 'color-rgb']"
    assert lines[1].startswith("[('addition', ")
    assert ns["adapter"].rank == 8


def check_curl(out: str, ns: dict) -> None:
    reply = json.loads(out)
    assert reply["choices"][0]["message"]["content"]
    assert reply["model"] and "loraplex" in reply


def check_openai(out: str, ns: dict) -> None:
    assert "adapters" in ns["reply"].model_extra["loraplex"]


CHECKS: dict[tuple[str, str], Callable[[str, dict], None]] = {
    ("Using it", "python"): check_using_it,
    ("The registry", "python"): check_registry,
    ("Serving: an OpenAI-compatible server that routes every request", "bash"): check_curl,
    ("Serving: an OpenAI-compatible server that routes every request", "python"): check_openai,
}


def run_python(code: str, ws: Path) -> tuple[str, dict]:
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    cwd = Path.cwd()
    os.chdir(ws)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), ns)
    finally:
        os.chdir(cwd)
    return out.getvalue(), ns


def run_bash(code: str, ws: Path) -> tuple[str, dict]:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ws,
        env=environment(ws),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, {}


RUN_BY_LANG = {"python": run_python, "bash": run_bash}


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, marks=pytest.mark.xfail(reason=b.reason, strict=True))
        if b.marker == "xfail"
        else b
        for b in RUN
    ],
    ids=[b.id for b in RUN],
)
def test_readme_block_runs_and_shows_what_it_says(
    block: Block, workspace: Path, request: pytest.FixtureRequest, monkeypatch
) -> None:
    code = block.code
    if f":{README_PORT}" in code:
        code = code.replace(f":{README_PORT}", f":{request.getfixturevalue('server')}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, ns = RUN_BY_LANG[block.lang](code, workspace)
    check = CHECKS.get((block.heading, block.lang))
    if check is not None:
        check(out, ns)
