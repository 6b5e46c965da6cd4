"""The built-in engine's contract, driven directly (no HTTP): every request ends exactly
once; a failing adapter, prompt or step fails only the requests it concerns and leaves the
engine serving everyone else exactly as before; long prompts are prefilled in chunks
beside the others; memory is admitted by a token budget; a seeded sample equals
`Hub.generate`'s."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model, char_tokenizer

from composition import Mode
from lorahub import inference
from lorahub.hub import Hub
from lorahub.inference import Sampling
from lorahub.models import BaseModel
from lorahub.serve.batching import BatchingConfig, BatchingEngine
from lorahub.serve.engine import Event, GenerationRequest, RequestError
from lorahub.serve.stack import PagerConfig
from registry import BaseModelInfo, LoraAdapter, LoraModule, Registry
from router import Retriever, Routing

TICKS = itertools.count()  # orders events across requests
DEADLINE = 300  # seconds: generous, for a loaded machine


class Listener:
    """Collects one request's events; `wait()` until its terminal event."""

    def __init__(self, on_token=None) -> None:
        self.events: list[tuple[int, Event]] = []
        self.ended = threading.Event()
        self.on_token = on_token

    def __call__(self, ev: Event) -> None:
        self.events.append((next(TICKS), ev))
        if ev.kind == "token" and self.on_token is not None:
            self.on_token(ev)
        if ev.kind != "token":
            self.ended.set()

    def wait(self) -> Listener:
        assert self.ended.wait(DEADLINE), "the request never ended"
        return self

    @property
    def terminal(self) -> list[Event]:
        return [ev for _, ev in self.events if ev.kind != "token"]

    @property
    def text(self) -> str:
        return "".join(ev.text for _, ev in self.events if ev.kind == "token")

    def tick(self, kind: str) -> int:
        return next(t for t, ev in self.events if ev.kind == kind)


def lora(model: torch.nn.Module, seed: int, modules: dict[str, tuple[int, int]] | None = None):
    g = torch.Generator().manual_seed(seed)
    shapes = modules or {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }
    mods = {
        name: LoraModule(torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g), 8.0)
        for name, (d_in, d_out) in shapes.items()
    }
    return LoraAdapter(mods, base_model=BaseModelInfo("tiny-llama"))


@pytest.fixture
def registry(tmp_path: Path, embedder) -> Iterator[Registry]:
    model = build_model("llama")
    with Registry(tmp_path / "reg", embedder=embedder) as reg:
        reg.register(lora(model, 1), name="math")
        reg.register(lora(model, 2), name="mood")
        yield reg


@contextmanager
def engine(registry: Registry, start: bool = True, **config) -> Iterator[BatchingEngine]:
    tok = char_tokenizer()
    hub = Hub(registry, BaseModel("tiny-llama", build_model("llama"), tok), Retriever(registry))
    eng = BatchingEngine(hub, BatchingConfig(**config))
    if start:
        eng.start()
    try:
        yield eng
    finally:
        if eng._thread is None:
            eng.start()
        eng.stop()


