"""What heads actually do: batched interventions and their effects."""

from .attribution import atp
from .attribution_result import AtPResult
from .compensators import Compensators, compensators
from .decomposition import SourceDLA, source_dla, source_terms, source_terms_along
from .dla import DLA, Component, direct_logit_attribution
from .engine import Engine, EngineResult
from .interventions import (
    EdgeEdit,
    HeadAblation,
    Intervention,
    ablate,
    digest,
    keep_only,
    patch_weights,
    remove_direct,
    remove_sources,
)
from .patching import activation_patching, path_patching
from .patching_result import ActivationPatching, PathPatching

__all__ = [
    "direct_logit_attribution",
    "DLA",
    "Component",
    "source_terms",
    "source_terms_along",
    "source_dla",
    "SourceDLA",
    "compensators",
    "Compensators",
    "Engine",
    "EngineResult",
    "EdgeEdit",
    "HeadAblation",
    "Intervention",
    "ablate",
    "keep_only",
    "patch_weights",
    "remove_sources",
    "remove_direct",
    "digest",
    "atp",
    "AtPResult",
    "activation_patching",
    "path_patching",
    "ActivationPatching",
    "PathPatching",
]
