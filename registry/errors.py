"""Error types: every problem with an adapter or the registry is one of these."""


class AdapterError(Exception):
    """Base class: something is wrong with an adapter, its source, or the registry."""


class AdapterFormatError(AdapterError):
    """A file is missing, unreadable, truncated, or not in a supported layout."""


class AdapterShapeError(AdapterError):
    """Tensor shapes are inconsistent (A vs B, or vs the base model)."""


class AdapterValueError(AdapterError):
    """Tensor values are unusable (NaN or Inf)."""


class AdapterLimitError(AdapterError):
    """The adapter exceeds a configured rank, size or count limit."""


class BaseModelMismatchError(AdapterError):
    """Adapters made for different base models were combined."""


class UnsafePathError(AdapterError):
    """A name or path would escape its folder, or a file kind is refused (pickle)."""


class DuplicateNameError(AdapterError):
    """The name is already registered and replacing was not asked for."""


class AdapterNotFoundError(AdapterError, KeyError):
    """No adapter of that name (or no source at that address)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IntegrityError(AdapterError):
    """A stored blob does not match its recorded sha256."""