def request(
    eng: BatchingEngine, prompt: str, adapters: dict[str, float] | None = None, **sampling
) -> GenerationRequest:
    ids = tuple(eng.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    routing = Routing(tuple(adapters or ()), tuple((adapters or {}).values()))
    return GenerationRequest(
        ids, routing, Mode.mixture, Sampling(**({"max_new_tokens": 8} | sampling))
    )


def run(eng: BatchingEngine, req: GenerationRequest) -> Listener:
    listener = Listener()
    eng.submit(req, listener)
    return listener.wait()


def test_an_adapter_that_cannot_be_stacked_fails_its_request_alone(registry: Registry) -> None:
    model = build_model("llama")
    # accepted by the registry (a module name no other adapter has), but not an nn.Linear
    # of this model: attaching it fails after the stack was already built once
    registry.register(lora(model, 3, {"model.embed_tokens": (32, 128)}), name="embeds")
    with engine(registry) as eng:
        math = run(eng, request(eng, "What is 2 plus 2?", {"math": 1.0})).text
        base = run(eng, request(eng, "What is 2 plus 2?")).text
        assert math != base  # the adapter changes the answer, so losing it would show
        bad, good = Listener(), Listener()
        eng.submit(request(eng, "What is 2 plus 2?", {"embeds": 1.0}), bad)
        eng.submit(request(eng, "What is 2 plus 2?", {"math": 1.0}), good)
        assert [ev.code for ev in bad.wait().terminal] == ["adapter_failed"]
        assert good.wait().text == math
        assert run(eng, request(eng, "What is 2 plus 2?", {"math": 1.0})).text == math
        assert run(eng, request(eng, "What is 2 plus 2?", {"mood": 1.0})).text != math


def test_a_corrupt_blob_fails_its_request_alone(registry: Registry) -> None:
    registry.register(lora(build_model("llama"), 4), name="rotten")
    with engine(registry) as eng:
        math = run(eng, request(eng, "Sum 3 and 4.", {"math": 1.0})).text
        blob = registry.blob_path(registry.get("rotten").sha256)
        blob.write_bytes(blob.read_bytes()[:-64] + b"\0" * 64)
        bad = run(eng, request(eng, "Sum 3 and 4.", {"rotten": 0.5, "math": 0.5}))
        assert [ev.code for ev in bad.terminal] == ["adapter_failed"]
        assert run(eng, request(eng, "Sum 3 and 4.", {"math": 1.0})).text == math


def test_a_request_runs_the_version_it_was_routed_to_or_fails(registry: Registry) -> None:
    with engine(registry, start=False) as eng:
        before = Listener()
        row = eng.submit(request(eng, "hello", {"math": 1.0}), before)
        old = registry.get("math").sha256
        assert row.applied == {"sha256": {"math": old}}
        registry.register(lora(build_model("llama"), 7), name="math", replace=True)
        eng.start()
        assert [ev.code for ev in before.wait().terminal] == ["adapter_failed"]
        after = Listener()
        row = eng.submit(request(eng, "hello", {"math": 1.0}), after)
        assert row.applied["sha256"]["math"] == registry.get("math").sha256 != old
        assert [ev.kind for ev in after.wait().terminal] == ["done"]


def test_client_mistakes_are_refused_at_submit(registry: Registry) -> None:
    with engine(registry, max_kv_tokens=40) as eng:
        cases = {
            "empty_prompt": request(eng, ""),
            "context_length_exceeded": request(eng, "x" * 30, max_new_tokens=11),
            "model_not_found": request(eng, "hi", {"nobody": 1.0}),
        }
        for code, req in cases.items():
            with pytest.raises(RequestError) as e:
                eng.submit(req, Listener())
            assert e.value.code == code
        assert eng.stats()["waiting"] == 0
        assert [ev.kind for ev in run(eng, request(eng, "hi")).terminal] == ["done"]


def test_a_prompt_whose_prefill_raises_fails_alone(registry: Registry) -> None:
    """Both prompts are prefilled in one pass, which raises: each is retried alone."""
    with engine(registry, start=False) as eng:
        poison = eng.tokenizer("~", add_special_tokens=False)["input_ids"][0]

        def explode(module, args, kwargs):
            if (kwargs["input_ids"] == poison).any():
                raise RuntimeError("injected fault")

        hook = eng.model.register_forward_pre_hook(explode, with_kwargs=True)
        calm, bad = Listener(), Listener()
        eng.submit(request(eng, "Count to three.", {"mood": 1.0}, max_new_tokens=12), calm)
        eng.submit(request(eng, "~~~", {"math": 1.0}), bad)
        eng.start()
        assert [ev.kind for ev in bad.wait().terminal] == ["error"]
        assert [ev.kind for ev in calm.wait().terminal] == ["done"]
        hook.remove()
        alone = run(eng, request(eng, "Count to three.", {"mood": 1.0}, max_new_tokens=12))
        assert calm.text == alone.text
        assert run(eng, request(eng, "~~~", {"math": 1.0})).terminal[0].kind == "done"


def test_cancelled_requests_end_once_and_free_their_row(registry: Registry) -> None:
    with engine(registry) as eng:
        started = threading.Event()
        listener = Listener(on_token=lambda ev: started.set())
        row = eng.submit(request(eng, "Tell a long story.", max_new_tokens=100), listener)
        assert started.wait(DEADLINE)
        row.cancel()
        assert [ev.code for ev in listener.wait().terminal] == ["cancelled"]
        assert len([ev for _, ev in listener.events if ev.kind == "token"]) < 100
        waiting = Listener()
        eng.submit(request(eng, "x"), waiting).cancel()  # cancelled before it ran
        assert [ev.kind for ev in waiting.wait().terminal] in (["error"], ["done"])
        assert eng.stats()["running"] == 0


def test_a_long_prompt_is_prefilled_in_chunks_while_a_short_one_answers(
    registry: Registry,
) -> None:
    long_prompt = "Please read all of this carefully. " * 3  # 105 characters: 7 chunks of 16
    with engine(registry, start=False, prefill_tokens=16) as eng:
        prefilled = []  # the long prompt's progress at each of the short answer's tokens

        def progress(ev: Event) -> None:
            prefilled.append(long_row.prefilled)

        long_listener, short = Listener(), Listener(on_token=progress)
        long_row = eng.submit(
            request(eng, long_prompt, {"math": 1.0}, max_new_tokens=6), long_listener
        )
        eng.submit(request(eng, "hi", max_new_tokens=6), short)
        eng.start()
        short.wait(), long_listener.wait()
        assert len(prefilled) == 6 and 0 < prefilled[-1] < len(long_row.prompt)
        assert short.tick("done") < long_listener.tick("token")
    oracle = BaseModel("tiny-llama", build_model("llama"), char_tokenizer())
    with Hub(registry, oracle, Retriever(registry)).composed(
        [Routing(("math",), (1.0,))]
    ) as applied:
        want = inference.generate(oracle, [long_prompt], applied, Sampling(6), formatted=True)
    assert long_listener.text.strip() == want[0]


def test_admission_keeps_the_cache_within_its_token_budget(registry: Registry) -> None:
    with engine(registry, start=False, max_kv_tokens=64) as eng:
        first, second = Listener(), Listener()
        eng.submit(request(eng, "a" * 20, max_new_tokens=12), first)  # reserves 32 positions
        eng.submit(request(eng, "b" * 21, max_new_tokens=12), second)  # 2 x 33 > 64: waits
        eng.start()
        first.wait(), second.wait()
        assert first.tick("done") < second.tick("token")


def test_a_long_request_decodes_in_its_own_lane_without_padding_the_short_ones(
    registry: Registry,
) -> None:
    long_prompt = "A long question about many things. " * 3  # 105 tokens
    with engine(registry, start=False, lane_floor=0) as eng:  # no floor: lanes split at 2x
        seen, prepared = [], {}  # id -> composition (held: an id stays its own)

        def step(ev) -> None:
            seen.append(eng.stats())
            prepared.update({id(c): c for _, c in eng._compositions.values() if c is not None})

        shorts = [Listener(on_token=step) for _ in range(3)]
        twenty = {"max_new_tokens": 20, "min_new_tokens": 20}
        eng.submit(request(eng, long_prompt, {"math": 1.0}, **twenty), Listener())
        for i, listener in enumerate(shorts):
            eng.submit(request(eng, f"Hi {i}", {"mood": 1.0}, **twenty), listener)
        eng.start()
        got = [s.wait().text for s in shorts]
        alone = [request(eng, f"Hi {i}", {"mood": 1.0}, **twenty) for i in range(3)]
        assert got == [run(eng, req).text for req in alone]
    both = [s for s in seen if s["running"] == 4]
    assert both and all(s["lanes"] == 2 for s in both)
    # each lane's composition is prepared once for its rows, not once per decode step
    assert len(both) >= 30 and len(prepared) <= 4
    assert all(s["kv_tokens"] < 2 * 125 for s in both)  # not 4 rows x 105-125 columns


def test_rows_within_the_lane_floor_decode_in_one_lane(registry: Registry) -> None:
    """Below `lane_floor` positions a separate pass costs more than the padding it saves."""
    long_prompt = "A long question about many things. " * 3  # 105 tokens
    with engine(registry, start=False, lane_floor=200) as eng:
        seen = []
        shorts = [Listener(on_token=lambda ev: seen.append(eng.stats())) for _ in range(3)]
        twenty = {"max_new_tokens": 20, "min_new_tokens": 20}
        eng.submit(request(eng, long_prompt, {"math": 1.0}, **twenty), Listener())
        for i, listener in enumerate(shorts):
            eng.submit(request(eng, f"Hi {i}", {"mood": 1.0}, **twenty), listener)
        eng.start()
        got = [s.wait().text for s in shorts]
        alone = [request(eng, f"Hi {i}", {"mood": 1.0}, **twenty) for i in range(3)]
        assert got == [run(eng, req).text for req in alone]
    both = [s for s in seen if s["running"] == 4]
    assert both and all(s["lanes"] == 1 for s in both)


def test_a_miss_pages_one_adapter_into_one_slot(registry: Registry) -> None:
    model = build_model("llama")
    for i in range(3):
        registry.register(lora(model, 10 + i), name=f"extra{i}")
    names = ["math", "mood", "extra0", "extra1", "extra2"]
    with engine(registry) as eng:  # 64 slots: the reference texts
        want = {n: run(eng, request(eng, "Go.", {n: 1.0})).text for n in names}
    assert len(set(want.values())) == len(names)
    with engine(registry, pager=PagerConfig(slots=2)) as eng:
        got = {}
        for n in names:
            composer, loads = eng.stack.composer, eng.stack.loads
            got[n] = run(eng, request(eng, "Go.", {n: 1.0})).text
            assert eng.stack.loads == loads + 1  # one adapter read
            assert composer is None or eng.stack.composer is composer  # nothing re-attached
        assert got == want
        assert run(eng, request(eng, "Go.", {"extra2": 1.0})).text == want["extra2"]
        # three adapters at once on two slots: the third waits for a free slot
        listeners = [Listener() for _ in names[:3]]
        for n, listener in zip(names[:3], listeners, strict=True):
            eng.submit(request(eng, "Go.", {n: 1.0}, max_new_tokens=8), listener)
        assert [x.wait().text for x in listeners] == [want[n] for n in names[:3]]
        assert listeners[2].tick("token") > min(x.tick("done") for x in listeners[:2])


@pytest.mark.parametrize("stop", [(), ("e",)])
def test_a_seeded_sample_equals_hub_generate(registry: Registry, stop: tuple[str, ...]) -> None:
    sampling = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 5, "stop": stop}
    with engine(registry) as eng:
        got = [run(eng, request(eng, p, {"mood": 1.0}, **sampling)).text for p in ("Hi.", "Why?")]
    oracle = BaseModel("tiny-llama", build_model("llama"), char_tokenizer())
    with Hub(registry, oracle, Retriever(registry)).composed(
        [Routing(("mood",), (1.0,))] * 2
    ) as applied:
        want = inference.generate(
            oracle, ["Hi.", "Why?"], applied, Sampling(**sampling), formatted=True
        )
    assert [g.strip() for g in got] == want
    assert len(set(want)) == 2 and all(want)  # two different, non-empty samples


