"""What heads actually do: batched interventions and their effects."""

from .engine import Engine, EngineResult
from .interventions import (
    EdgeEdit,
    HeadAblation,
    Intervention,
    ablate,
    digest,
    keep_only,
    remove_direct,
    remove_sources,
)

__all__ = [
    "Engine",
    "EngineResult",
    "EdgeEdit",
    "HeadAblation",
    "Intervention",
    "ablate",
    "keep_only",
    "remove_sources",
    "remove_direct",
    "digest",
]
