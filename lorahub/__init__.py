"""lorahub: the user-facing hub — pipeline, few-shot learning, training, evaluation, CLI.

    from lorahub import Hub
    hub = Hub.open(registry="my-registry")

Names are imported on first use, so `loraplex list` does not pay for loading transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorahub.applied import Applied
    from lorahub.hub import Answer, Compose, Hub
    from lorahub.inference import Sampling

__all__ = ["Answer", "Applied", "Compose", "Hub", "Sampling"]
_WHERE = {
    "Answer": "lorahub.hub",
    "Applied": "lorahub.applied",
    "Compose": "lorahub.hub",
    "Hub": "lorahub.hub",
    "Sampling": "lorahub.inference",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'lorahub' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
