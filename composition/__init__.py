"""composition: how the chosen adapters act on a model."""

from composition.bank import AdapterBank
from composition.composer import (
    Composer,
    Composition,
    ComputePath,
    GateError,
    Mode,
    MultiLoraLinear,
    TokenGate,
    get_layer,
    set_layer,
)
from composition.gating import LearnedGate
from composition.merge import MERGES, MergeConfig, MergeMethod, MergeResult, merge

__all__ = [
    "MERGES",
    "AdapterBank",
    "Composer",
    "Composition",
    "ComputePath",
    "GateError",
    "LearnedGate",
    "MergeConfig",
    "MergeMethod",
    "MergeResult",
    "Mode",
    "MultiLoraLinear",
    "TokenGate",
    "get_layer",
    "merge",
    "set_layer",
]
