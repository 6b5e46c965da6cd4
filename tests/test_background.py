"""The background class's inputs ship with their embeddings by the default embedder, so a
fresh registry routes at once instead of embedding 2,090 texts first; its chat-shaped part
is a tuning set that shares nothing with the everyday reporting set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from registry.embedding import examples_key
from router.background import BACKGROUND_PATH, background_texts, shipped_vectors

DATA = Path(__file__).parents[1] / "benchmarks" / "data"


def test_the_shipped_background_vectors_are_the_default_embedders(embedder) -> None:
    texts = background_texts()
    vectors = shipped_vectors(examples_key(embedder, list(texts)))
    assert vectors is not None and vectors.shape == (len(texts), 384)
    some = [0, len(texts) // 2, len(texts) - 1]
    fresh = embedder.encode([texts[i] for i in some])
    np.testing.assert_allclose(vectors[some].numpy(), fresh, atol=1e-5)
    assert shipped_vectors(examples_key(embedder, list(texts[:-1]))) is None  # other texts


def _prompts(name: str) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(ln)["prompt"] for ln in lines if ln.strip()]


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_the_chat_tuning_set_is_in_the_background_and_disjoint_from_everyday() -> None:
    chat, everyday = _prompts("chat_tuning.jsonl"), _prompts("everyday.jsonl")
    rows = [json.loads(ln) for ln in BACKGROUND_PATH.read_text().splitlines() if ln.strip()]
    assert [r["input"] for r in rows if r["task"].startswith("chat/")] == chat
    norm = lambda t: " ".join(sorted(_words(t))) or t.strip()  # noqa: E731 (emoji: as is)
    assert not {norm(c) for c in chat} & {norm(e) for e in everyday}
    # no paraphrase: no chat prompt shares half of its words with an everyday prompt
    for c in chat:
        for e in everyday:
            a, b = _words(c), _words(e)
            if len(a | b) >= 4:
                assert len(a & b) / len(a | b) < 0.5, (c, e)
