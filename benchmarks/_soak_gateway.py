"""The gateway's share of the soak (issue 20), for soak.py to call: the same well-formed
traffic, through the vLLM gateway (in this process, as `loraplex serve --engine vllm` runs
it) over two real vLLM replicas (.venv-vllm) of the hub's base model, while
- one replica is killed (SIGKILL) mid-traffic and started again on its address a while
  later (the gateway must retry its requests elsewhere and take it back once it answers);
- a third upstream, a proxy in front of the other replica, answers every completion 400
  for a window (those requests must end once, with that 400, never hang).
Every request must end exactly once (counted at the engine), no client may hang, and every
200 answer must equal its reference answered alone before the faults (near-tie rule).

    sys.path.insert(0, "benchmarks"); from _soak_gateway import soak_gateway
    results, targets = soak_gateway(hub, bodies, seconds=240, clients=8, tmp=Path(...))

`bodies` are soak.py's chat bodies (greedy, logprobs on); import this module inside a
function of soak.py (it imports soak's traffic helpers).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import target
from bench_serve import free_port
from replica_faults import FaultyProxy, serving_at
from soak import Tally, TerminalCount, references, serve_in_thread, well_formed

from lorahub.hub import Hub
from lorahub.models import BUILTIN
from lorahub.serve.app import ServeConfig, create_app
from lorahub.serve.gateway import GatewayConfig, VllmGateway

VLLM_PYTHON = Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"
MAX_LORA_RANK = 32
DRAIN_S = 600.0  # after the traffic: every request still running must end by then


def vllm_command(model: str, port: int) -> list[str]:
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--enable-lora"]
    cmd += ["--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "8", "--dtype", "float32"]
    return [*cmd, "--enforce-eager", "--max-model-len", "2048", "--gpu-memory-utilization", "0.3"]


def start_replica(model: str, port: int, log: Path) -> subprocess.Popen:
    """A vLLM server in its own session (so a kill takes its engine process with it),
    answering once this returns."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    proc = subprocess.Popen(
        vllm_command(model, port),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    kill(proc)
    raise RuntimeError(f"vLLM did not start: see {log}")


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def soak_gateway(
    hub: Hub,
    bodies: list[dict],
    seconds: float,
    clients: int,
    tmp: Path,
    kill_at: float = 0.2,
    restart_at: float = 0.35,
    refuse: tuple[float, float] = (0.6, 0.75),
) -> tuple[dict, list[dict]]:
    """The soak through the gateway; fault times are fractions of `seconds`. Returns
    (results, targets) in soak.json's shapes."""
    if not VLLM_PYTHON.exists():
        raise SystemExit("no .venv-vllm: make venv-vllm")
    model = str(BUILTIN[hub.base.name]() if hub.base.name in BUILTIN else hub.base.name)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    procs = [start_replica(model, port, tmp / f"vllm{i}.log") for i, port in enumerate(ports)]
    proxy = FaultyProxy(urls[1])
    faults: dict = {}
    try:
        with serving_at(proxy.app, free_port()) as proxied:
            upstreams = (*urls, proxied)
            config = GatewayConfig(upstreams, tmp / "folders", MAX_LORA_RANK, retry_after=0.5)
            gateway = VllmGateway(hub, config)
            counter = TerminalCount(gateway)
            server, thread, url = serve_in_thread(create_app(hub, gateway, ServeConfig()))
            refs, _ = asyncio.run(references(url, bodies))
            tally = Tally()
            start = time.monotonic()
            deadline = start + seconds

            async def kill_and_restart() -> None:
                await asyncio.sleep(kill_at * seconds)
                kill(procs[0])
                faults["killed_at_s"] = round(time.monotonic() - start, 1)
                await asyncio.sleep(max(0.0, start + restart_at * seconds - time.monotonic()))
                procs[0] = await asyncio.get_running_loop().run_in_executor(
                    None, start_replica, model, ports[0], tmp / "vllm0-again.log"
                )
                answering = time.monotonic()
                while not gateway.upstreams[0].up and time.monotonic() < answering + DRAIN_S:
                    await asyncio.sleep(0.1)
                faults["taken_back_after_s"] = round(time.monotonic() - answering, 1)

            async def refuse_window() -> None:
                await asyncio.sleep(refuse[0] * seconds)
                proxy.refusing = True
                await asyncio.sleep((refuse[1] - refuse[0]) * seconds)
                proxy.refusing = False

            async def soak() -> None:
                await asyncio.gather(
                    *(well_formed(url, bodies, refs, tally, deadline, s) for s in range(clients)),
                    kill_and_restart(),
                    refuse_window(),
                )

            asyncio.run(soak())
            drain = time.monotonic() + DRAIN_S
            while gateway.stats()["running"] and time.monotonic() < drain:
                time.sleep(0.1)
            server.should_exit = True
            thread.join(timeout=120)
    finally:
        for proc in procs:
            kill(proc)
    return _report(tally, counter, gateway, proxy, faults, time.monotonic() - start)


def _report(tally: Tally, counter: TerminalCount, gateway, proxy, faults, seconds) -> tuple:
    ends = Counter(counter.counts.values())
    requests = sum(ends.values())
    once = ends.get(1, 0)
    hangs = sum(n for k, n in tally.outcomes.items() if k.endswith(":hang"))
    answered = tally.outcomes.get("well_formed:ok", 0)
    results = {
        "seconds": round(seconds, 1),
        "requests": requests,
        "ended_exactly_once": once,
        "terminal_events": {str(k): v for k, v in sorted(ends.items())},
        "outcomes": dict(tally.outcomes),
        "mismatches": tally.mismatches[:10],
        "retries": gateway.retries,
        "refused_by_the_4xx_replica": proxy.refused,
        **faults,
    }
    targets = [
        target("gateway_requests_ended_exactly_once", once / max(requests, 1), 1.0, ">="),
        target("gateway_hangs", hangs, 0, "<="),
        target(
            "gateway_answers_equal_their_reference",
            (answered - len(tally.mismatches)) / max(answered, 1),
            1.0,
            ">=",
        ),
    ]
    return results, targets
