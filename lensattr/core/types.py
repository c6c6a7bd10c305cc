"""Shared small types: head identifiers, shape aliases, enums. No side effects."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "HeadId",
    "AblationMethod",
    "Tokens",
    "Mask",
    "Pattern",
    "PerPrompt",
    "EdgeMask",
    "Bool",
    "Float",
    "Int",
    "Tensor",
]


class HeadId(NamedTuple):
    """One attention head, addressed by integers (never by a parsed string)."""

    layer: int
    head: int

    def __str__(self) -> str:  # display only; never parsed back
        return f"L{self.layer}H{self.head}"


class AblationMethod(str, Enum):
    """How a head's output (hook_z) is replaced."""

    ZERO = "zero"
    MEAN = "mean"  # mean over the prompt set, per position
    RESAMPLE = "resample"  # value on the paired corrupted prompt


Tokens = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]
Pattern = Float[Tensor, "batch head_index query_pos key_pos"]
PerPrompt = Float[Tensor, "batch"]
EdgeMask = Bool[Tensor, "batch query_pos key_pos"]
