"""The error lensattr raises for a model it cannot handle or a model name it cannot resolve."""

from __future__ import annotations

__all__ = ["ModelError"]


class ModelError(ValueError):
    """A model lensattr cannot handle, or a model name it cannot resolve."""
