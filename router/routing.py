"""`Routing`: the plain-data decision a router hands over — which adapters, how much each.

One `Routing` per input. An empty one means "no adapter" (the base model answers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from router.arrow import ArrowConfig


class Decision(StrEnum):
    """What a routing does with its prompt, one word in every report (the `Routing`, the
    server's body and header, `loraplex route`): `base`: no adapter (none fits, none to
    route to, an empty prompt, or none asked for); `broad`: unsure which adapter fits, the
    few likeliest mixed equally; `helped`: below the fit threshold, composed because
    composing helped the tasks nearest the prompt; `adapters`: the adapters the router is
    sure of, weighted."""

    base = "base"
    broad = "broad"
    helped = "helped"
    adapters = "adapters"


@dataclass(frozen=True)
class Routing:
    """adapters[i] gets weights[i]; `scores` are the router's raw similarities or
    probabilities (for logs), in the same order. `per_token`, when set, says the adapters
    are gated per token inside the pass (Arrow) and `weights` are only their prior.
    `confidence` is the router's own measure of fit (the task router's 1 - P(none)),
    `note` says why a routing is empty or shrunk (e.g. no adapter fits the prompt), and
    `decision` names the case; left out, it is `adapters` with adapters, else `base`."""

    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    scores: tuple[float, ...] = field(default=(), compare=False)
    per_token: ArrowConfig | None = None
    confidence: float | None = field(default=None, compare=False)
    note: str = field(default="", compare=False)
    decision: Decision | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        implied = Decision.adapters if self.adapters else Decision.base
        if self.decision is not None and self.decision not in set(Decision):
            raise ValueError(
                f"unknown decision {self.decision!r}; choose from {list(map(str, Decision))}"
            )
        object.__setattr__(self, "decision", Decision(self.decision or implied))
        if (self.decision == Decision.base) == bool(self.adapters):
            raise ValueError(f"decision {self.decision} with adapters {self.adapters}")
        if len(self.adapters) != len(self.weights):
            raise ValueError(f"{len(self.adapters)} adapters but {len(self.weights)} weights")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"weights must be finite, got {self.weights}")

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.adapters, self.weights, strict=True))

    def top(self, k: int) -> Routing:
        """The k heaviest adapters, weights renormalized to sum to 1 (selection: k=1)."""
        order = sorted(range(len(self.adapters)), key=lambda i: -self.weights[i])[:k]
        total = sum(self.weights[i] for i in order) or 1.0
        return Routing(
            tuple(self.adapters[i] for i in order),
            tuple(self.weights[i] / total for i in order),
            tuple(self.scores[i] for i in order) if self.scores else (),
            confidence=self.confidence,
            note=self.note,
            decision=self.decision if order else None,
        )

    def to_json(self) -> dict:
        per_token = (
            {"per_token": {"router": "arrow", **asdict(self.per_token)}} if self.per_token else {}
        )
        told = {"decision": str(self.decision)}
        told |= {"confidence": self.confidence} if self.confidence is not None else {}
        told |= {"note": self.note} if self.note else {}
        return (
            per_token
            | told
            | {
                "adapters": [
                    {"name": n, "weight": w, **({"score": s} if self.scores else {})}
                    for n, w, s in zip(
                        self.adapters,
                        self.weights,
                        self.scores or [None] * len(self.adapters),
                        strict=True,
                    )
                ]
            }
        )

    @classmethod
    def from_json(cls, data: dict) -> Routing:
        items = data.get("adapters", [])
        scores = tuple(float(a["score"]) for a in items if "score" in a)
        per_token = data.get("per_token")
        return cls(
            tuple(a["name"] for a in items),
            tuple(float(a["weight"]) for a in items),
            scores if len(scores) == len(items) else (),
            ArrowConfig(per_token["k"], per_token["temperature"]) if per_token else None,
            data.get("confidence"),
            data.get("note", ""),
            data.get("decision"),
        )


def uniform(names: Sequence[str], scores: Sequence[float]) -> Routing:
    """LoraRetriever's weighting: 1/k each."""
    k = len(names)
    return Routing(tuple(names), tuple([1.0 / k] * k), tuple(scores)) if k else Routing()


def softmax(names: Sequence[str], scores: Sequence[float], temperature: float) -> Routing:
    if not names:
        return Routing()
    top = max(scores)
    e = [math.exp((s - top) / temperature) for s in scores]
    total = sum(e)
    return Routing(tuple(names), tuple(x / total for x in e), tuple(scores))
