"""registry: adapters as data — what exists, where it came from, what it looks like."""

from registry.adapter import AdapterMeta, BaseModelInfo, LoraAdapter, LoraModule, lora_scaling
from registry.bulk import Registration, Submission
from registry.cache import AdapterCache
from registry.catalogue import AdapterRecord, check_name
from registry.embedding import Embedder
from registry.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterLimitError,
    AdapterNotFoundError,
    AdapterShapeError,
    AdapterValueError,
    BaseModelMismatchError,
    DuplicateNameError,
    IntegrityError,
    UnsafePathError,
)
from registry.index import IndexKind, VectorIndex
from registry.peft_format import write_peft_folder
from registry.sources import load_source
from registry.store import Registry
from registry.validate import Limits

__all__ = [
    "AdapterCache",
    "AdapterError",
    "AdapterFormatError",
    "AdapterLimitError",
    "AdapterMeta",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterShapeError",
    "AdapterValueError",
    "BaseModelInfo",
    "BaseModelMismatchError",
    "DuplicateNameError",
    "Embedder",
    "IndexKind",
    "IntegrityError",
    "Limits",
    "LoraAdapter",
    "LoraModule",
    "Registration",
    "Registry",
    "Submission",
    "UnsafePathError",
    "VectorIndex",
    "check_name",
    "load_source",
    "lora_scaling",
    "write_peft_folder",
]
