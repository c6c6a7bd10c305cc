"""The registry of bundled models: each zoo module registers its :class:`ModelInfo` here on
import; :mod:`lensattr.models.loading` looks names up in it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ModelInfo", "register_model", "registered"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    size: str
    recipe: str
    contains: str
    builder: Callable[[], tuple[object, object]]  # -> (hf_model, tokenizer)
    logits_meaningful: bool = True  # False: encoder without a trained output head
    source: str = ""  # where the weights come from (a package, a file), when not in the repo
    license: str = ""  # the weights' license, when not the repository's own


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Register a bundled model; refuses duplicates."""
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def registered() -> dict[str, ModelInfo]:
    """The registered models by name (the zoo must have been imported: see ``loading``)."""
    return _REGISTRY