def composed_logprobs(registry: Registry, ids: list[int], routing: Routing) -> torch.Tensor:
    """The oracle: log-softmax of one full forward of the prompt under `routing`, in float64,
    at each position that predicts a prompt token -> (len(ids) - 1,)."""
    oracle = BaseModel("tiny-llama", build_model("llama"), char_tokenizer())
    with (
        torch.inference_mode(),
        Hub(registry, oracle, Retriever(registry)).composed([routing]) as applied,
        applied.rows(torch.tensor([0])),
    ):
        logits = oracle.model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_prompt_logprobs_come_from_the_composed_prefill_chunked_or_not(
    registry: Registry,
) -> None:
    """Prompt logprobs (echo) are the request's own composed prefill: a prompt prefilled in
    chunks of 8 and short prompts prefilled together (one without them) equal one full
    forward under each routing."""
    jobs = {
        "Please read all of this, slowly.": {"math": 0.7, "mood": 0.5},  # 4 chunks of 8
        "Hi there": {"mood": 1.0},
        "Hey": {},
    }
    with engine(registry, start=False, prefill_tokens=8) as eng:
        listeners, requests = [], []
        for (prompt, adapters), top in zip(jobs.items(), (3, 2, 1), strict=True):
            req = request(eng, prompt, adapters, max_new_tokens=1)
            req = replace(req, logprobs=1, prompt_logprobs=top)
            requests.append(req)
            listeners.append(Listener())
            eng.submit(req, listeners[-1])
        bystander = Listener()
        eng.submit(request(eng, "Yo", {"math": 1.0}, max_new_tokens=1), bystander)
        eng.start()
        firsts = [
            next(ev for _, ev in lis.wait().events if ev.kind == "token") for lis in listeners
        ]
        bystander.wait()
    assert next(ev for _, ev in bystander.events).prompt_logprobs == ()
    for req, first, top in zip(requests, firsts, (3, 2, 1), strict=True):
        ids, got = list(req.prompt_ids), first.prompt_logprobs
        want = composed_logprobs(registry, ids, req.routing)
        assert [e["token"] for e in got] == [eng.tokenizer.decode([i]) for i in ids[1:]]
        assert [e["logprob"] for e in got] == pytest.approx(want.tolist(), abs=1e-5)
        assert all(len(e["top_logprobs"]) == top for e in got)
        assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] for e in got)
    # the composition matters: the base model's prompt logprobs are not these
    long_ids = list(requests[0].prompt_ids)
    base = composed_logprobs(registry, long_ids, Routing())
    assert not torch.allclose(base, composed_logprobs(registry, long_ids, requests[0].routing))
